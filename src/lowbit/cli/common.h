// Pieces shared by the CLI commands: model and token-file loading, device selection, output, and
// the three pieces every command uses for user-facing robustness:
//  * numeric flag ranges, declared beside each flag:  sub->add_option("--lr", o.lr, "...")->check(above(0));
//    (NaN, inf and out-of-range values are rejected at parse time: "lowbit: error: --lr: ...");
//  * OutputDir: creates an output directory and, unless keep() is called, removes what it created
//    when the command fails (never a pre-existing directory or its contents);
//  * write_stdout / print_json: stdout writes that throw lowbit::Error when the write fails
//    (main() also checks stdout once more before exiting).
// main() maps lowbit::Error, CLI11 parse errors and filesystem errors to "lowbit: error: ..." and
// exit status 1; anything else is an internal error (status 2).
#pragma once
#include <CLI/CLI.hpp>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "lowbit/io/checkpoint.h"
#include "lowbit/model/llama.h"
#include "lowbit/quant/format.h"
#include "lowbit/tokenizer/tokenizer.h"

namespace CLI {
class App;
}

namespace lowbit::cli {

// Adds --threads N to a command that runs the model: lowbit's thread pool (core/threads.h) gets N
// threads when the option is parsed; the default is the number of physical cores.
void add_threads_option(CLI::App* app);

// Adds --f32-vocab (sets *keep_f32): keep a lowbit directory's embedding/output matrix in its
// stored dense type instead of packing it as q8_0 at load.
void add_f32_vocab_option(CLI::App* app, bool* keep_f32);

// Adds --matmul auto|int8|exact|reference: the activation path of packed (quantized) matrix
// products for the whole command (ops::set_quant_matmul_default; overrides LOWBIT_QUANT_MATMUL).
void add_matmul_option(CLI::App* app);

// Adds --kv-cache TYPE (auto|f16|q8|f32; KVCacheType) storing the parsed type in *type. `help`
// replaces the default help text when not empty.
void add_kv_cache_option(CLI::App* app, KVCacheType* type, const std::string& help = "");
// Refuses a packed (int4/int2) cache for a device other than the CPU, before the device is opened.
void check_kv_cache_device(KVCacheType type, const std::string& device);

// Parses "cpu" / "cuda"; "cuda" initialises the GPU or fails with a clear message.
Device parse_device(const std::string& name);

// Loads a checkpoint (any supported format) and builds a frozen model on `device`. Quantized
// models (lowbit directories, GGUF files in ggml block types) stay packed (QuantLinear layers on
// ops::quant_matmul); dequantize = true loads them as dequantized f32 instead (the reference path).
struct LoadedModel {
  Checkpoint checkpoint;
  std::unique_ptr<LlamaModel> model;
  int64_t packed_vocab_bytes = 0;  // packed token_embd / output (GGUF, or packed at load), not in checkpoint.weights
};
// packed_vocab: for inference on the CPU, a lowbit directory's dense embedding/output matrix is
// quantized to q8_0 at load (pack_vocab) and run packed, as GGUF models' are (--f32-vocab: false).
LoadedModel load_model(const std::string& path, Device device, bool dequantize = false, bool packed_vocab = false);
// A .gguf file whose linear weights use a ggml block type (q4_0, q4_1, q8_0, ...): load_model keeps it packed.
bool is_packed_gguf(const std::string& path);
// For commands that only run the model (eval, generate): on the CPU, weights that are exactly
// f16/bf16 (a model read from an F16/BF16 file) are kept 16-bit (LlamaModel::compact_weights)
// and the checkpoint's f32 copies are released.
void compact_for_inference(LoadedModel& m, Device device);

// Rotation and activation / KV-cache quantization (model/rotation.h, issue 16) from the command line:
//   --rotate none|hadamard, --rotate-seed N   (full-precision models: rotates the weights at load;
//                                              quantize: before the method runs)
//   --act none|int8|int4|int8-asym|int4-asym, --act-clip R|search, --kv-quant none|int4|int2,
//   --kv-group N, --kv-window N               (override what a quantized checkpoint records; they
//                                              also set the layout of a packed --kv-cache int4|int2)
struct TransformArgs {
  std::string rotate = "none";
  uint64_t rotate_seed = 0;
  std::string act, kv_quant, kv_token_quant;  // "" = not given
  double act_clip = 1.0;
  std::string act_clip_arg;       // as given: a ratio or "search"
  bool act_clip_search = false;   // --act-clip search (quantize only)
  int64_t kv_group = 32, kv_window = 128;
  // --kv-calib TEXT (eval / generate / bench on a model without codebooks): learn the --kv-quant
  // cq1|cq2 codebooks at load on --kv-calib-windows windows of --kv-calib-seqlen tokens of TEXT.
  std::string kv_calib;
  int64_t kv_calib_windows = 16, kv_calib_seqlen = 512;
  std::string kv_codebook = "f16";  // CQ centroids rounded to f16 (stored so) or kept in f32
  bool act_clip_given = false, kv_group_given = false, kv_window_given = false;
  bool rotating() const { return rotate != "none"; }
  // Any transform asked for (rotation, activation or KV quantization given on the command line).
  bool any_given() const { return rotating() || !act.empty() || !kv_quant.empty() || !kv_token_quant.empty(); }
};
void add_transform_options(CLI::App* app, TransformArgs* a);
// --rotate on a loaded model: rebuilds m.model (and m.checkpoint) from its rotated weights (on the
// CPU). Throws for a quantized or already rotated model, or a device other than the CPU.
void apply_rotation(LoadedModel& m, const TransformArgs& a);
// m's model and checkpoint rebuilt from new full-precision weights (c and t by value: callers pass
// the old model's own config / transforms, which die with it), frozen (rotation and --smooth use it).
void replace_weights(LoadedModel& m, LlamaConfig c, LlamaWeights w, ModelTransforms t);
// --act / --kv-quant and their settings on the model (given flags replace the recorded ones).
// `cache`: the command's --kv-cache; for int4/int2 (packed KIVI storage) --kv-group/--kv-window
// set its layout (LlamaModel::set_kv_cache_layout) and --kv-quant int4|int2 is refused (one of the
// two: the packed cache quantizes for real what --kv-quant simulates).
void apply_quant_transforms(LlamaModel& model, const TransformArgs& a, KVCacheType cache = KVCacheType::Auto);
// --kv-calib: learns the --kv-quant cq1|cq2 codebooks (methods/kv_cq.h) or the wkv4|wkv2 smoothing
// (methods/kv_wkv.h, groups of --kv-group channels) on the model as loaded (and
// rotated), before apply_quant_transforms; the text is tokenized with --tokenizer / the model's
// tokenizer. Nothing without --kv-calib. Throws for --kv-calib without --kv-quant cq1|cq2, or for a
// model that already records codebooks.
void apply_kv_calibration(LoadedModel& m, const TransformArgs& a, const std::string& tokenizer_path,
                          const std::string& model_path, bool quiet);


// The tokenizer named by --tokenizer (a tokenizer file, a directory holding one, or a GGUF file's
// embedded one), else the model's own: a model directory's, or the one embedded in a GGUF model
// (read from the metadata only). Throws when there is none.
std::unique_ptr<Tokenizer> open_tokenizer(const std::string& tokenizer_path, const std::string& model_path);

// A prompt from the model's chat template (GGUF tokenizer.chat_template, chat_template.jinja or
// tokenizer_config.json next to --tokenizer or the model): an optional system message, then
// `user`, with add_generation_prompt. Throws when neither path has a template.
std::string chat_prompt(const std::string& tokenizer_path, const std::string& model_path, const Tokenizer& tok,
                        const std::string& user, const std::string& system);

// The chat template source of --tokenizer or the model ("" when neither has one); *where names it.
std::string find_chat_template(const std::string& tokenizer_path, const std::string& model_path, std::string* where);
// Renders `messages` ([{"role", "content"}, ...]) with a chat template as transformers does.
std::string render_chat(const std::string& source, const std::string& where, const Tokenizer& tok,
                        const nlohmann::ordered_json& messages, bool add_generation_prompt);

// A file of raw little-endian int32 token ids.
std::vector<int32_t> read_token_file(const std::string& path);

// Tokenizes a text file (no special tokens) and caches the ids at cache_path (+ ".key": path, size,
// mtime and tokenizer path), so restarted runs reuse them.
std::vector<int32_t> tokenize_file_cached(const std::string& text_path, const Tokenizer& tok, const std::string& tok_path,
                                         const std::string& cache_path);

// Prints a JSON object on stdout (one line); throws lowbit::Error when stdout cannot be written.
void print_json(const nlohmann::json& j);

// Writes `s` to stdout and flushes; throws lowbit::Error ("writing to standard output: ...") on failure.
void write_stdout(std::string_view s);
// printf-style write_stdout.
[[gnu::format(printf, 1, 2)]] void print_stdout(const char* fmt, ...);
// Flushes stdout and std::cout; throws lowbit::Error when either has failed (main() calls it last).
void check_stdout();

// ---- numeric flag ranges (CLI11 validators; also reject NaN, inf and non-numbers) -------------
// at_least(0): x >= 0;  above(0): x > 0;  between(0, 1): 0 <= x <= 1;  finite(): any finite number.
CLI::Validator at_least(double lo);
CLI::Validator above(double lo);
CLI::Validator between(double lo, double hi);
CLI::Validator finite();
// A string flag that must not be empty (--format "", --out "").
CLI::Validator non_empty();

// ---- output directories ------------------------------------------------------------------------
// OutputDir out(path, "--out"): refuses a path that is an existing non-directory or an unwritable
// directory (lowbit::Error naming the flag), creates it and any missing parents. If the command
// fails (the object is destroyed without keep()), the directories it created are removed with
// everything in them; a directory that already existed is left as it was. Call keep() once the
// output is complete, and keep_if_exists(state_file) before a resumable run starts. A resumable
// run's state directory is an OutputDir of its own (flag "--state-dir"), made before any work so a
// path that cannot be created fails at once; on failure it is kept only once a save has written
// into it (keep_if_exists ignores an empty directory).
class OutputDir {
 public:
  OutputDir(std::string path, std::string flag = "--out");
  ~OutputDir();
  OutputDir(const OutputDir&) = delete;
  OutputDir& operator=(const OutputDir&) = delete;
  // Throws when the output directory is (or is inside) `input`, e.g. refuse_input(model, "the input model").
  void refuse_input(const std::string& input, const std::string& what) const;
  void keep() { keep_ = true; }
  // On failure, keep the directory after all when `file` exists then and is not an empty directory
  // (a resumable run's state).
  void keep_if_exists(std::string file) { keep_if_ = std::move(file); }
  const std::string& path() const { return path_; }
  bool existed() const { return created_.empty(); }

 private:
  std::string path_, flag_;
  std::string created_;  // topmost directory this object created ("" if none)
  std::string keep_if_;
  bool keep_ = false;
};

// The arithmetic mean of v (0 when empty): searched clip ratios and smoothing alphas in the reports.
double mean_of(const std::vector<double>& v);

// (out, in) of one block's seven linears: q, k, v, o, gate, up, down.
std::vector<std::pair<int64_t, int64_t>> block_linear_shapes(const LlamaConfig& c);

// The bits per weight a format costs over one block's seven linears (q, k, v, o, gate, up, down),
// each weighted by its size: what `quantize` reports for a plain format, and the basis of ApiQ's
// default rank. Scales, zeros and partial groups included (QuantFormat::bits_per_weight).
double block_linear_bits_per_weight(const LlamaConfig& c, const QuantFormat& f);

// Copies the tokenizer files of a model directory (tokenizer.json / .model / .bin and their
// config files) into `out_dir`, so outputs are usable without --tokenizer. `tokenizer` (a file or
// directory given with --tokenizer) is preferred when set. Returns the number of files copied.
int copy_tokenizer_files(const std::string& tokenizer, const std::string& model, const std::string& out_dir);

// The llm-foundry task directory: $LOWBIT_SHARED/tasks/llm-foundry, else the shared/ folder next
// to the repository that holds the executable (../shared from the repository root), else
// ../shared relative to the current directory.
std::string default_task_dir();

}  // namespace lowbit::cli

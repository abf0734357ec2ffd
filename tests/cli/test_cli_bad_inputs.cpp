// Every lowbit command against a catalogue of bad inputs: missing, empty, truncated and random
// files, files of the wrong type, out-of-range numbers, NaN/inf, unwritable outputs and outputs
// that are existing files (an unwritable directory only when not running as root; /proc/lowbit-no/...
// is uncreatable for everyone). Each row must end with exit status 1, a "lowbit: error:" line naming
// the problem, no "internal error", and no output left behind.
//
// One row per (command, bad input). A new command joins by adding rows to kRows; the test
// instantiates one case per command found in the table. Rows marked kModel need the stories260K
// model from ../shared ($LOWBIT_SHARED) and are skipped (with a message) when it is absent.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "common/test_util.h"

namespace fs = std::filesystem;

namespace {

enum Needs { kNone = 0, kModel = 1, kQuantized = 2 | kModel, kNotRoot = 4 };

struct Row {
  const char* command;  // first word(s) of the command line: groups rows into test cases
  const char* what;     // the bad input, for failure messages
  const char* args;     // placeholders: {M} model copy, {T} tokenizer, {I} good tokens, {Q} quantized
                        // model dir, {D} fixture dir (empty, random.bin, trunc.bin, text.txt, odd.i32,
                        // few.i32, file, ro/), {O} this row's output path (must not exist afterwards)
  const char* want;     // must appear in stderr after "lowbit: error: "
  int needs = kNone;
};

// clang-format off
const Row kRows[] = {
  // --- lowbit itself
  {"lowbit", "unknown command", "bogus", "unknown command 'bogus'"},
  {"lowbit", "no command", "", "no command given"},
  {"lowbit", "unknown flag", "--bogus", "--bogus"},
  // --- convert
  {"convert", "missing input", "convert --from {D}/missing.bin --to {O}.gguf", "missing.bin: no such file"},
  {"convert", "empty input", "convert --from {D}/empty --to {O}.gguf", "empty: unrecognised checkpoint format"},
  {"convert", "truncated input", "convert --from {D}/trunc.bin --to {O}.gguf", "trunc.bin: file is 100 bytes"},
  {"convert", "random input", "convert --from {D}/random.bin --to {O}.gguf", "random.bin: config field", kNone},
  {"convert", "text file as model", "convert --from {D}/text.txt --to {O}.gguf", "text.txt: unrecognised checkpoint format"},
  {"convert", "output = input", "convert --from {M} --to {M}", "refusing to overwrite the input", kModel},
  {"convert", "output dir = existing file", "convert --from {M} --to {D}/file", "exists and is not a directory", kModel},
  {"convert", "output under a file", "convert --from {M} --to {D}/file/x", "cannot create directory", kModel},
  {"convert", "uncreatable output", "convert --from {M} --to /proc/lowbit-no/out", "/proc/lowbit-no/out", kModel},
  {"convert", "bad dtype", "convert --from {M} --to {O} --dtype q4", "--dtype", kModel},
  {"convert", "slice 5", "convert --from {Q} --to {O} --slice 5", "--slice: 5 not in {2,3,4,8}", kQuantized},
  {"convert", "slice of a non-parent", "convert --from {Q} --to {O} --slice 2", "not a Matryoshka parent format", kQuantized},
  {"convert", "slice of a dense model", "convert --from {M} --to {O} --slice 2", "is not a lowbit quantized checkpoint", kModel},
  // --- eval ppl
  {"eval ppl", "missing model", "eval ppl -m {D}/missing.bin --tokens {I}", "missing.bin: no such file"},
  {"eval ppl", "random model", "eval ppl -m {D}/random.bin --tokens {I}", "random.bin"},
  {"eval ppl", "slice 7", "eval ppl -m {Q} --tokens {I} --slice 7", "--slice: 7 not in {2,3,4,8}", kQuantized},
  {"eval ppl", "slice of a non-parent", "eval ppl -m {Q} --tokens {I} --slice 2", "not a Matryoshka parent", kQuantized},
  {"eval ppl", "slice of a dense model", "eval ppl -m {M} --tokens {I} --slice 2", "is not a lowbit quantized checkpoint", kModel},
  {"eval ppl", "slice with dequantize", "eval ppl -m {Q} --tokens {I} --slice 2 --dequantize", "--slice: slices the packed int8 codes", kQuantized},
  {"eval ppl", "empty token file", "eval ppl -m {M} --tokens {D}/empty", "token stream (0 tokens)", kModel},
  {"eval ppl", "odd-sized token file", "eval ppl -m {M} --tokens {D}/odd.i32", "not a whole number of int32", kModel},
  {"eval ppl", "too few tokens", "eval ppl -m {M} --tokens {D}/few.i32", "shorter than one window", kModel},
  {"eval ppl", "missing text", "eval ppl -m {M} --tokenizer {T} --text {D}/missing.txt", "missing.txt: cannot open", kModel},
  {"eval ppl", "text and tokens", "eval ppl -m {M} --text {D}/text.txt --tokens {I}", "exactly one of --text", kModel},
  {"eval ppl", "ctx 1", "eval ppl -m {M} --tokens {I} --ctx 1", "--ctx: must be at least 2"},
  {"eval ppl", "batch 0", "eval ppl -m {M} --tokens {I} --batch 0", "--batch: must be at least 1"},
  {"eval ppl", "batch -1", "eval ppl -m {M} --tokens {I} --batch -1", "--batch: must be at least 1"},
  {"eval ppl", "kv-cache bf16", "eval ppl -m {M} --tokens {I} --kv-cache bf16", "--kv-cache: 'bf16' is not a KV cache type"},
  {"eval ppl", "kv-chunk 0", "eval ppl -m {M} --tokens {I} --kv-chunk 0", "--kv-chunk: must be at least 1"},
  {"eval ppl", "kv-chunk -3", "eval ppl -m {M} --tokens {I} --kv-chunk -3", "--kv-chunk: must be at least 1"},
  {"eval ppl", "matmul empty", "eval ppl -m {M} --tokens {I} --matmul ''", "--matmul: ''"},
  {"eval ppl", "f32-vocab with a value", "eval ppl -m {M} --tokens {I} --f32-vocab=maybe", "--f32-vocab"},
  {"eval ppl", "batch not a number", "eval ppl -m {M} --tokens {I} --batch abc", "--batch: 'abc' is not a number"},
  {"eval ppl", "max-windows -1", "eval ppl -m {M} --tokens {I} --max-windows -1", "--max-windows: must be at least 0"},
  {"eval ppl", "unknown device", "eval ppl -m {M} --tokens {I} --device tpu", "unknown device 'tpu'"},
  {"eval ppl", "logits-out with kv-cache", "eval ppl -m {M} --tokens {I} --logits-out {O} --kv-cache f16", "--logits-out: writes the logits of the batched forward", kModel},
  {"eval ppl", "logits-out uncreatable", "eval ppl -m {M} --tokens {I} --logits-out /proc/lowbit-no/l.f32", "/proc/lowbit-no/l.f32", kModel},
  {"eval ppl", "logits-out, too few tokens", "eval ppl -m {M} --tokens {D}/few.i32 --logits-out {O}", "shorter than one window", kModel},
  {"eval ppl", "second half of ctx 3", "eval ppl -m {M} --tokens {I} --ctx 3 --score-second-half", "--score-second-half needs --ctx of at least 4", kModel},
  {"eval ppl", "rotate givens", "eval ppl -m {M} --tokens {I} --rotate givens", "--rotate: givens not in"},
  {"eval ppl", "rotate-seed -1", "eval ppl -m {M} --tokens {I} --rotate-seed -1", "--rotate-seed: must be at least 0"},
  {"eval ppl", "act int3", "eval ppl -m {M} --tokens {I} --act int3", "--act: 'int3' is not an activation format"},
  {"eval ppl", "act empty", "eval ppl -m {M} --tokens {I} --act ''", "--act: '' is not an activation format"},
  {"eval ppl", "act fp6", "eval ppl -m {M} --tokens {I} --act fp6", "--act: 'fp6' is not an activation format"},
  {"eval ppl", "act fp4 without block kind", "eval ppl -m {M} --tokens {I} --act fp4", "--act: 'fp4' is not an activation format"},
  {"eval ppl", "act-clip 0", "eval ppl -m {M} --tokens {I} --act int8 --act-clip 0", "--act-clip: must be greater than 0"},
  {"eval ppl", "act-clip 1.5", "eval ppl -m {M} --tokens {I} --act int8 --act-clip 1.5", "--act-clip: must be between 0 and 1"},
  {"eval ppl", "act-clip nan", "eval ppl -m {M} --tokens {I} --act int8 --act-clip nan", "--act-clip: 'nan' is not a finite number"},
  {"eval ppl", "act-clip without act", "eval ppl -m {M} --tokens {I} --act-clip 0.9", "--act-clip: no activation quantization", kModel},
  {"eval ppl", "act-clip word", "eval ppl -m {M} --tokens {I} --act int8 --act-clip best", "--act-clip: 'best' is not a number"},
  {"eval ppl", "act-clip search", "eval ppl -m {M} --tokens {I} --act int8 --act-clip search", "--act-clip search: only `lowbit quantize` searches", kModel},
  {"eval ppl", "kv-quant int8", "eval ppl -m {M} --tokens {I} --kv-quant int8", "--kv-quant: 'int8' is not a KV-cache quantization"},
  {"eval ppl", "kv-quant cq3", "eval ppl -m {M} --tokens {I} --kv-quant cq3", "--kv-quant: 'cq3' is not a KV-cache quantization"},
  {"eval ppl", "kv-codebook f8", "eval ppl -m {M} --tokens {I} --kv-quant cq1 --kv-codebook f8", "--kv-codebook: f8 not in {f16,f32}"},
  {"eval ppl", "kv-quant cq1 without codebooks", "eval ppl -m {M} --tokens {I} --kv-quant cq1", "--kv-quant cq1: this model has no cq1 codebooks", kModel},
  {"eval ppl", "kv-quant wkv3", "eval ppl -m {M} --tokens {I} --kv-quant wkv3", "--kv-quant: 'wkv3' is not a KV-cache quantization"},
  {"eval ppl", "kv-quant wkv4 without smoothing", "eval ppl -m {M} --tokens {I} --kv-quant wkv4", "--kv-quant wkv4: this model has no wkv4 smoothing", kModel},
  {"eval ppl", "kv-calib wkv2 missing file", "eval ppl -m {M} --tokens {I} --kv-quant wkv2 --kv-calib {D}/missing.txt", "missing.txt: cannot open", kModel},
  {"eval ppl", "kv-calib without cq", "eval ppl -m {M} --tokens {I} --kv-calib {D}/text.txt", "--kv-calib learns the codebooks of coupled KV quantization", kModel},
  {"eval ppl", "kv-calib missing file", "eval ppl -m {M} --tokens {I} --kv-quant cq1 --kv-calib {D}/missing.txt", "missing.txt: cannot open", kModel},
  {"eval ppl", "kv-group 0", "eval ppl -m {M} --tokens {I} --kv-quant int4 --kv-group 0", "--kv-group: must be between 1 and 4096"},
  {"eval ppl", "kv-group 5000", "eval ppl -m {M} --tokens {I} --kv-quant int4 --kv-group 5000", "--kv-group: must be between 1 and 4096"},
  {"eval ppl", "kv-window -1", "eval ppl -m {M} --tokens {I} --kv-quant int4 --kv-window -1", "--kv-window: must be at least 0"},
  {"eval ppl", "kv-window huge", "eval ppl -m {M} --tokens {I} --kv-quant int4 --kv-window 99999999999", "KV-cache window", kModel},
  {"eval ppl", "kv-window without kv-quant", "eval ppl -m {M} --tokens {I} --kv-window 5", "--kv-window: no KV-cache quantization", kModel},
  {"eval ppl", "kv-quant on a q8 cache", "eval ppl -m {M} --tokens {I} --kv-quant int4 --kv-cache q8", "the cache must be f32 or f16, not q8", kModel},
  {"eval ppl", "kv-cache int3", "eval ppl -m {M} --tokens {I} --kv-cache int3", "--kv-cache: 'int3' is not a KV cache type"},
  {"eval ppl", "packed kv-cache and kv-quant", "eval ppl -m {M} --tokens {I} --kv-cache int4 --kv-quant int2", "give one of them", kModel},
  {"eval ppl", "packed kv-cache on cuda", "eval ppl -m {M} --tokens {I} --kv-cache int4 --device cuda", "the packed KIVI cache runs on the CPU only"},
  {"eval ppl", "packed kv-cache, kv-group 0", "eval ppl -m {M} --tokens {I} --kv-cache int2 --kv-group 0", "--kv-group: must be between 1 and 4096"},
  {"eval ppl", "packed kv-cache, kv-window -1", "eval ppl -m {M} --tokens {I} --kv-cache int2 --kv-window -1", "--kv-window: must be at least 0"},
  {"eval ppl", "rotate a quantized model", "eval ppl -m {Q} --tokens {I} --rotate hadamard", "--rotate: the model is quantized", kQuantized},
  // --- eval tasks
  {"eval tasks", "missing model", "eval tasks -m {D}/missing.bin --tokenizer {T}", "missing.bin: no such file"},
  {"eval tasks", "empty task list", "eval tasks -m {M} --tokenizer {T} --tasks ''", "--tasks: must not be empty"},
  {"eval tasks", "missing task", "eval tasks -m {M} --tokenizer {T} --tasks nope --data-dir {D}", "nope.jsonl: cannot open", kModel},
  {"eval tasks", "text file as task", "eval tasks -m {M} --tokenizer {T} --tasks {D}/text.txt", "text.txt:1: not a JSON object", kModel},
  {"eval tasks", "kv-window -1", "eval tasks -m {M} --tokenizer {T} --kv-quant int4 --kv-window -1", "--kv-window: must be at least 0"},
  {"eval tasks", "kv-window without kv-quant", "eval tasks -m {M} --tokenizer {T} --kv-window 0", "--kv-window: no KV-cache quantization", kModel},
  {"eval tasks", "act-clip search", "eval tasks -m {M} --tokenizer {T} --act int4 --act-clip search", "--act-clip search: only `lowbit quantize` searches", kModel},
  {"eval tasks", "limit -1", "eval tasks -m {M} --tokenizer {T} --limit -1", "--limit: must be at least 0"},
  {"eval tasks", "random tokenizer", "eval tasks -m {M} --tokenizer {D}/random.bin --tasks x --data-dir {D}", "random.bin", kModel},
  {"eval tasks", "act int3", "eval tasks -m {M} --tokenizer {T} --act int3", "--act: 'int3' is not an activation format"},
  {"eval tasks", "kv-quant int3", "eval tasks -m {M} --tokenizer {T} --kv-quant int3", "--kv-quant: 'int3' is not a KV-cache quantization"},
  {"eval tasks", "rotate a quantized model", "eval tasks -m {Q} --tokenizer {T} --rotate hadamard --tasks x --data-dir {D}", "--rotate: the model is quantized", kQuantized},
  // --- generate
  {"generate", "missing model", "generate -m {D}/missing.bin --tokenizer {T}", "missing.bin: no such file"},
  {"generate", "truncated model", "generate -m {D}/trunc.bin --tokenizer {T}", "trunc.bin"},
  {"generate", "slice 5", "generate -m {Q} --tokenizer {T} --slice 5", "--slice: 5 not in {2,3,4,8}", kQuantized},
  {"generate", "slice of a non-parent", "generate -m {Q} --tokenizer {T} --slice 2", "not a Matryoshka parent", kQuantized},
  {"generate", "slice of a dense model", "generate -m {M} --tokenizer {T} --slice 4", "is not a lowbit quantized checkpoint", kModel},
  {"generate", "no tokenizer", "generate -m {M}", "no tokenizer", kModel},
  {"generate", "random tokenizer", "generate -m {M} --tokenizer {D}/random.bin", "random.bin", kModel},
  {"generate", "empty tokenizer", "generate -m {M} --tokenizer {D}/empty", "empty: unknown tokenizer format", kModel},
  {"generate", "model as tokenizer", "generate -m {M} --tokenizer {M}", "[tokenizer]", kModel},
  {"generate", "temperature nan", "generate -m {M} --tokenizer {T} --temperature nan", "--temperature: 'nan' is not a finite number"},
  {"generate", "temperature inf", "generate -m {M} --tokenizer {T} -t inf", "--temperature: 'inf' is not a finite number"},
  {"generate", "temperature -1", "generate -m {M} --tokenizer {T} -t -1", "--temperature: must be at least 0"},
  {"generate", "top-p 2", "generate -m {M} --tokenizer {T} --top-p 2", "--top-p: must be between 0 and 1"},
  {"generate", "steps 0", "generate -m {M} --tokenizer {T} -n 0", "--steps: must be at least 1"},
  {"generate", "rotate bogus", "generate -m {M} --tokenizer {T} --rotate bogus", "--rotate: bogus not in"},
  {"generate", "act int2", "generate -m {M} --tokenizer {T} --act int2", "--act: 'int2' is not an activation format"},
  {"generate", "kv-quant int1", "generate -m {M} --tokenizer {T} --kv-quant int1", "--kv-quant: 'int1' is not a KV-cache quantization"},
  {"generate", "kv-group without kv-quant", "generate -m {M} --tokenizer {T} --kv-group 8", "--kv-group: no KV-cache quantization", kModel},
  {"generate", "kv-cache f8", "generate -m {M} --tokenizer {T} --kv-cache f8", "--kv-cache: 'f8' is not a KV cache type"},
  {"generate", "kv-cache empty", "generate -m {M} --tokenizer {T} --kv-cache ''", "--kv-cache: '' is not a KV cache type"},
  {"generate", "kv-cache no value", "generate -m {M} --tokenizer {T} --kv-cache", "--kv-cache"},
  {"generate", "packed kv-cache on cuda", "generate -m {M} --tokenizer {T} --kv-cache int2 --device cuda", "the packed KIVI cache runs on the CPU only"},
  {"generate", "matmul fast", "generate -m {M} --tokenizer {T} --matmul fast", "--matmul: 'fast': expected auto, int8, exact or reference"},
  {"generate", "matmul INT8", "generate -m {M} --tokenizer {T} --matmul INT8", "--matmul: 'INT8'"},
  {"generate", "f32-vocab with a value", "generate -m {M} --tokenizer {T} --f32-vocab=maybe", "--f32-vocab"},
  {"generate", "stdout full", "generate -m {M} --tokenizer {T} -n 8 > /dev/full", "writing to standard output", kModel},
  {"generate", "tp 0", "generate -m {M} --tokenizer {T} --tp 0", "--tp: must be"},
  {"generate", "tp not a number", "generate -m {M} --tokenizer {T} --tp two", "--tp: 'two' is not a number"},
  {"generate", "tp unknown comm backend", "generate -m {M} --tokenizer {T} --tp 2 --comm-backend mpi", "--comm-backend: mpi not in"},
  {"generate", "tp 3 for 8 heads", "generate -m {M} --tokenizer {T} -n 8 --tp 3", "tensor parallelism over 3 ranks: 3 does not divide n_heads = 8", kModel},
  {"generate", "tp with a rotation", "generate -m {M} --tokenizer {T} -n 8 --tp 2 --rotate hadamard", "tensor parallelism over 2 ranks: rotation and activation / KV-cache quantization", kModel},
  // --- serve (every row fails before the server listens)
  {"serve", "missing model", "serve -m {D}/missing.bin --tokenizer {T} --port 0", "missing.bin: no such file"},
  {"serve", "random model", "serve -m {D}/random.bin --tokenizer {T} --port 0", "random.bin"},
  {"serve", "no tokenizer", "serve -m {M} --port 0", "no tokenizer", kModel},
  {"serve", "random tokenizer", "serve -m {M} --tokenizer {D}/random.bin --port 0", "random.bin", kModel},
  {"serve", "port -1", "serve -m {M} --tokenizer {T} --port -1", "--port"},
  {"serve", "port 70000", "serve -m {M} --tokenizer {T} --port 70000", "--port"},
  {"serve", "port not a number", "serve -m {M} --tokenizer {T} --port http", "--port"},
  {"serve", "parallel 0", "serve -m {M} --tokenizer {T} --parallel 0", "--parallel"},
  {"serve", "ctx 0", "serve -m {M} --tokenizer {T} --ctx 0", "--ctx: must be at least 1"},
  {"serve", "ctx over the model's", "serve -m {M} --tokenizer {T} --ctx 100000 --port 0", "more than the model's context length", kModel},
  {"serve", "empty api key", "serve -m {M} --tokenizer {T} --api-key ''", "--api-key"},
  {"serve", "empty host", "serve -m {M} --tokenizer {T} --host ''", "--host"},
  {"serve", "host not of this machine", "serve -m {M} --tokenizer {T} --host 203.0.113.7 --port 0", "cannot bind", kModel},
  {"serve", "prefill-chunk 0", "serve -m {M} --tokenizer {T} --prefill-chunk 0", "--prefill-chunk: must be at least 1"},
  {"serve", "prefill-chunk not a number", "serve -m {M} --tokenizer {T} --prefill-chunk big", "--prefill-chunk"},
  {"serve", "batch-tokens 0", "serve -m {M} --tokenizer {T} --batch-tokens 0", "--batch-tokens: must be at least 1"},
  {"serve", "batch-tokens below prefill-chunk", "serve -m {M} --tokenizer {T} --prefill-chunk 64 --batch-tokens 32 --port 0",
   "--batch-tokens (32) must be at least --prefill-chunk (64)"},
  {"serve", "max-body 10", "serve -m {M} --tokenizer {T} --max-body 10", "--max-body: must be at least 64"},
  {"serve", "max-queue 0", "serve -m {M} --tokenizer {T} --max-queue 0", "--max-queue: must be at least 1"},
  {"serve", "drain-timeout nan", "serve -m {M} --tokenizer {T} --drain-timeout nan", "--drain-timeout: 'nan' is not a finite number"},
  {"serve", "bad kv-cache", "serve -m {M} --tokenizer {T} --kv-cache q4", "--kv-cache"},
  {"serve", "packed kv-cache on cuda", "serve -m {M} --tokenizer {T} --kv-cache int4 --device cuda", "the packed KIVI cache runs on the CPU only"},
  {"serve", "bad matmul", "serve -m {M} --tokenizer {T} --matmul fast", "--matmul"},
  {"serve", "unknown device", "serve -m {M} --tokenizer {T} --device tpu --port 0", "unknown device 'tpu'"},
  {"serve", "tp 0", "serve -m {M} --tokenizer {T} --tp 0", "--tp: must be"},
  {"serve", "tp 3 for 8 heads", "serve -m {M} --tokenizer {T} --port 0 --tp 3", "tensor parallelism over 3 ranks: 3 does not divide n_heads = 8", kModel},
  // --- run (standard input redirected: never the terminal of the test)
  {"run", "missing model", "run -m {D}/missing.bin --tokenizer {T} < {D}/text.txt", "missing.bin: no such file"},
  {"run", "no tokenizer", "run -m {M} < {D}/text.txt", "no tokenizer", kModel},
  {"run", "empty input", "run -m {M} --tokenizer {T} < {D}/empty", "standard input is empty", kModel},
  {"run", "temperature nan", "run -m {M} --tokenizer {T} -t nan < {D}/text.txt", "--temperature: 'nan' is not a finite number"},
  {"run", "temperature 3", "run -m {M} --tokenizer {T} -t 3 < {D}/text.txt", "--temperature: must be between 0 and 2"},
  {"run", "top-p 0", "run -m {M} --tokenizer {T} --top-p 0 < {D}/text.txt", "--top-p"},
  {"run", "max-tokens 0", "run -m {M} --tokenizer {T} --max-tokens 0 < {D}/text.txt", "--max-tokens: must be at least 1"},
  {"run", "ctx over the model's", "run -m {M} --tokenizer {T} --ctx 100000 < {D}/text.txt", "more than the model's context length", kModel},
  {"run", "bad kv-cache", "run -m {M} --tokenizer {T} --kv-cache q4 < {D}/text.txt", "--kv-cache"},
  {"run", "packed kv-cache on cuda", "run -m {M} --tokenizer {T} --kv-cache int2 --device cuda < {D}/text.txt", "the packed KIVI cache runs on the CPU only"},
  {"run", "stdout full", "run -m {M} --tokenizer {T} --max-tokens 4 < {D}/text.txt > /dev/full", "writing to standard output", kModel},
  // --- bench
  {"bench", "missing model", "bench -m {D}/missing.bin", "missing.bin: no such file"},
  {"bench", "truncated model", "bench -m {D}/trunc.bin", "trunc.bin"},
  {"bench", "random model", "bench -m {D}/random.bin", "random.bin"},
  {"bench", "repetitions 0", "bench -m {M} -r 0", "--repetitions: must be at least 1"},
  {"bench", "prompt -1", "bench -m {M} -p -1", "--n-prompt: must be at least 0"},
  {"bench", "threads 0", "bench -m {M} --threads 0", "--threads"},
  {"bench", "act fp4", "bench -m {M} --act fp4", "--act: 'fp4' is not an activation format"},
  {"bench", "kv-quant q2", "bench -m {M} --kv-quant q2", "--kv-quant: 'q2' is not a KV-cache quantization"},
  {"bench", "rotate a quantized model", "bench -m {Q} --rotate hadamard", "--rotate: the model is quantized", kQuantized},
  {"bench", "kv-cache q4", "bench -m {M} --kv-cache q4", "--kv-cache: 'q4' is not a KV cache type"},
  {"bench", "packed kv-cache and kv-quant", "bench -m {M} --kv-cache int2 --kv-quant int4", "give one of them", kModel},
  {"bench", "packed kv-cache on cuda", "bench -m {M} --kv-cache int4 --device cuda", "the packed KIVI cache runs on the CPU only"},
  {"bench", "matmul bogus", "bench -m {M} --matmul bogus", "--matmul: 'bogus'"},
  {"bench", "depth -1", "bench -m {M} -d -1", "--depth: must be at least 0"},
  {"bench", "depth not a number", "bench -m {M} --depth x", "--depth: 'x' is not a number"},
  {"bench", "batch -1", "bench -m {M} -b -1", "--batch: must be at least 0"},
  {"bench", "batch not a number", "bench -m {M} --batch x", "--batch: 'x' is not a number"},
  {"bench", "f32-vocab with a value", "bench -m {M} --f32-vocab=maybe", "--f32-vocab"},
  {"bench", "stdout full", "bench -m {M} -p 4 -n 2 -r 1 > /dev/full", "writing to standard output", kModel},
  {"bench", "tp 300", "bench -m {M} --tp 300", "--tp: must be"},
  {"bench", "tp not a number", "bench -m {M} --tp x", "--tp: 'x' is not a number"},
  {"bench", "tp 3 for 8 heads", "bench -m {M} -p 4 -n 2 -r 1 --tp 3", "tensor parallelism over 3 ranks: 3 does not divide n_heads = 8", kModel},
  {"bench", "tp 4 cuts int4g32's o_proj inside a group", "bench -m {Q} -p 4 -n 2 -r 1 --tp 4", "self_attn.o_proj (int4g32): a rank's 2 heads are 16 input columns, not a whole number of its groups of 32", kQuantized},
  // --- export
  {"export", "missing dir", "export -m {D}/missing --to {O}.gguf", "missing"},
  {"export", "not a quantized dir", "export -m {D} --to {O}.gguf", "not a lowbit quantized directory"},
  {"export", "output without .gguf", "export -m {Q} --to {O}", "must end in .gguf", kQuantized},
  {"export", "lowbit-only format", "export -m {Q} --to {O}.gguf", "which has no GGUF equivalent", kQuantized},
  {"export", "unknown layout", "export -m {Q} --to {O} --layout exl2", "--layout exl2: unknown layout (known: gptq, awq)", kQuantized},
  {"export", "gptq layout to a .gguf name", "export -m {Q} --to {O}.gguf --layout gptq", "writes a directory, not a .gguf file", kQuantized},
  {"export", "gptq layout, not a quantized dir", "export -m {D} --to {O} --layout gptq", "not a lowbit quantized directory"},
  {"export", "gptq layout, output is a file", "export -m {Q} --to {D}/file --layout gptq", "exists and is not a directory", kQuantized},
  {"export", "gptq layout, output = input", "export -m {Q} --to {Q} --layout gptq", "is the input directory", kQuantized},
  {"export", "gptq layout, 172 inputs", "export -m {Q} --to {O} --layout gptq", "has 172 inputs; the gptq layout packs 4-bit codes along the input and needs a multiple of 8", kQuantized},
  {"export", "awq layout, 172 inputs", "export -m {Q} --to {O} --layout awq", "not a multiple of the group size 32", kQuantized},
  // --- tokenize
  {"tokenize", "missing tokenizer", "tokenize -t {D}/missing < /dev/null", "missing: no such file"},
  {"tokenize", "empty tokenizer", "tokenize -t {D}/empty < /dev/null", "empty: unknown tokenizer format"},
  {"tokenize", "random tokenizer", "tokenize -t {D}/random.bin < /dev/null", "random.bin: not a llama2.c tokenizer"},
  {"tokenize", "text file as tokenizer", "tokenize -t {D}/text.txt < /dev/null", "text.txt: unknown tokenizer format"},
  {"tokenize", "bad id on stdin", "tokenize -t {T} --decode < {D}/text.txt", "stdin line 1", kModel},
  {"tokenize", "stdout full", "tokenize -t {T} < {D}/text.txt > /dev/full", "writing to standard output", kModel},
  // --- comm (issue 20: the collectives check; the launcher environment's rows are in tests/comm)
  {"comm", "gpus 0", "comm --gpus 0", "--gpus: must be"},
  {"comm", "gpus not a number", "comm --gpus abc", "--gpus: 'abc' is not a number"},
  {"comm", "gpus 300", "comm --gpus 300", "--gpus: must be"},
  {"comm", "elements 0", "comm --elements 0", "--elements: must be at least 1"},
  {"comm", "iters -1", "comm --iters -1", "--iters: must be at least 1"},
  {"comm", "unknown backend", "comm --comm-backend mpi", "--comm-backend: mpi not in"},
  {"comm", "unknown device", "comm --device tpu", "unknown device 'tpu'"},
  // --- quantize
  {"quantize", "gpus 0", "quantize -m {M} --method rtn --gpus 0 -o {O}", "--gpus: must be"},
  {"quantize", "gpus -2", "quantize -m {M} --method rtn --gpus -2 -o {O}", "--gpus: must be"},
  {"quantize", "gpus not a number", "quantize -m {M} --method rtn --gpus two -o {O}", "--gpus: 'two' is not a number"},
  {"quantize", "unknown comm backend", "quantize -m {M} --method rtn --comm-backend mpi -o {O}", "--comm-backend: mpi not in"},
  {"quantize", "gpus 2, rsq", "quantize -m {M} --method rsq --calib-tokens {I} --nsamples 4 --seqlen 32 --gpus 2 -o {O}", "--method rsq has no data-parallel calibration", kModel},
  {"quantize", "gpus 3, 2 windows", "quantize -m {M} --method gptq --calib-tokens {I} --nsamples 2 --seqlen 32 --gpus 3 -o {O}", "--nsamples: 2 items cannot be split over 3 ranks", kModel},
  {"quantize", "kv-quant cq1 without calib", "quantize -m {M} --method rtn --kv-quant cq1 -o {O}", "--kv-quant cq1 needs calibration data", kModel},
  {"quantize", "kv-quant wkv2 without calib", "quantize -m {M} --method rtn --kv-quant wkv2 -o {O}", "--kv-quant wkv2 needs calibration data", kModel},
  {"quantize", "kv-calib", "quantize -m {M} --method rtn --kv-quant cq1 --calib {D}/text.txt --kv-calib {D}/text.txt -o {O}", "--kv-calib: quantize learns", kModel},
  {"quantize", "missing model", "quantize -m {D}/missing.bin --method rtn -o {O}", "missing.bin: no such file"},
  {"quantize", "random model", "quantize -m {D}/random.bin --method rtn -o {O}", "random.bin"},
  {"quantize", "truncated model", "quantize -m {D}/trunc.bin --method rtn -o {O}", "trunc.bin"},
  {"quantize", "empty format", "quantize -m {M} --format '' -o {O}", "--format: must not be empty"},
  {"quantize", "unknown format", "quantize -m {M} --method rtn --format int9 -o {O}", "unknown quantization format 'int9'", kModel},
  {"quantize", "bits budget with format", "quantize -m {M} --method rtn --bits-budget 3 --format int4g32 -o {O}", "drop --format int4g32"},
  {"quantize", "bits budget with preset", "quantize -m {M} --method rtn --bits-budget 3 --preset q4_0 -o {O}", "give it without --preset"},
  {"quantize", "bits budget 0", "quantize -m {M} --method rtn --bits-budget 0 -o {O}", "--bits-budget"},
  {"quantize", "bits budget nan", "quantize -m {M} --method rtn --bits-budget nan -o {O}", "--bits-budget"},
  {"quantize", "mp-score unknown", "quantize -m {M} --method rtn --bits-budget 3 --mp-score kurtosis -o {O}", "--mp-score must be 'lim'"},
  {"quantize", "mp-formats without budget", "quantize -m {M} --method rtn --mp-formats int2g32,int4g32 -o {O}", "give --bits-budget B too"},
  {"quantize", "mp-samples 0", "quantize -m {M} --method rtn --bits-budget 3 --mp-samples 0 -o {O}", "--mp-samples: must be at least 1"},
  {"quantize", "mp-formats unknown", "quantize -m {M} --method rtn --bits-budget 3 --mp-formats int9,int4g32 -o {O}", "unknown quantization format 'int9'"},
  {"quantize", "mp-formats one level", "quantize -m {M} --method rtn --tokenizer {T} --calib {D}/text.txt --bits-budget 3 --mp-formats int4g32 -o {O}", "give at least two formats", kModel},
  {"quantize", "mp-formats decreasing", "quantize -m {M} --method rtn --tokenizer {T} --calib {D}/text.txt --bits-budget 3 --mp-formats int4g32,int2g32 -o {O}", "list the levels in increasing order", kModel},
  {"quantize", "mp-formats empty entry", "quantize -m {M} --method rtn --tokenizer {T} --calib {D}/text.txt --bits-budget 3 --mp-formats int2g32,,int4g32 -o {O}", "an empty entry", kModel},
  {"quantize", "bits budget below the lowest level", "quantize -m {M} --method rtn --tokenizer {T} --calib {D}/text.txt --bits-budget 2 --mp-formats int2g32,int4g32 -o {O}", "is below int2g32's", kModel},
  {"quantize", "smooth 1.5", "quantize -m {M} --method rtn --smooth 1.5 -o {O}", "--smooth"},
  {"quantize", "smooth nan", "quantize -m {M} --method rtn --smooth nan -o {O}", "--smooth"},
  {"quantize", "smooth without calibration", "quantize -m {M} --method rtn --smooth 0.5 -o {O}", "--smooth needs calibration data", kModel},
  {"quantize", "smooth word", "quantize -m {M} --method rtn --smooth strong -o {O}", "expected a number in [0, 1] or 'auto'"},
  {"quantize", "smooth auto without calibration", "quantize -m {M} --method rtn --smooth auto -o {O}", "--smooth needs calibration data", kModel},
  {"quantize", "smooth-act without auto", "quantize -m {M} --method rtn --smooth 0.5 --smooth-act int4 -o {O}", "give --smooth auto"},
  {"quantize", "smooth-act unknown", "quantize -m {M} --method rtn --smooth auto --smooth-act int3 -o {O}", "--smooth-act"},
  {"quantize", "lqer rank 0", "quantize -m {M} --method rtn --lqer-rank 0 -o {O}", "--lqer-rank: must be at least 1"},
  {"quantize", "lqer rank word", "quantize -m {M} --method rtn --lqer-rank big -o {O}", "--lqer-rank"},
  {"quantize", "lqer scale unknown", "quantize -m {M} --method rtn --lqer-rank 4 --lqer-scale max -o {O}", "--lqer-scale must be 'act'"},
  {"quantize", "lqer scale without rank", "quantize -m {M} --method rtn --lqer-scale none -o {O}", "give --lqer-rank K"},
  {"quantize", "lqer act without calibration", "quantize -m {M} --method rtn --lqer-rank 4 -o {O}", "--lqer-scale act needs calibration data", kModel},
  {"quantize", "lqer with apiq", "quantize -m {M} --method apiq --lqer-rank 4 --lqer-scale none -o {O}", "trains its own low-rank adapters"},
  {"quantize", "lqer into gguf", "quantize -m {M} --method rtn --format q4_0 --lqer-rank 4 --lqer-scale none -o {O}.gguf", "GGUF cannot hold LQER"},
  {"quantize", "lim without calibration", "quantize -m {M} --method rtn --bits-budget 4 --mp-formats int2g32,int4g32 -o {O}", "--mp-score lim needs calibration data", kModel},
  {"quantize", "unknown method", "quantize -m {M} --method bogus --calib-tokens {I} -o {O}", "unknown --method 'bogus'", kModel},
  {"quantize", "no calibration", "quantize -m {M} --method gptq -o {O}", "needs calibration data", kModel},
  {"quantize", "empty calibration", "quantize -m {M} --calib-tokens {D}/empty -o {O}", "calibration data holds no tokens", kModel},
  {"quantize", "odd calibration", "quantize -m {M} --calib-tokens {D}/odd.i32 -o {O}", "not a whole number of int32", kModel},
  {"quantize", "too little calibration", "quantize -m {M} --calib-tokens {D}/few.i32 -o {O}", "fewer than one window", kModel},
  {"quantize", "calib and calib-tokens", "quantize -m {M} --calib {D}/text.txt --calib-tokens {I} -o {O}", "not both"},
  {"quantize", "weighted-round with gptq", "quantize -m {M} --method gptq --format q4_0 --weighted-round --calib-tokens {I} -o {O}", "--weighted-round applies to --method rtn and awq"},
  {"quantize", "weighted-round with norm-tweak base gptq", "quantize -m {M} --method norm-tweak --base gptq --format q4_0 --weighted-round --calib-tokens {I} -o {O}", "not to --base gptq"},
  {"quantize", "weighted-round on a lowbit format", "quantize -m {M} --method awq --format int4g128 --weighted-round --calib-tokens {I} -o {O}", "format int4g128 is not a ggml block type"},
  {"quantize", "weighted-round without calibration", "quantize -m {M} --method rtn --format q4_0 --weighted-round -o {O}", "--weighted-round needs calibration data"},
  {"quantize", "rotate with awq", "quantize -m {M} --method awq --calib-tokens {I} --rotate hadamard -o {O}", "supported with --method rtn, gptq, rsq or comq"},
  {"quantize", "rotate into gguf", "quantize -m {M} --method rtn --format q4_0 --rotate hadamard -o {O}.gguf", "GGUF cannot carry"},
  {"quantize", "act into gguf", "quantize -m {M} --method rtn --format q4_0 --act int8 -o {O}.gguf", "GGUF cannot carry"},
  {"quantize", "rotate on cuda", "quantize -m {M} --method rtn --rotate hadamard --device cuda -o {O}", "run on the CPU (--device cpu)"},
  {"quantize", "rotate unknown", "quantize -m {M} --method rtn --rotate random -o {O}", "--rotate: random not in"},
  {"quantize", "act int16", "quantize -m {M} --method rtn --act int16 -o {O}", "--act: 'int16' is not an activation format"},
  {"quantize", "act-clip 2", "quantize -m {M} --method rtn --act int4 --act-clip 2 -o {O}", "--act-clip: must be between 0 and 1"},
  {"quantize", "act-clip search without calibration", "quantize -m {M} --method rtn --act int4 --act-clip search -o {O}", "--act-clip search needs calibration data", kModel},
  {"quantize", "act-clip search without act", "quantize -m {M} --method rtn --act-clip search --calib {D}/text.txt -o {O}", "--act-clip: no activation quantization", kModel},
  {"quantize", "kv-quant int3", "quantize -m {M} --method rtn --kv-quant int3 -o {O}", "--kv-quant: 'int3' is not a KV-cache quantization"},
  {"quantize", "kv-window without kv-quant", "quantize -m {M} --method rtn --kv-window 4 -o {O}", "--kv-window: no KV-cache quantization", kModel},
  {"quantize", "nsamples 0", "quantize -m {M} --nsamples 0 -o {O}", "--nsamples: must be at least 1"},
  {"quantize", "seqlen 1", "quantize -m {M} --seqlen 1 -o {O}", "--seqlen: must be at least 2"},
  {"quantize", "batch 0", "quantize -m {M} --batch 0 -o {O}", "--batch: must be at least 1"},
  {"quantize", "preset and format-map", "quantize -m {M} --method rtn --preset q4_k_m --format-map {D}/badmap.txt -o {O}", "give --preset or --format-map, not both"},
  {"quantize", "preset and format", "quantize -m {M} --method rtn --preset q4_k_m --format q4_0 -o {O}", "--preset q4_k_m chooses every tensor's format; drop --format q4_0"},
  {"quantize", "unknown preset", "quantize -m {M} --method rtn --preset q4_k_z -o {O}", "--preset: unknown preset 'q4_k_z' (known: q4_0,"},
  {"quantize", "missing format map", "quantize -m {M} --method rtn --format-map {D}/missing.txt -o {O}", "missing.txt: cannot open the format map"},
  {"quantize", "format map not a map", "quantize -m {M} --method rtn --format-map {D}/text.txt -o {O}", "text.txt:1: expected 'PATTERN [layers=A-B,...] FORMAT' or 'default FORMAT', got 4 words"},
  {"quantize", "format map unknown format", "quantize -m {M} --method rtn --format-map {D}/badmap.txt -o {O}", "badmap.txt:2: unknown format 'q9_9'"},
  {"quantize", "format map lowbit format into gguf", "quantize -m {M} --method rtn --format-map {D}/intmap.txt -o {O}.gguf", "puts model.layers.0.mlp.down_proj in int8pc, which GGUF cannot hold", kModel},
  {"quantize", "preset on 172-wide rows", "quantize -m {M} --method rtn --preset q4_k_m -o {O}.gguf", "blk.0.ffn_down has rows of 172 values, not a multiple of 32", kModel},
  {"quantize", "checkpoint seconds -1", "quantize -m {M} --checkpoint-seconds -1 -o {O}", "--checkpoint-seconds: must be at least 0"},
  {"quantize", "saliency-only without sapr", "quantize -m {M} --method apiq --saliency-only --saliency {O}.st -o {O}", "--saliency-only needs --method sapr", kModel},
  {"quantize", "saliency-only without file", "quantize -m {M} --method sapr --saliency-only -o {O}", "--saliency-only needs --method sapr and --saliency FILE", kModel},
  {"quantize", "percdamp nan", "quantize -m {M} --percdamp nan -o {O}", "--percdamp: 'nan' is not a finite number"},
  {"quantize", "hessian shrink 1.5", "quantize -m {M} --method gptq --hessian-shrink 1.5 -o {O}", "--hessian-shrink: must be between 0 and 1, got 1.5"},
  {"quantize", "epochs -1", "quantize -m {M} --method apiq --epochs -1 -o {O}", "--epochs: must be at least 0"},
  {"quantize", "rank -1", "quantize -m {M} --method apiq --rank -1 -o {O}", "--rank: must be at least 0"},
  {"quantize", "out = existing file", "quantize -m {M} --method rtn -o {D}/file", "exists and is not a directory", kModel},
  {"quantize", "out under a file", "quantize -m {M} --method rtn -o {D}/file/sub", "is not a directory", kModel},
  {"quantize", "unwritable out", "quantize -m {M} --method rtn -o {D}/ro/sub", "cannot create directory", kModel | kNotRoot},
  {"quantize", "uncreatable out", "quantize -m {M} --method rtn -o /proc/lowbit-no/out", "cannot create directory", kModel},
  {"quantize", "uncreatable state dir", "quantize -m {M} --method rtn --state-dir /proc/lowbit-no/state -o {O}", "--state-dir /proc/lowbit-no/state: cannot create directory", kModel},
  {"quantize", "apiq LoRA adapters into gguf", "quantize -m {M} --method apiq --format q4_0 --rank 4 -o {O}.gguf", "GGUF cannot hold separate LoRA adapters (--rank 4); give --rank 0", kModel},
  {"quantize", "apiq on iq4_nl", "quantize -m {M} --method apiq --format iq4_nl --rank 0 --calib-tokens {I} --nsamples 2 --seqlen 32 -o {O}", "or one of the ggml types q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k", kModel},
  {"quantize", "sapr on tq2_0", "quantize -m {M} --method sapr --format tq2_0 --rank 0 --calib-tokens {I} --nsamples 2 --seqlen 32 -o {O}", "format tq2_0 has no learnable clipping", kModel},
  // --format q4_k falls back as llama.cpp on stories260K's 64-wide rows (q5_0); its 172-wide ffn_down fits nothing
  {"quantize", "k-quant format on 172-wide rows", "quantize -m {M} --method apiq-layer --format q4_k --rank 0 --calib-tokens {I} --nsamples 2 --seqlen 32 -o {O}.gguf", "--format q4_k: blk.0.ffn_down has rows of 172 values, not a multiple of 32 (q4_k's fallback q5_0)", kModel},
  {"quantize", "gguf output, lowbit format", "quantize -m {M} --method rtn --format int4g32 -o {O}.gguf", "GGUF holds llama.cpp's block types only", kModel},
  {"quantize", "re-quantize", "quantize -m {Q} --method rtn -o {O}", "already a lowbit quantized model", kQuantized},
  {"quantize", "unknown method lists the registry", "quantize -m {M} --method bogus --calib-tokens {I} -o {O}", "registered: rtn, gptq, awq", kModel},
  {"quantize", "unknown norm-tweak base", "quantize -m {M} --method norm-tweak --base bogus --calib-tokens {I} -o {O}", "--base"},
  {"quantize", "base without norm-tweak", "quantize -m {M} --method gptq --base rtn --calib-tokens {I} -o {O}", "--base applies to --method norm-tweak, not gptq"},
  {"quantize", "nt-lr 0", "quantize -m {M} --method norm-tweak --nt-lr 0 -o {O}", "--nt-lr: must be greater than 0"},
  {"quantize", "nt-epochs -1", "quantize -m {M} --method norm-tweak --nt-epochs -1 -o {O}", "--nt-epochs: must be at least 0"},
  {"quantize", "nt-batch 0", "quantize -m {M} --method norm-tweak --nt-batch 0 -o {O}", "--nt-batch: must be at least 1"},
  {"quantize", "nt-lr-depth nan", "quantize -m {M} --method norm-tweak --nt-lr-depth nan -o {O}", "--nt-lr-depth"},
  {"quantize", "rsq-min 0", "quantize -m {M} --method rsq --rsq-min 0 -o {O}", "--rsq-min: must be greater than 0"},
  {"quantize", "rsq-max < rsq-min", "quantize -m {M} --method rsq --rsq-min 3 --rsq-max 2 --calib-tokens {I} -o {O}", "0 < --rsq-min <= --rsq-max", kModel},
  {"quantize", "rsq-min without rsq", "quantize -m {M} --method gptq --rsq-min 2 -o {O}", "--rsq-min applies to --method rsq, not gptq"},
  {"quantize", "guided-groups 0", "quantize -m {M} --method guided --guided-groups 0 -o {O}", "--guided-groups: must be at least 1"},
  {"quantize", "guided-groups not a number", "quantize -m {M} --method guided --guided-groups many -o {O}", "--guided-groups"},
  {"quantize", "guided-groups without guided", "quantize -m {M} --method gptq --guided-groups 2 -o {O}", "--guided-groups applies to --method guided, not gptq"},
  {"quantize", "guided without calibration", "quantize -m {M} --method guided -o {O}", "--method guided needs calibration data", kModel},
  {"quantize", "guided groups on a tensor-scale format", "quantize -m {M} --method guided --format ternary --calib-tokens {I} -o {O}", "guided: format ternary has one scale for the whole tensor", kModel},
  {"quantize", "comq-sweeps 0", "quantize -m {M} --method comq --comq-sweeps 0 -o {O}", "--comq-sweeps: must be at least 1"},
  {"quantize", "ptqtp on an integer format", "quantize -m {M} --method ptqtp --format int4g128 -o {O}", "ptqtp: format int4g128 is not a trit-plane format (use --format tp2g128)", kModel},
  {"quantize", "ptqtp on the ternary format", "quantize -m {M} --method ptqtp --format ternary -o {O}", "ptqtp: format ternary is not a trit-plane format", kModel},
  {"quantize", "ptqtp unknown format", "quantize -m {M} --method ptqtp --format tp2g64 -o {O}", "unknown quantization format 'tp2g64'", kModel},
  {"quantize", "gptq to onebit", "quantize -m {M} --method gptq --format onebit --calib-tokens {I} -o {O}", "--method gptq: format onebit is written by --method rtn (SVID, data-free) or by `lowbit qat --method onebit` only"},
  {"quantize", "ptq161-ratio above 1", "quantize -m {M} --method ptq161 --ptq161-ratio 1.5 -o {O}", "--ptq161-ratio"},
  {"quantize", "ptq161-ratio nan", "quantize -m {M} --method ptq161 --ptq161-ratio nan -o {O}", "--ptq161-ratio"},
  {"quantize", "ptq161-iters -1", "quantize -m {M} --method ptq161 --ptq161-iters -1 -o {O}", "--ptq161-iters: must be at least 0"},
  {"quantize", "ptq161-block-epochs -1", "quantize -m {M} --method ptq161 --ptq161-block-epochs -1 -o {O}", "--ptq161-block-epochs: must be at least 0"},
  {"quantize", "ptq161-ratio without ptq161", "quantize -m {M} --method gptq --ptq161-ratio 0.1 -o {O}", "--ptq161-ratio applies to --method ptq161, not gptq"},
  {"quantize", "ptq161 without calibration", "quantize -m {M} --method ptq161 -o {O}", "--method ptq161 needs calibration data", kModel},
  {"quantize", "ptq161 on another format", "quantize -m {M} --method ptq161 --format int2g64 --calib-tokens {I} -o {O}", "ptq161: format int2g64 is not ptq161", kModel},
  {"quantize", "ptq161 format under gptq", "quantize -m {M} --method gptq --format ptq161 --calib-tokens {I} -o {O}", "format ptq161 is written by --method ptq161", kModel},
  {"quantize", "tp-start unknown", "quantize -m {M} --method ptqtp --tp-start sign -o {O}", "--tp-start must be 'paper', 'grid' or 'both', got 'sign'", kModel},
  {"quantize", "tp-scales unknown", "quantize -m {M} --method ptqtp --tp-scales tensor -o {O}", "--tp-scales must be 'group' or 'row', got 'tensor'", kModel},
  {"quantize", "tp-start without ptqtp", "quantize -m {M} --method rtn --tp-start paper -o {O}", "--tp-start applies to --method ptqtp, not rtn"},
  {"quantize", "tp-scales without ptqtp", "quantize -m {M} --method gptq --tp-scales row -o {O}", "--tp-scales applies to --method ptqtp, not gptq"},
  {"quantize", "quip-seed -1", "quantize -m {M} --method quip --quip-seed -1 -o {O}", "--quip-seed: must be at least 0"},
  {"quantize", "quip-seed not a number", "quantize -m {M} --method quip --quip-seed abc -o {O}", "--quip-seed"},
  {"quantize", "quip-sides unknown", "quantize -m {M} --method quip --quip-sides left --calib-tokens {I} -o {O}", "--quip-sides must be 'both' or 'input', got 'left'", kModel},
  {"quantize", "quip-seed without quip", "quantize -m {M} --method gptq --quip-seed 3 -o {O}", "--quip-seed applies to --method quip, not gptq"},
  {"quantize", "quip-sides without quip", "quantize -m {M} --method rtn --quip-sides input -o {O}", "--quip-sides applies to --method quip, not rtn"},
  {"quantize", "quip without calibration", "quantize -m {M} --method quip -o {O}", "--method quip needs calibration data", kModel},
  {"quantize", "quip to gguf", "quantize -m {M} --method quip --format q4_0 --calib-tokens {I} -o {O}.gguf", "GGUF cannot carry --method quip's per-layer incoherence transforms", kModel},
  {"quantize", "quip with act", "quantize -m {M} --method quip --act int8 --calib-tokens {I} -o {O}", "--act int8: not with --method quip", kModel},
  {"quantize", "quip with lqer", "quantize -m {M} --method quip --lqer-rank 4 --calib-tokens {I} -o {O}", "--lqer-rank: not with --method quip", kModel},
  {"quantize", "quip on cuda", "quantize -m {M} --method quip --device cuda --calib-tokens {I} -o {O}", "--method quip: the incoherence transforms run on the CPU", kModel},
  {"quantize", "comq on a non-integer format", "quantize -m {M} --method comq --format mxfp4 --calib-tokens {I} -o {O}", "comq: format mxfp4 is not an integer format", kModel},
  {"quantize", "ar-iters 0", "quantize -m {M} --method adaround --ar-iters 0 -o {O}", "--ar-iters: must be at least 1"},
  {"quantize", "ar-lambda -1", "quantize -m {M} --method adaround --ar-lambda -1 -o {O}", "--ar-lambda: must be at least 0"},
  {"quantize", "ar-lambda nan", "quantize -m {M} --method adaround --ar-lambda nan -o {O}", "--ar-lambda"},
  {"quantize", "ar-iters without adaround", "quantize -m {M} --method comq --ar-iters 5 -o {O}", "--ar-iters applies to --method adaround, not comq"},
  {"quantize", "adaround on a non-integer format", "quantize -m {M} --method adaround --format nvfp4 --calib-tokens {I} -o {O}", "adaround: format nvfp4 is not an integer format", kModel},
  {"quantize", "adaround without data", "quantize -m {M} --method adaround -o {O}", "needs calibration data", kModel},
  {"quantize", "aq-iters 0", "quantize -m {M} --method adaquant --aq-iters 0 -o {O}", "--aq-iters: must be at least 1"},
  {"quantize", "aq-lr 0", "quantize -m {M} --method adaquant --aq-lr 0 -o {O}", "--aq-lr: must be greater than 0"},
  {"quantize", "aq-lr inf", "quantize -m {M} --method adaquant --aq-lr inf -o {O}", "--aq-lr"},
  {"quantize", "aq-lr without adaquant", "quantize -m {M} --method adaround --aq-lr 0.1 -o {O}", "--aq-lr applies to --method adaquant, not adaround"},
  {"quantize", "adaquant on a non-integer format", "quantize -m {M} --method adaquant --format mxfp4 --calib-tokens {I} -o {O}", "adaquant: format mxfp4 is not an integer format", kModel},
  {"quantize", "norm-tweak without data", "quantize -m {M} --method norm-tweak -o {O}", "needs calibration data", kModel},
  {"quantize", "stream unknown", "quantize -m {M} --method rtn --stream sometimes -o {O}", "--stream must be 'auto', 'on' or 'off', got 'sometimes'"},
  {"quantize", "stream on, llama2.c input", "quantize -m {M} --method rtn --stream on -o {O}", "--stream on: the input is not a Hugging Face safetensors directory", kModel},
  {"quantize", "stop-after-blocks negative", "quantize -m {M} --method rtn --stop-after-blocks -1 -o {O}", "--stop-after-blocks: must be at least 0"},
  // --- random-model
  {"random-model", "no output", "random-model --layers 2", "--out is required"},
  {"random-model", "unknown dtype", "random-model -o {O} --dtype f8", "--dtype must be 'bf16', 'f16' or 'f32', got 'f8'"},
  {"random-model", "zero layers", "random-model -o {O} --layers 0", "--layers: must be at least 1"},
  {"random-model", "nan std", "random-model -o {O} --std nan", "--std: 'nan' is not a finite number"},
  {"random-model", "zero std", "random-model -o {O} --std 0", "--std: must be greater than 0"},
  {"random-model", "zero shard size", "random-model -o {O} --shard-mb 0", "--shard-mb: must be greater than 0"},
  {"random-model", "missing config", "random-model -o {O} --config {D}/missing.json", "missing.json: cannot open"},
  {"random-model", "config not JSON", "random-model -o {O} --config {D}/text.txt", "text.txt: not valid JSON"},
  {"random-model", "heads do not divide dim", "random-model -o {O} --dim 10 --heads 3", "n_heads = 3 does not divide dim = 10"},
  {"random-model", "output is a file", "random-model -o {D}/file", "exists and is not a directory"},
  {"random-model", "uncreatable output", "random-model -o /proc/lowbit-no/x", "cannot create directory"},
  // --- qat
  {"qat", "missing model", "qat -m {D}/missing.bin --method lsq --train-tokens {I} -o {O}", "missing.bin: no such file"},
  {"qat", "no method", "qat -m {M} --train-tokens {I} -o {O}", "--method is required"},
  {"qat", "optimizer-bits 2", "qat -m {M} --method lsq --train-tokens {I} -o {O} --optimizer-bits 2", "--optimizer-bits: 2 not in {8,32}"},
  {"qat", "unknown method", "qat -m {M} --method bogus --train-tokens {I} -o {O}", "unknown qat --method 'bogus' (registered: lsq, efficientqat"},
  {"qat", "no training data", "qat -m {M} --method lsq -o {O}", "give --train TEXT"},
  {"qat", "unknown precision", "qat -m {M} --method lsq --train-tokens {I} -o {O} --precision fp6", "--precision: 'fp6' is not a training precision (choices: f32, bf16, fp8, mxfp4, nvfp4, fp4-dge, int4)"},
  {"qat", "fp4-dge on cuda", "qat -m {M} --method lsq --train-tokens {I} -o {O} --precision fp4-dge --device cuda", "qat: --precision fp4-dge has no CUDA body yet"},
  {"qat", "precision with l4q", "qat -m {M} --method l4q --format int3g64 --train-tokens {I} -o {O} --precision fp8", "qat --method l4q: --precision fp8 is not supported"},
  {"qat", "precision with bf16", "qat -m {M} --method lsq --train-tokens {I} -o {O} --precision fp8 --bf16 --device cuda", "is not combined with --bf16"},
  {"qat", "text and tokens", "qat -m {M} --method lsq --train {D}/text.txt --train-tokens {I} -o {O}", "not both"},
  {"qat", "missing text", "qat -m {M} --method lsq --train {D}/missing.txt --tokenizer {T} -o {O}", "missing.txt: cannot open", kModel},
  {"qat", "empty token file", "qat -m {M} --method lsq --train-tokens {D}/empty -o {O}", "training data holds no tokens", kModel},
  {"qat", "odd token file", "qat -m {M} --method lsq --train-tokens {D}/odd.i32 -o {O}", "not a whole number of int32", kModel},
  {"qat", "too few tokens", "qat -m {M} --method lsq --train-tokens {D}/few.i32 -o {O}", "are needed for --seqlen 256", kModel},
  {"qat", "too few tokens for block-ap", "qat -m {M} --method efficientqat --train-tokens {D}/few.i32 -o {O}", "Block-AP needs at least one window", kModel},
  {"qat", "unknown format", "qat -m {M} --method lsq --format int9 --train-tokens {I} -o {O}", "unknown quantization format 'int9'"},
  {"qat", "non-integer format", "qat -m {M} --method lsq --format q4_0 --train-tokens {I} -o {O}", "format q4_0 is not a uniform integer format"},
  {"qat", "empty format", "qat -m {M} --method lsq --format '' --train-tokens {I} -o {O}", "--format: must not be empty"},
  {"qat", "steps -1", "qat -m {M} --method lsq --steps -1 --train-tokens {I} -o {O}", "--steps: must be at least 0"},
  {"qat", "batch 0", "qat -m {M} --method lsq --batch 0 --train-tokens {I} -o {O}", "--batch: must be at least 1"},
  {"qat", "seqlen 0", "qat -m {M} --method lsq --seqlen 0 --train-tokens {I} -o {O}", "--seqlen: must be at least 1"},
  {"qat", "lr 0", "qat -m {M} --method lsq --lr 0 --train-tokens {I} -o {O}", "--lr: must be greater than 0"},
  {"qat", "lr nan", "qat -m {M} --method lsq --lr nan --train-tokens {I} -o {O}", "--lr: 'nan' is not a finite number"},
  {"qat", "quant-lr for efficientqat", "qat -m {M} --method efficientqat --quant-lr 1e-3 --train-tokens {I} -o {O}", "--quant-lr applies to --method lsq or paretoq or l4q or lr-qat or onebit, not efficientqat"},
  {"qat", "onebit with an int2 format", "qat -m {M} --method onebit --format int2g64 --train-tokens {I} -o {O}", "qat --method onebit: --format int2g64 cannot hold OneBit's sign bits and value vectors; use --format onebit"},
  {"qat", "lsq with the onebit format", "qat -m {M} --method lsq --format onebit --train-tokens {I} -o {O}", "format onebit is not a uniform integer format"},
  {"qat", "onebit on cuda", "qat -m {M} --method onebit --device cuda --train-tokens {I} -o {O}", "qat --method onebit: --device cuda is not supported: the OneBit layer"},
  {"qat", "svid for lsq", "qat -m {M} --method lsq --svid nmf --train-tokens {I} -o {O}", "--svid applies to --method onebit, not lsq"},
  {"qat", "unknown svid", "qat -m {M} --method onebit --svid svd --train-tokens {I} -o {O}", "--svid: svd not in {power,nmf}"},
  {"qat", "hidden-mse -1", "qat -m {M} --method onebit --hidden-mse -1 --train-tokens {I} -o {O}", "--hidden-mse: must be at least 0, got -1"},
  {"qat", "hidden-mse nan", "qat -m {M} --method onebit --hidden-mse nan --train-tokens {I} -o {O}", "--hidden-mse: 'nan' is not a finite number"},
  {"qat", "hidden-mse for lsq", "qat -m {M} --method lsq --hidden-mse 1 --train-tokens {I} -o {O}", "--hidden-mse applies to --method onebit, not lsq"},
  {"qat", "block-epochs for lsq", "qat -m {M} --method lsq --block-epochs 2 --train-tokens {I} -o {O}", "--block-epochs applies to --method efficientqat or matquant, not lsq"},
  {"qat", "block-epochs -1", "qat -m {M} --method efficientqat --block-epochs -1 --train-tokens {I} -o {O}", "--block-epochs: must be at least 0"},
  {"qat", "nsamples 0", "qat -m {M} --method efficientqat --nsamples 0 --train-tokens {I} -o {O}", "--nsamples: must be at least 1"},
  {"qat", "unknown init", "qat -m {M} --method lsq --init bogus --train-tokens {I} -o {O}", "--init"},
  {"qat", "lm-weight without distill", "qat -m {M} --method lsq --lm-weight 0.5 --train-tokens {I} -o {O}", "--lm-weight adds the LM loss"},
  {"qat", "lm-weight -1", "qat -m {M} --method lsq --distill --lm-weight -1 --train-tokens {I} -o {O}", "--lm-weight: must be at least 0"},
  {"qat", "checkpoint seconds -1", "qat -m {M} --method lsq --checkpoint-seconds -1 --train-tokens {I} -o {O}", "--checkpoint-seconds: must be at least 0"},
  {"qat", "unknown device", "qat -m {M} --method lsq --device tpu --train-tokens {I} -o {O}", "unknown device 'tpu'"},
  {"qat", "bf16 on the cpu", "qat -m {M} --method lsq --bf16 --train-tokens {I} -o {O}", "--bf16 needs --device cuda"},
  {"qat", "tf32 on the cpu", "qat -m {M} --method efficientqat --tf32 --train-tokens {I} -o {O}", "--tf32 needs --device cuda"},
  {"qat", "out = existing file", "qat -m {M} --method lsq --train-tokens {I} -o {D}/file", "exists and is not a directory", kModel},
  {"qat", "llm-qat act-bits 3", "qat -m {M} --method llm-qat --format int4g128s --act-bits 3 --train-tokens {I} -o {O}", "--act-bits"},
  {"qat", "llm-qat kv-bits 3", "qat -m {M} --method llm-qat --format int4g128s --kv-bits 3 --train-tokens {I} -o {O}", "--kv-bits"},
  {"qat", "act-bits for lsq", "qat -m {M} --method lsq --act-bits 8 --train-tokens {I} -o {O}", "--act-bits applies to --method llm-qat, not lsq"},
  {"qat", "llm-qat asymmetric format", "qat -m {M} --method llm-qat --format int4g128 --train-tokens {I} -o {O}", "format int4g128 is not a symmetric integer format"},
  {"qat", "llm-qat on cuda", "qat -m {M} --method llm-qat --format int4g128s --device cuda --train-tokens {I} -o {O}", "llm-qat: --device cuda is not supported"},
  {"qat", "self-generate 0", "qat -m {M} --method llm-qat --format int4g128s --self-generate 0 -o {O}", "the number of sequences to generate must be >= 1"},
  {"qat", "self-generate 0 for lsq", "qat -m {M} --method lsq --self-generate 0 -o {O}", "the number of sequences to generate must be >= 1"},
  {"qat", "self-generate and tokens", "qat -m {M} --method llm-qat --format int4g128s --self-generate 4 --train-tokens {I} -o {O}", "not both"},
  {"qat", "gen-tokens without generation", "qat -m {M} --method lsq --gen-tokens {D}/gen.i32 --train-tokens {I} -o {O}", "--gen-tokens applies to self-generated data"},
  {"qat", "gen-top-k without generation", "qat -m {M} --method lsq --gen-top-k 5 --train-tokens {I} -o {O}", "--gen-top-k applies to self-generated data"},
  {"qat", "gen-length 2", "qat -m {M} --method llm-qat --format int4g128s --self-generate 4 --gen-length 2 -o {O}", "--gen-length: must be at least 3"},
  {"qat", "gen-length past the context", "qat -m {M} --method llm-qat --format int4g128s --self-generate 4 --seqlen 8 --gen-length 100000 -o {O}", "is not in [3, ", kModel},
  {"qat", "gen-tokens not ours", "qat -m {M} --method llm-qat --format int4g128s --self-generate 4 --gen-tokens {I} -o {O}", "was not written by --self-generate", kModel},
  {"qat", "uncreatable out", "qat -m {M} --method lsq --train-tokens {I} -o /proc/lowbit-no/out", "cannot create directory", kModel},
  {"qat", "quantized input", "qat -m {Q} --method lsq --train-tokens {I} -o {O}", "already a lowbit quantized model", kQuantized},
  {"qat", "warmup -1", "qat -m {M} --method lsq --warmup -1 --train-tokens {I} -o {O}", "--warmup: must be at least 0"},
  {"qat", "seed -1", "qat -m {M} --method lsq --seed -1 --train-tokens {I} -o {O}", "--seed: must be at least 0"},
  {"qat", "block-batch 0", "qat -m {M} --method efficientqat --block-batch 0 --train-tokens {I} -o {O}", "--block-batch: must be at least 1"},
  {"qat", "block-lr for lsq", "qat -m {M} --method lsq --block-lr 1e-3 --train-tokens {I} -o {O}", "--block-lr applies to --method efficientqat or matquant, not lsq"},
  {"qat", "block-lr nan", "qat -m {M} --method efficientqat --block-lr nan --train-tokens {I} -o {O}", "--block-lr: 'nan' is not a finite number"},
  {"qat", "block-quant-lr -1", "qat -m {M} --method efficientqat --block-quant-lr -1 --train-tokens {I} -o {O}", "--block-quant-lr: must be at least 0"},
  {"qat", "gpus 0", "qat -m {M} --method lsq --train-tokens {I} -o {O} --gpus 0", "--gpus: must be"},
  {"qat", "gpus 2, state-dir", "qat -m {M} --method lsq --train-tokens {I} --state-dir {D}/qat-state -o {O} --gpus 2", "--state-dir: a data-parallel qat run (2 ranks) keeps no resumable state", kModel},
  {"qat", "gpus 2, stop-after", "qat -m {M} --method lsq --train-tokens {I} --stop-after 1 -o {O} --gpus 2", "--stop-after: a data-parallel qat run (2 ranks) keeps no resumable state", kModel},
  {"qat", "gpus 2, self-generate", "qat -m {M} --method llm-qat --format int4g128s --self-generate 4 -o {O} --gpus 2", "--self-generate with 2 ranks", kModel},
  {"qat", "gpus 3, batch 2", "qat -m {M} --method lsq --train-tokens {I} --batch 2 --seqlen 16 --steps 1 -o {O} --gpus 3", "--batch 2: data-parallel qat splits each step's windows over the 3 ranks", kModel},
  {"qat", "zero with one rank", "qat -m {M} --method lsq --train-tokens {I} -o {O} --zero", "--zero shards the optimizer state over several ranks", kModel},
  {"qat", "zero with 8-bit state", "qat -m {M} --method lsq --train-tokens {I} -o {O} --gpus 2 --zero --optimizer-bits 8", "--zero: f32 optimizer state only", kModel},
  {"qat", "gpus 3, 2 windows", "qat -m {M} --method efficientqat --train-tokens {I} --nsamples 2 --seqlen 16 -o {O} --gpus 3", "--nsamples: 2 items cannot be split over 3 ranks", kModel},
  {"qat", "stop-after -1", "qat -m {M} --method lsq --stop-after -1 --train-tokens {I} -o {O}", "--stop-after: must be at least 0"},
  {"qat", "stop-after-blocks for lsq", "qat -m {M} --method lsq --stop-after-blocks 1 --train-tokens {I} -o {O}", "--stop-after-blocks applies to --method efficientqat or matquant, not lsq"},
  {"qat", "l4q lora-rank 0", "qat -m {M} --method l4q --lora-rank 0 --train-tokens {I} -o {O}", "--lora-rank: must be at least 1"},
  {"qat", "l4q lora-rank above the layer", "qat -m {M} --method l4q --lora-rank 100000 --train-tokens {I} -o {O}", "--lora-rank 100000 exceeds the smaller side", kModel},
  {"qat", "l4q lora-alpha 0", "qat -m {M} --method l4q --lora-alpha 0 --train-tokens {I} -o {O}", "--lora-alpha: must be greater than 0"},
  {"qat", "l4q lora-alpha nan", "qat -m {M} --method l4q --lora-alpha nan --train-tokens {I} -o {O}", "--lora-alpha: 'nan' is not a finite number"},
  {"qat", "lora-rank for lsq", "qat -m {M} --method lsq --lora-rank 4 --train-tokens {I} -o {O}", "--lora-rank applies to --method l4q or lr-qat, not lsq"},
  {"qat", "lora-alpha for efficientqat", "qat -m {M} --method efficientqat --lora-alpha 8 --train-tokens {I} -o {O}", "--lora-alpha applies to --method l4q or lr-qat, not efficientqat"},
  {"qat", "l4q non-integer format", "qat -m {M} --method l4q --format q4_0 --train-tokens {I} -o {O}", "qat --method l4q: format q4_0 is not a uniform integer format"},
  {"qat", "lr-qat ggml block format", "qat -m {M} --method lr-qat --format q4_0 --train-tokens {I} -o {O}", "qat --method lr-qat: format q4_0 is not a uniform integer format"},
  {"qat", "lr-qat mxfp4 format", "qat -m {M} --method lr-qat --format mxfp4 --train-tokens {I} -o {O}", "qat --method lr-qat: format mxfp4 is not a uniform integer format"},
  {"qat", "lr-qat lora-rank 0", "qat -m {M} --method lr-qat --lora-rank 0 --train-tokens {I} -o {O}", "--lora-rank: must be at least 1"},
  {"qat", "lr-qat lora-rank above the layer", "qat -m {M} --method lr-qat --lora-rank 100000 --train-tokens {I} -o {O}", "qat --method lr-qat: --lora-rank 100000 exceeds the smaller side", kModel},
  {"qat", "lr-qat lora-alpha nan", "qat -m {M} --method lr-qat --lora-alpha nan --train-tokens {I} -o {O}", "--lora-alpha: 'nan' is not a finite number"},
  {"qat", "lr-qat lora-alpha 0", "qat -m {M} --method lr-qat --lora-alpha 0 --train-tokens {I} -o {O}", "--lora-alpha: must be greater than 0"},
  {"qat", "lr-qat downcast int4", "qat -m {M} --method lr-qat --downcast int4 --train-tokens {I} -o {O}", "--downcast: int4 not in {int8,bf16,f16,f32}"},
  {"qat", "downcast for lsq", "qat -m {M} --method lsq --downcast int8 --train-tokens {I} -o {O}", "--downcast applies to --method lr-qat, not lsq"},
  {"qat", "lr-qat grad-checkpointing maybe", "qat -m {M} --method lr-qat --grad-checkpointing maybe --train-tokens {I} -o {O}", "--grad-checkpointing: maybe not in {on,off}"},
  {"qat", "matquant width 5", "qat -m {M} --method matquant --widths 8,5 --train-tokens {I} -o {O}", "--widths: '5' is not a Matryoshka width"},
  {"qat", "matquant width twice", "qat -m {M} --method matquant --widths 8,2,8 --train-tokens {I} -o {O}", "--widths: width 8 is listed twice"},
  {"qat", "matquant weights count", "qat -m {M} --method matquant --width-weights 1,1 --train-tokens {I} -o {O}", "--width-weights: 2 weights for 3 widths"},
  {"qat", "matquant weight negative", "qat -m {M} --method matquant --width-weights 1,-2,1 --train-tokens {I} -o {O}", "--width-weights: '-2' is not a finite weight"},
  {"qat", "matquant int2 format", "qat -m {M} --method matquant --format int2g64 --train-tokens {I} -o {O}", "not a Matryoshka parent format; use int8g32, int8g64 or int8g128"},
  {"qat", "widths for lsq", "qat -m {M} --method lsq --widths 8,4 --train-tokens {I} -o {O}", "--widths applies to --method matquant, not lsq"},
  {"qat", "steps for matquant", "qat -m {M} --method matquant --steps 10 --train-tokens {I} -o {O}", "--steps applies to --method"},
  {"qat", "grad-checkpointing for l4q", "qat -m {M} --method l4q --grad-checkpointing off --train-tokens {I} -o {O}", "--grad-checkpointing applies to --method lr-qat, not l4q"},
  {"qat", "lr-qat on cuda", "qat -m {M} --method lr-qat --device cuda --train-tokens {I} -o {O}", "qat --method lr-qat: --device cuda is not supported"},
  {"qat", "l4q too few tokens", "qat -m {M} --method l4q --train-tokens {D}/few.i32 -o {O}", "are needed for --seqlen 256", kModel},
  {"qat", "l4q block-epochs", "qat -m {M} --method l4q --block-epochs 2 --train-tokens {I} -o {O}", "--block-epochs applies to --method efficientqat or matquant, not l4q"},
  {"qat", "uncreatable state dir", "qat -m {M} --method lsq --train-tokens {I} --state-dir /proc/lowbit-no/state -o {O}", "--state-dir /proc/lowbit-no/state: cannot create directory", kModel},
  {"qat", "bits for lsq", "qat -m {M} --method lsq --bits 2 --train-tokens {I} -o {O}", "--bits applies to --method paretoq, not lsq"},
  {"qat", "unknown bits", "qat -m {M} --method paretoq --bits 1.5 --train-tokens {I} -o {O}", "--bits"},
  {"qat", "init for paretoq", "qat -m {M} --method paretoq --init mse --train-tokens {I} -o {O}", "--init applies to --method lsq or l4q or lr-qat, not paretoq"},
  {"qat", "paretoq format without a bit width", "qat -m {M} --method paretoq --format int8pc --train-tokens {I} -o {O}", "format int8pc has no ParetoQ bit width"},
  {"qat", "paretoq 2 bits on a symmetric format", "qat -m {M} --method paretoq --bits 2 --format int2g64s --train-tokens {I} -o {O}", "need an asymmetric int2 format"},
  {"qat", "paretoq ternary on int4", "qat -m {M} --method paretoq --bits 1.58 --format int4g128 --train-tokens {I} -o {O}", "need an int2 format (int2g64s, int2pcs, or asymmetric int2 with zero point 1); int4g128 cannot hold them"},
  {"qat", "paretoq 4 bits on int2", "qat -m {M} --method paretoq --bits 4 --train-tokens {I} -o {O}", "4-bit LSQ needs an int4 format"},
  {"qat", "paretoq too few tokens", "qat -m {M} --method paretoq --train-tokens {D}/few.i32 -o {O}", "are needed for --seqlen 256", kModel},
  {"qat", "state dir = existing file", "qat -m {M} --method lsq --train-tokens {I} --state-dir {D}/file -o {O}", "/file: exists and is not a directory", kModel},
  // --- finetune
  {"finetune", "missing model", "finetune -m {D}/missing --out {O} --train-tokens {I}", "not a lowbit quantized model"},
  {"finetune", "dense model", "finetune -m {M} --out {O} --train-tokens {I}", "not a lowbit quantized model", kModel},
  {"finetune", "no training data", "finetune -m {Q} --out {O}", "give --train TEXT or --train-tokens", kQuantized},
  {"finetune", "unknown precision", "finetune -m {Q} --out {O} --train-tokens {I} --precision fp6", "--precision: 'fp6' is not a training precision", kQuantized},
  {"finetune", "fp4-dge on cuda", "finetune -m {Q} --out {O} --train-tokens {I} --precision fp4-dge --device cuda", "--precision fp4-dge has no CUDA body yet", kQuantized},
  {"finetune", "empty training data", "finetune -m {Q} --out {O} --train-tokens {D}/empty", "training data has 0 tokens", kQuantized},
  {"finetune", "too few training tokens", "finetune -m {Q} --out {O} --train-tokens {D}/few.i32", "training data has 10 tokens", kQuantized},
  {"finetune", "too few training tokens, seq-len 8", "finetune -m {Q} --out {O} --train-tokens {D}/few.i32 --seq-len 9", "training data has 10 tokens", kQuantized},
  {"finetune", "too few validation tokens", "finetune -m {Q} --out {O} --train-tokens {I} --valid-tokens {D}/few.i32", "validation data has 10 tokens", kQuantized},
  {"finetune", "odd training data", "finetune -m {Q} --out {O} --train-tokens {D}/odd.i32", "not a whole number of int32", kQuantized},
  {"finetune", "missing training text", "finetune -m {Q} --out {O} --tokenizer {T} --train {D}/missing.txt", "missing.txt", kQuantized},
  {"finetune", "seq-len past the model", "finetune -m {Q} --out {O} --train-tokens {I} --seq-len 100000", "--seq-len 100000", kQuantized},
  {"finetune", "out = model", "finetune -m {Q} --out {Q} --train-tokens {I}", "is the input model", kQuantized},
  {"finetune", "out = existing file", "finetune -m {Q} --out {D}/file --train-tokens {I}", "exists and is not a directory", kQuantized},
  {"finetune", "uncreatable out", "finetune -m {Q} --out /proc/lowbit-no/out --train-tokens {I}", "cannot create directory", kQuantized},
  {"finetune", "lr -1", "finetune -m {Q} --out {O} --train-tokens {I} --lr -1", "--lr: must be greater than 0"},
  {"finetune", "lr nan", "finetune -m {Q} --out {O} --train-tokens {I} --lr nan", "--lr: 'nan' is not a finite number"},
  {"finetune", "steps -3", "finetune -m {Q} --out {O} --train-tokens {I} --steps -3", "--steps: must be at least 0"},
  {"finetune", "batch 0", "finetune -m {Q} --out {O} --train-tokens {I} --batch 0", "--batch: must be at least 1"},
  {"finetune", "seq-len 0", "finetune -m {Q} --out {O} --train-tokens {I} --seq-len 0", "--seq-len: must be at least 1"},
  {"finetune", "rank 0", "finetune -m {Q} --out {O} --train-tokens {I} --rank 0", "--rank: must be at least 1"},
  {"finetune", "optimizer-bits 16", "finetune -m {Q} --out {O} --train-tokens {I} --optimizer-bits 16", "--optimizer-bits: 16 not in {8,32}"},
  // --- train (a tiny architecture: the rows fail before any step)
  {"train", "zero with one rank", "train --train-tokens {I} --vocab 512 --dim 16 --hidden-dim 32 --layers 1 --heads 2 --seq-len 16 --batch 2 --steps 1 --out {O} --zero", "--zero shards the optimizer state over several ranks", kModel},
  {"train", "zero with 8-bit state", "train --train-tokens {I} --vocab 512 --dim 16 --hidden-dim 32 --layers 1 --heads 2 --seq-len 16 --batch 2 --steps 1 --out {O} --gpus 2 --zero --optimizer-bits 8", "--zero: f32 optimizer state only", kModel},
  {"train", "gpus 0", "train --train-tokens {I} --vocab 512 --out {O} --gpus 0", "--gpus: must be"},
  {"train", "gpus 2, batch 1", "train --train-tokens {I} --vocab 512 --dim 16 --hidden-dim 32 --layers 1 --heads 2 --seq-len 16 --batch 1 --steps 1 --out {O} --gpus 2", "--batch 1: data-parallel training splits", kModel},
  {"train", "no training data", "train --out {O} --vocab 512", "give --train TEXT"},
  {"train", "empty training data", "train --out {O} --vocab 512 --train-tokens {D}/empty", "training data has 0 tokens"},
  {"train", "too few training tokens", "train --out {O} --vocab 512 --train-tokens {D}/few.i32", "training data has 10 tokens"},
  {"train", "too few training tokens, seq-len 8", "train --out {O} --vocab 512 --seq-len 9 --train-tokens {D}/few.i32", "training data has 10 tokens"},
  {"train", "odd training data", "train --out {O} --vocab 512 --train-tokens {D}/odd.i32", "not a whole number of int32"},
  {"train", "random config", "train --out {O} --config {D}/random.bin --train-tokens {I}", "random.bin: not valid JSON", kModel},
  {"train", "random tokenizer", "train --out {O} --tokenizer {D}/random.bin --train-tokens {I}", "random.bin", kModel},
  {"train", "bad architecture", "train --out {O} --vocab 512 --dim 15 --heads 2 --train-tokens {I}", "does not divide", kModel},
  {"train", "out = existing file", "train --out {D}/file --vocab 512 --train-tokens {I}", "exists and is not a directory", kModel},
  {"train", "unwritable out", "train --out {D}/ro/sub --vocab 512 --train-tokens {I}", "cannot create directory", kModel | kNotRoot},
  {"train", "uncreatable out", "train --out /proc/lowbit-no/out --vocab 512 --train-tokens {I}", "cannot create directory", kModel},
  {"train", "steps -3", "train --out {O} --vocab 512 --train-tokens {I} --steps -3", "--steps: must be at least 0"},
  {"train", "lr -1", "train --out {O} --vocab 512 --train-tokens {I} --lr -1", "--lr: must be greater than 0"},
  {"train", "lr inf", "train --out {O} --vocab 512 --train-tokens {I} --lr inf", "--lr: 'inf' is not a finite number"},
  {"train", "batch 0", "train --out {O} --vocab 512 --train-tokens {I} --batch 0", "--batch: must be at least 1"},
  {"train", "seq-len 0", "train --out {O} --vocab 512 --train-tokens {I} --seq-len 0", "--seq-len: must be at least 1"},
  {"train", "dim 0", "train --out {O} --vocab 512 --train-tokens {I} --dim 0", "--dim: must be at least 1"},
  {"train", "beta2 2", "train --out {O} --vocab 512 --train-tokens {I} --beta2 2", "--beta2: must be between 0 and 1"},
  {"train", "optimizer-bits 4", "train --out {O} --vocab 512 --train-tokens {I} --optimizer-bits 4", "--optimizer-bits: 4 not in {8,32}"},
  {"train", "optimizer-bits abc", "train --out {O} --vocab 512 --train-tokens {I} --optimizer-bits abc", "--optimizer-bits: abc"},
  {"train", "unknown precision", "train --out {O} --vocab 512 --train-tokens {I} --precision fp6", "--precision: 'fp6' is not a training precision (choices: f32, bf16, fp8, mxfp4, nvfp4, fp4-dge, int4)"},
  {"train", "dge k below 1", "train --out {O} --vocab 512 --train-tokens {I} --precision fp4-dge --dge-k 0.5", "--dge-k 0.5 is outside [1, 100]"},
  {"train", "dge clip 0", "train --out {O} --vocab 512 --train-tokens {I} --precision fp4-dge --dge-clip 0", "--dge-clip 0 is outside (0, 1000]"},
  {"train", "occ quantile 0.3", "train --out {O} --vocab 512 --train-tokens {I} --precision fp4-dge --occ-quantile 0.3", "--occ-quantile 0.3 is outside (0.5, 1]"},
  {"train", "occ quantile 2", "train --out {O} --vocab 512 --train-tokens {I} --precision fp4-dge --occ-quantile 2", "--occ-quantile 2 is outside (0.5, 1]"},
  {"train", "fp4-dge on cuda", "train --out {O} --vocab 512 --train-tokens {I} --precision fp4-dge --device cuda", "--precision fp4-dge has no CUDA body yet"},
  {"train", "unknown int4 grad estimator", "train --out {O} --vocab 512 --train-tokens {I} --precision int4 --lp-int4-grad lss", "--lp-int4-grad: 'lss' is not a gradient estimator (choices: bs-lss, bs-lss-dgrad, bs)"},
  {"train", "unknown int4 scale", "train --out {O} --vocab 512 --train-tokens {I} --precision int4 --lp-int4-scale block", "--lp-int4-scale: 'block' is not a scaling granularity (choices: tensor, row)"},
  {"train", "int4 grad with fp8", "train --out {O} --vocab 512 --train-tokens {I} --precision fp8 --lp-int4-grad bs", "--lp-int4-grad applies to --precision int4 only, not fp8"},
  {"train", "int4 scale with f32", "train --out {O} --vocab 512 --train-tokens {I} --lp-int4-scale row", "--lp-int4-scale applies to --precision int4 only, not f32"},
  {"train", "int4 grad with the naive recipe", "train --out {O} --vocab 512 --train-tokens {I} --precision int4 --lp-recipe naive --lp-int4-grad bs", "--lp-int4-grad bs: the naive recipe (--lp-recipe naive) has no bit splitting"},
  {"train", "int4 row scales on cuda", "train --out {O} --vocab 512 --train-tokens {I} --precision int4 --lp-int4-scale row --device cuda", "--lp-int4-scale row has no CUDA body yet"},
  {"train", "unknown fp8 scaling", "train --out {O} --vocab 512 --train-tokens {I} --precision fp8 --fp8-scaling slow", "--fp8-scaling: 'slow' is not a scaling rule (choices: delayed, current)"},
  {"train", "unknown lp recipe", "train --out {O} --vocab 512 --train-tokens {I} --precision nvfp4 --lp-recipe best", "--lp-recipe: 'best' is not a recipe (choices: full, naive)"},
  {"train", "unknown lp gemm mode", "train --out {O} --vocab 512 --train-tokens {I} --precision fp8 --lp-gemm fast", "--lp-gemm: 'fast' is not a GEMM mode (choices: auto, native, emulated)"},
  {"train", "amax history 0", "train --out {O} --vocab 512 --train-tokens {I} --precision fp8 --amax-history 0", "--amax-history: Value 0 not in range"},
  {"train", "precision keeps every block", "train --train-tokens {I} --vocab 512 --dim 16 --hidden-dim 32 --layers 2 --heads 2 --seq-len 16 --batch 2 --steps 1 --out {O} --precision nvfp4 --lp-keep-last 2", "keep all 2 blocks in high precision", kModel},
  {"train", "unknown arch", "train --out {O} --vocab 512 --train-tokens {I} --arch bitnet", "--arch: 'bitnet' is not an architecture"},
  {"train", "unknown ternary scale", "train --out {O} --vocab 512 --train-tokens {I} --arch bitnet-b1.58 --ternary-scale max", "--ternary-scale: 'max' is not a ternary scale"},
  {"train", "ternary scale without bitnet", "train --out {O} --vocab 512 --train-tokens {I} --ternary-scale median", "need --arch bitnet-b1.58"},
  {"train", "transition-at 1.5", "train --out {O} --vocab 512 --train-tokens {I} --arch bitnet-b1.58 --transition-at 1.5", "--transition-at: must be between 0 and 1"},
  {"train", "transition-at nan", "train --out {O} --vocab 512 --train-tokens {I} --arch bitnet-b1.58 --transition-at nan", "--transition-at: 'nan' is not a finite number"},
  {"train", "transition-at 1", "train --out {O} --vocab 512 --train-tokens {I} --arch bitnet-b1.58 --transition-at 1", "--transition-at 1 is outside [0, 1)"},
  {"train", "transition without bitnet", "train --out {O} --vocab 512 --train-tokens {I} --transition-at 0.5", "need --arch bitnet-b1.58"},
  {"train", "phase-in-steps -1", "train --out {O} --vocab 512 --train-tokens {I} --arch bitnet-b1.58 --phase-in-steps -1", "--phase-in-steps: must be at least 0"},
  {"train", "phase-in past the end", "train --out {O} --vocab 512 --train-tokens {I} --arch bitnet-b1.58 --steps 4 --transition-at 0.5 --phase-in-steps 5", "does not end by the last step"},
  {"train", "unknown schedule", "train --out {O} --vocab 512 --train-tokens {I} --schedule linear", "--schedule: 'linear' is not a schedule"},
  {"train", "bitnet in bf16", "train --out {O} --vocab 512 --train-tokens {I} --arch bitnet-b1.58 --device cuda --bf16", "--arch bitnet-b1.58 trains in f32 (no --bf16)"},
  {"train", "unknown act-quant", "train --out {O} --vocab 512 --train-tokens {I} --arch bitnet-v2 --act-quant absmin", "--act-quant: 'absmin' is not an activation quantizer (expected absmax or absmean)"},
  {"train", "act-quant without v2", "train --out {O} --vocab 512 --train-tokens {I} --arch bitnet-b1.58 --act-quant absmean", "--act-quant need --arch bitnet-v2"},
  {"train", "absmean at 8 bits", "train --out {O} --vocab 512 --train-tokens {I} --arch bitnet-v2 --act-bits 8 --act-quant absmean", "--act-quant absmean needs --act-bits 4"},
};
// clang-format on

struct Result {
  int status = -1;
  std::string err;
};

// Runs `lowbit <args>` through the shell (rows may redirect stdin/stdout); stdout is discarded
// unless the row redirects it.
Result run(const std::string& args, const fs::path& err_file) {
  std::string cmd = lowbit::test::cli_path() + " " + args;
  if (args.find('>') == std::string::npos) cmd += " > /dev/null";
  cmd += " 2> " + err_file.string();
  Result r;
  const int st = std::system(cmd.c_str());
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
  std::ifstream f(err_file);
  r.err.assign(std::istreambuf_iterator<char>(f), {});
  return r;
}

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  for (size_t p = 0; (p = s.find(from, p)) != std::string::npos; p += to.size()) s.replace(p, from.size(), to);
  return s;
}

void write_file(const fs::path& p, const std::string& bytes) {
  std::ofstream(p, std::ios::binary) << bytes;
}

std::string read_bytes(const fs::path& p, size_t n) {
  std::ifstream f(p, std::ios::binary);
  std::string s(n, '\0');
  f.read(s.data(), std::streamsize(n));
  s.resize(size_t(f.gcount()));
  return s;
}

// The fixture files of every row, made once per test process.
struct Fixture {
  fs::path dir, model, tokenizer, tokens, quantized;
  bool have_model = false, have_quantized = false, tried_quantize = false;

  Fixture() {
    dir = lowbit::test::temp_dir("cli-bad-inputs");
    write_file(dir / "empty", "");
    std::mt19937 rng(7);
    std::string random(1000, '\0');
    for (auto& c : random) c = char(rng());
    write_file(dir / "random.bin", random);
    write_file(dir / "text.txt", "Once upon a time\n");
    write_file(dir / "file", "an existing file\n");
    write_file(dir / "badmap.txt", "# format map\nattn_v layers=0-1 q9_9\n");
    write_file(dir / "intmap.txt", "ffn_down int8pc\ndefault q4_0\n");
    fs::create_directories(dir / "ro");
    ::chmod((dir / "ro").c_str(), 0555);
    const std::string m = lowbit::test::shared_file("models/stories260K/stories260K.bin");
    const std::string t = lowbit::test::shared_file("models/stories260K/tok512.bin");
    const std::string i = lowbit::test::shared_file("models/stories260K/sample-tokens.i32");
    // A llama2.c header (7 int32) followed by a little of the weights.
    write_file(dir / "trunc.bin", m.empty() ? std::string("\x40\0\0\0\xac\0\0\0\x05\0\0\0\x08\0\0\0\x04\0\0\0\0\x02\0\0\0\x02\0\0", 28) + std::string(72, '\1')
                                            : read_bytes(m, 100));
    std::string ids;
    for (int32_t id = 1; id <= 10; ++id) ids.append(reinterpret_cast<const char*>(&id), 4);
    write_file(dir / "few.i32", ids);
    write_file(dir / "odd.i32", ids.substr(0, 5));
    // Placeholders of rows that do not need the model still name plausible paths.
    model = dir / "model.bin";
    tokenizer = dir / "tok.bin";
    tokens = dir / "tokens.i32";
    quantized = dir / "quantized";
    if (m.empty() || t.empty() || i.empty()) return;
    // A copy: the "output = input" rows must never be able to touch ../shared.
    fs::copy_file(m, model);
    tokenizer = t;
    tokens = i;
    have_model = true;
  }
  // The quantized model, made on first use (only the quantize/finetune rows need it).
  bool quantized_ready() {
    if (!have_model) return false;
    if (!tried_quantize) {
      tried_quantize = true;
      const Result q = run("-q quantize -m " + model.string() + " --method rtn --format int4g32 -o " + quantized.string(),
                           dir / "quantize.err");
      have_quantized = q.status == 0;
      EXPECT_EQ(q.status, 0) << "fixture: quantizing stories260K failed:\n" << q.err;
    }
    return have_quantized;
  }
  ~Fixture() {
    ::chmod((dir / "ro").c_str(), 0755);
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
};

Fixture& fixture() {
  static Fixture f;
  return f;
}

std::vector<std::string> commands() {
  std::vector<std::string> v;
  std::set<std::string> seen;
  for (const Row& r : kRows)
    if (seen.insert(r.command).second) v.push_back(r.command);
  return v;
}

class CliBadInput : public ::testing::TestWithParam<std::string> {};

TEST_P(CliBadInput, FailsCleanlyWithStatusOne) {
  if (!fs::exists(lowbit::test::cli_path())) GTEST_SKIP() << "no " << lowbit::test::cli_path();
  Fixture& fx = fixture();
  int ran = 0, skipped = 0;
  int n = 0;
  for (const Row& row : kRows) {
    if (GetParam() != row.command) continue;
    ++n;
    if (((row.needs & kModel) && !fx.have_model) || ((row.needs & kQuantized) == kQuantized && !fx.quantized_ready()) ||
        ((row.needs & kNotRoot) && ::geteuid() == 0)) {
      ++skipped;
      continue;
    }
    const fs::path out = fx.dir / ("out-" + std::string(row.command) + "-" + std::to_string(n));
    std::string args = row.args;
    for (const auto& [k, v] : {std::pair<std::string, std::string>{"{M}", fx.model.string()},
                               {"{T}", fx.tokenizer.string()},
                               {"{I}", fx.tokens.string()},
                               {"{Q}", fx.quantized.string()},
                               {"{D}", fx.dir.string()},
                               {"{O}", replace_all(out.string(), " ", "_")}})
      args = replace_all(args, k, v);
    const std::string file_before = read_bytes(fx.dir / "file", 1 << 10);
    const Result r = run(args, fx.dir / "row.err");
    SCOPED_TRACE(std::string(row.command) + " / " + row.what + ": lowbit " + args + "\nstderr:\n" + r.err);
    ++ran;
    EXPECT_EQ(r.status, 1);
    EXPECT_NE(r.err.find("lowbit: error: "), std::string::npos);
    EXPECT_NE(r.err.find(row.want), std::string::npos) << "wanted: " << row.want;
    EXPECT_EQ(r.err.find("internal error"), std::string::npos);
    // Nothing left behind: the row's output (and its temporary or alternative-format names).
    const std::string o = replace_all(out.string(), " ", "_");
    for (const std::string& p : {o, o + ".gguf", o + ".gguf.tmp", o + ".gguf.qdir", o + ".tmp"})
      EXPECT_FALSE(fs::exists(p)) << "left behind: " << p;
    EXPECT_FALSE(fs::exists(fx.dir / "ro" / "sub"));
    EXPECT_FALSE(fs::exists(fx.dir / "file.tmp"));
    EXPECT_EQ(read_bytes(fx.dir / "file", 1 << 10), file_before) << "an existing file was modified";
  }
  if (fx.have_model) {  // the inputs the rows pointed at are untouched
    EXPECT_TRUE(fs::is_regular_file(fx.model));
    if (fx.have_quantized) {
      EXPECT_TRUE(fs::exists(fx.quantized / "model.safetensors"));
    }
  }
  if (skipped) std::printf("%s: %d rows ran, %d skipped (stories260K absent, or running as root)\n", GetParam().c_str(), ran, skipped);
}

std::string test_name(const ::testing::TestParamInfo<std::string>& info) {
  std::string s = info.param;
  for (char& c : s)
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  return s;
}

INSTANTIATE_TEST_SUITE_P(Commands, CliBadInput, ::testing::ValuesIn(commands()), test_name);

// Where a run succeeds, it makes no noise either: -q works after the command, a full stdout is
// an error, and a validation-free finetune prints "no validation data" instead of a number.
TEST(CliBehaviour, QuietAfterCommandAndNoInventedNumbers) {
  if (!fs::exists(lowbit::test::cli_path())) GTEST_SKIP() << "no " << lowbit::test::cli_path();
  Fixture& fx = fixture();
  if (!fx.have_model) GTEST_SKIP() << "stories260K not found under " << lowbit::test::shared_root();
  const Result q = run("tokenize -t " + fx.tokenizer.string() + " -q < " + (fx.dir / "text.txt").string(), fx.dir / "q.err");
  EXPECT_EQ(q.status, 0) << q.err;
  // The quantized fixture carries its source's tokenizer? It was made without one (a .bin model
  // file has none); a quantize with --tokenizer copies it along.
  const fs::path qt = fx.dir / "quantized-tok";
  const Result r = run("-q quantize -m " + fx.model.string() + " --method rtn --format int4g32 --tokenizer " +
                           fx.tokenizer.string() + " -o " + qt.string(),
                       fx.dir / "qt.err");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_TRUE(fs::is_regular_file(qt / "tokenizer.bin"));
  // generate finds it without --tokenizer.
  const Result g = run("generate -q -m " + qt.string() + " -n 8", fx.dir / "g.err");
  EXPECT_EQ(g.status, 0) << g.err;
  // finetune with no validation data: JSON null, never a sentinel.
  const fs::path ft = fx.dir / "ft";
  const fs::path json = fx.dir / "ft.json";
  const Result f = run("finetune -q -m " + qt.string() + " --out " + ft.string() + " --train-tokens " + fx.tokens.string() +
                           " --steps 2 --batch 2 --seq-len 16 --eval-every 0 --json > " + json.string(),
                       fx.dir / "ft.err");
  ASSERT_EQ(f.status, 0) << f.err;
  std::ifstream in(json);
  std::string line;
  std::getline(in, line);
  EXPECT_NE(line.find("\"val_loss_after\":null"), std::string::npos) << line;
  EXPECT_EQ(line.find("-1.0"), std::string::npos) << line;
  EXPECT_TRUE(fs::is_regular_file(ft / "model" / "tokenizer.bin"));
  // ApiQ's default rank respects the format's bit budget: rank 1 on this 64-wide model at int2g64.
  const fs::path aq = fx.dir / "apiq";
  const fs::path aj = fx.dir / "apiq.json";
  const Result a = run("-q quantize -m " + fx.model.string() + " --method apiq --epochs 0 --nsamples 2 --seqlen 32 " +
                           "--calib-tokens " + fx.tokens.string() + " -o " + aq.string() + " --json > " + aj.string(),
                       fx.dir / "apiq.err");
  ASSERT_EQ(a.status, 0) << a.err;
  std::ifstream ain(aj);
  std::getline(ain, line);
  EXPECT_NE(line.find("\"rank\":1,"), std::string::npos) << line;
}

}  // namespace

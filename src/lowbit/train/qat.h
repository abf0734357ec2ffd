// Quantization-aware training (lowbit qat, issue 14): methods that train a quantized model end to end
// (or block-wise, then end to end) and return it with packed QuantLinear layers, which the CLI
// writes as a lowbit quantized checkpoint (io/quantized_checkpoint.h), as `quantize` does.
//
// Methods live in a registry (qat_registry()), as `quantize`'s do (methods/registry.h): a name, a
// one-line help and a factory from QatConfig. Built in:
//   lsq           end-to-end LSQ QAT (Esser et al. 2020): every linear of every block becomes an
//                 LsqTrainLinear (quant/lsq_linear.h) with a latent f32 weight (straight-through
//                 estimator) and learned step sizes with LSQ's gradient scale 1/sqrt(N Qp); on
//                 asymmetric formats also the learned zero point (LSQ+), initialised MSE-optimal
//                 (LSQ+). Trained on the LM loss (or --distill) over random windows of the
//                 training tokens with AdamW, warmup + cosine schedule, gradient clipping at 1.
//                 Embeddings, norms and the output head stay frozen.
//   paretoq       ParetoQ (Liu et al. 2025, arXiv 2502.02631): end-to-end QAT on latent f32 weights with
//                 the quantizer the paper prescribes per bit width (quant/paretoq.h): sign (1 bit),
//                 SEQ (1.58 and 2 bits; SeqTrainLinear, quant/paretoq_linear.h), LSQ on the signed
//                 grid [-2^(b-1), 2^(b-1) - 1] (3 and 4 bits; LsqTrainLinear with the zero point fixed),
//                 α per group initialised and scaled as the reference code (train.py, utils_quant.py);
//                 AdamW with no warmup, cosine, weight decay 0 (the reference's run_train.sh); the
//                 reference's single lr for weights and α is split (α: 1e-3, chosen on stories260K).
//                 The bit width comes from the format (int2 asymmetric: 2, int2 symmetric: 1.58,
//                 int3: 3, int4: 4) or QatConfig::paretoq_bits. The packed result is exactly the
//                 trained fake-quantized weights (α snapped to its f16 storage at the end).
//   efficientqat  EfficientQAT (Chen et al. 2024, arXiv 2407.11062): Block-AP (methods/block_ap.h:
//                 block-wise reconstruction of the FP block outputs on calibration windows, training
//                 weights, steps and zero points) through the block-wise pipeline, then E2E-QP: the
//                 integer codes frozen, only the step sizes trained end to end on the LM loss (or
//                 --distill).
//   l4q           L4Q (Jeon et al. 2024, arXiv 2402.04902): LoRA-wise LSQ. Every block linear becomes an
//                 L4qTrainLinear (quant/l4q_linear.h): frozen W0, LoRA A/B and LSQ steps (zero
//                 points) trained jointly, the quantizer on the merged weight W0 + s B A; exported as
//                 one packed weight per layer (no adapter). Same end-to-end trainer as lsq.
// Losses: the language-modelling cross-entropy of the next token; with distill, the KL divergence
// KL(P_teacher || P_student) of the full-precision model's next-token distribution (LLM-QAT's
// distillation loss), plus lm_weight times the cross-entropy.
//
// Resume: every stage keeps its state under state_dir (atomic writes): the end-to-end stages a
// safetensors file with every trained tensor, the AdamW moments, the step and a key of the
// hyper-parameters and data (a state written with other settings is refused), saved when
// checkpoint_seconds have passed since the last save and before an early stop; Block-AP the
// pipeline's state (pipeline.h) and, once done, its quantized checkpoint. Training windows of step s
// are drawn from (seed, s) alone, so a run killed and restarted gives the same model as an
// uninterrupted run (same machine and thread count).
// CPU only for now: the LSQ quantizer has no CUDA body.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "lowbit/model/llama.h"
#include "lowbit/quant/format.h"
#include "lowbit/quant/lsq.h"

namespace lowbit {

// Everything a method may read. Negative numbers mean "the method's default" (qat_defaults).
struct QatConfig {
  const QuantFormat* format = nullptr;  // required
  // End-to-end stage (lsq; efficientqat's E2E-QP).
  int64_t steps = -1, batch = -1, seqlen = -1;
  double lr = -1;         // lsq, paretoq: latent weights; efficientqat: E2E-QP step sizes
  double quant_lr = -1;   // lsq: step sizes and zero points; paretoq: α
  int64_t warmup = -1;
  uint64_t seed = 0;
  bool distill = false;   // KL to the FP teacher's logits
  double lm_weight = 0;   // with distill: + lm_weight * cross-entropy
  int optimizer_bits = 32;  // AdamW state of the end-to-end stage: 32 or 8 (autograd/optim.h AdamWStateOptions)
  LsqInit init = LsqInit::Mse;  // lsq, l4q
  std::string paretoq_bits;     // paretoq: "1", "1.58", "2", "3", "4"; empty: from the format
  bool init_set = false;        // l4q: false = its own default (minmax, L4Q_init)
  int64_t lora_rank = -1;       // l4q
  double lora_alpha = -1;       // l4q
  // efficientqat Block-AP.
  int64_t nsamples = -1;  // calibration windows (of seqlen tokens)
  int block_epochs = -1;
  double block_lr = -1, block_quant_lr = -1;
  int64_t block_batch = -1;
  // Run control.
  std::string state_dir;        // resumable state (empty: none)
  double checkpoint_seconds = 60;
  int64_t stop_after_steps = 0;  // testing aid: return after this many end-to-end steps of this run
  int stop_after_blocks = 0;     // testing aid: return after this many Block-AP blocks of this run
  bool progress = true;
  bool verbose = false;
};

struct QatStage {
  std::string name;        // "e2e", "block-ap", "e2e-qp"
  int64_t steps = 0;       // optimizer steps (Block-AP: all blocks')
  int64_t tokens = 0;      // training tokens processed (Block-AP: per block, epochs x windows x seqlen)
  double loss_before = -1, loss_after = -1;  // e2e: the objective on fixed windows; Block-AP: mean MSE of the first / last epoch over blocks
  double seconds = 0;
  int64_t resumed_from = 0;  // step (or block) this run started at
  nlohmann::json hyper;      // the resolved hyper-parameters
};

struct QatResult {
  std::unique_ptr<LlamaModel> model;  // QuantLinear layers (null when stopped early)
  std::vector<QatStage> stages;
  bool complete = true;
  double seconds = 0;
};

class QatMethod {
 public:
  virtual ~QatMethod() = default;
  virtual std::string name() const = 0;
  // fp: the full-precision model (the teacher, never modified). stream: training token ids.
  virtual QatResult run(const LlamaModel& fp, const std::vector<int32_t>& stream) = 0;
};

struct QatMethodInfo {
  std::string name;
  std::string help;  // one line
  std::function<std::unique_ptr<QatMethod>(const QatConfig&)> make;
};

const std::vector<QatMethodInfo>& qat_registry();
void register_qat_method(QatMethodInfo info);  // throws when the name is taken or empty
const QatMethodInfo& find_qat_method(const std::string& name);  // throws listing the names
std::string qat_method_names();
std::string qat_method_help();  // "\n  name  help" lines
std::unique_ptr<QatMethod> make_qat_method(const std::string& name, const QatConfig& config);

// ---- building blocks (used by the methods; public for tests) --------------------------------
struct E2eOptions {
  int64_t steps = 100, batch = 8, seqlen = 256, warmup = 10;
  uint64_t seed = 0;
  bool distill = false;
  double lm_weight = 0;
  int optimizer_bits = 32;  // 8: block-wise 8-bit AdamW state (tensors under 4096 elements keep f32)
  std::string stage = "e2e";
  std::string key;          // hyper-parameters and data: part of the state's identity
  std::string state_path;   // empty: no resumable state
  double checkpoint_seconds = 60;
  int64_t stop_after = 0;
  bool progress = true;
};
struct E2eGroup {
  std::vector<Var> params;
  double lr = 1e-4, weight_decay = 0;
};
// Trains `groups` (parameters of `student`) end to end; `state` lists every tensor the resumable
// state must hold (trained ones and fixed ones that define the model). teacher: the FP model for
// distillation (may be null without distill). Returns the stage report; complete=false when stopped.
QatStage train_end_to_end(const LlamaModel& student, const LlamaModel* teacher, const std::vector<E2eGroup>& groups,
                          const std::vector<Var>& state, const std::vector<int32_t>& stream, const E2eOptions& o,
                          bool* complete);

// A 64-bit FNV-1a hash of the token ids (the data part of a state key).
uint64_t token_hash(const std::vector<int32_t>& stream);

}  // namespace lowbit

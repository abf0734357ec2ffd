#include "lowbit/train/finetune.h"

#include <cmath>
#include <filesystem>

#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/quant/quant_linear.h"

namespace lowbit {

namespace fs = std::filesystem;

FinetuneResult finetune_quantized(const std::string& model_dir, FinetuneOptions o, const std::vector<int32_t>& train,
                                  const std::vector<int32_t>& val) {
  if (o.lora_rank < 1) throw_error("finetune: --rank must be at least 1");
  if (o.train.out_dir.empty()) throw_error("finetune: an output directory (--out) is required");
  if (!is_lowbit_quantized_dir(model_dir))
    throw_error(model_dir, ": not a lowbit quantized checkpoint (make one with lowbit quantize)");
  QuantizedCheckpoint q = load_quantized_model(model_dir);
  o.train.config = q.dense.config;
  const LlamaConfig& c = o.train.config;
  check_training_inputs(o.train, train, val);
  if (o.train.seq_len > c.max_seq_len) throw_error("--seq-len ", o.train.seq_len, " exceeds the model's max_seq_len ", c.max_seq_len);
  for (const auto* s : {&train, &val})
    for (int32_t id : *s)
      if (id < 0 || id >= c.vocab_size) throw_error("token id ", id, " in the data is outside the model vocabulary (", c.vocab_size, ")");
  auto model = make_quantized_model(q, o.train.device);
  // KV-cache quantization passes no gradient to keys and values: trained without it, saved with it.
  ModelTransforms train_transforms = q.transforms;
  train_transforms.kv = KVQuantSpec{};
  model->set_transforms(train_transforms);
  FinetuneResult r;
  std::vector<Var> params;
  uint64_t seed = o.lora_seed * 7919 + 1;
  for (int i = 0; i < model->n_layers(); ++i)
    for (auto& [name, slot] : model->block(i).linears()) {
      auto* ql = dynamic_cast<QuantLinear*>(slot->get());
      if (!ql) continue;  // a dense layer: frozen as well
      if (!ql->has_lora()) {
        const int64_t in = ql->in_features(), out = ql->out_features();
        const double bound = 1.0 / std::sqrt(double(in));
        Tensor A = Tensor::uniform({o.lora_rank, in}, ++seed, -bound, bound).to(o.train.device);
        Tensor B = Tensor::zeros({out, o.lora_rank}, DType::F32, o.train.device);
        *slot = std::make_shared<QuantLinear>(ql->quantized(), ql->bias(), o.train.device, A, B);
        ql = static_cast<QuantLinear*>(slot->get());
        ++r.adapters_created;
      } else {
        ++r.adapters_reused;
      }
      ql->set_lora_trainable(true);
      for (auto& p : ql->parameters()) params.push_back(p);
    }
  if (params.empty()) throw_error(model_dir, ": no quantized linear layer to attach adapters to");
  if (!val.empty()) r.val_loss_before = validation_loss(*model, val, o.train.seq_len, o.train.batch_size, o.train.eval_batches);
  r.train = run_training(*model, params, o.train, train, val);
  if (!r.train.complete) return r;
  r.val_loss_after = r.train.final_val_loss;
  const QuantFormat& f = quant_format(q.format);
  model->set_transforms(q.transforms);
  save_quantized_model((fs::path(o.train.out_dir) / "model").string(), *model, q.method.empty() ? "finetuned" : q.method, f,
                       {{"finetune", {{"steps", r.train.steps_done}, {"lora_rank", o.lora_rank}, {"lr", o.train.lr}}}});
  return r;
}

}  // namespace lowbit

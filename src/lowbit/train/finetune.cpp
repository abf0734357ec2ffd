#include "lowbit/train/finetune.h"

#include <cmath>
#include <filesystem>
#include <optional>

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
  const LowPrecisionOptions& lpo = o.train.low_precision;
  std::optional<LpTraining> lp;  // --precision: the adapters' products
  std::vector<std::shared_ptr<const LpProduct>> lp_owned;
  if (lpo.enabled()) {
    check_low_precision_options(lpo, c.n_layers);
    if (lpo.recipe.precision == LpPrecision::FP4_DGE && o.train.device != Device::CPU)
      throw_error("finetune --precision fp4-dge: no CUDA body yet (the outlier quantile of OCC and the DGE derivative "
                  "run on the CPU only): use --device cpu");
    if (o.train.bf16) throw_error("finetune --precision: not with bf16 mixed precision");
    lp.emplace();
    lp->context = std::make_shared<LpContext>();
    lp->context->seed = o.train.seed;
    lp->key = low_precision_key(lpo, c.n_layers);
    r.precision = lp->key;
  }
  int64_t lp_id = 0;  // two per adapter-holding layer (A's product, B's), in block order
  std::vector<Var> params;
  uint64_t seed = o.lora_seed * 7919 + 1;
  for (int i = 0; i < model->n_layers(); ++i)
    for (auto& [name, slot] : model->block(i).linears()) {
      auto* ql = dynamic_cast<QuantLinear*>(slot->get());
      if (!ql) continue;  // a dense layer: frozen as well
      if (ql->incoherence().defined())
        throw_error("finetune: model.layers.", i, ".", name, " has QuIP incoherence transforms (quantize --method quip); "
                    "LoRA adapters on such layers are not supported");
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
      if (lp) {
        const int64_t id = lp_id;
        lp_id += 2;
        if (lp_block_kept(lpo, i, model->n_layers())) continue;
        auto pa = std::make_shared<const LpProduct>(lpo.recipe, lp->context, id);
        auto pb = std::make_shared<const LpProduct>(lpo.recipe, lp->context, id + 1);
        ql->set_lora_products(pa, pb);
        lp->products.push_back(pa.get());
        lp->products.push_back(pb.get());
        lp_owned.push_back(pa);
        lp_owned.push_back(pb);
      }
    }
  if (params.empty()) throw_error(model_dir, ": no quantized linear layer to attach adapters to");
  if (lp && lp->products.empty())
    throw_error("finetune --precision ", lp_precision_name(lpo.recipe.precision), ": ", model_dir,
                " has no quantized linear layer outside the blocks --lp-keep-first / --lp-keep-last keep in f32");
  if (!val.empty()) r.val_loss_before = validation_loss(*model, val, o.train.seq_len, o.train.batch_size, o.train.eval_batches);
  r.train = run_training(*model, params, o.train, train, val, nullptr, lp ? &*lp : nullptr);
  if (!r.train.complete) return r;
  r.val_loss_after = r.train.final_val_loss;
  if (lp && !val.empty()) {  // the saved model: the adapters' products in f32
    lp->context->high_precision = true;
    r.val_loss_after_f32 = validation_loss(*model, val, o.train.seq_len, o.train.batch_size, o.train.eval_batches);
    lp->context->high_precision = false;
  }
  const QuantFormat& f = quant_format(q.format);
  model->set_transforms(q.transforms);
  save_quantized_model((fs::path(o.train.out_dir) / "model").string(), *model, q.method.empty() ? "finetuned" : q.method, f,
                       {{"finetune", {{"steps", r.train.steps_done}, {"lora_rank", o.lora_rank}, {"lr", o.train.lr},
                                                 {"precision", r.precision}}}});
  return r;
}

}  // namespace lowbit

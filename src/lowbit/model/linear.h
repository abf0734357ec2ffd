// A linear layer y = x W^T (+ b) as the model sees it. The dense layer holds a full-precision
// weight; quantization methods replace layers with their own kinds (fake-quantized with LoRA
// for ApiQ training, packed low-bit for inference) through the same interface, so the model's
// data path stays one piece of code.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "lowbit/autograd/variable.h"

namespace lowbit {

// Which way a linear layer is cut for tensor parallelism (model/tensor_parallel.h): Rows keeps output
// rows [begin, end) (a column-parallel piece: y's columns begin..end-1, complete), Cols keeps input
// columns [begin, end) (a row-parallel piece: the partial product x[:, begin:end] W[:, begin:end]^T,
// which the ranks' pieces sum to).
enum class ShardAxis : uint8_t { Rows, Cols };

namespace ops {
struct PackedWeight;
struct QuantMatmulOptions;
}  // namespace ops

class Linear {
 public:
  virtual ~Linear() = default;
  virtual Var forward(const Var& x) const = 0;  // x [M, in] -> [M, out]
  virtual int64_t in_features() const = 0;
  virtual int64_t out_features() const = 0;
  virtual std::vector<Var> parameters() const = 0;  // trainable ones
  // The effective full-precision weight [out, in] (dequantized for quantized layers).
  virtual Tensor effective_weight() const = 0;
  virtual Tensor bias() const { return Tensor(); }
  virtual std::string kind() const = 0;
  // Tensor parallelism: this layer's piece along `axis` ([begin, end) of its output rows or input
  // columns), a frozen layer of the same kind holding only that piece of the weight (and of the
  // bias: Rows slices it, Cols keeps it in the piece that starts at column 0 only, so the ranks'
  // partial sums add it once), on `device` (only the piece is copied there). Throws lowbit::Error
  // when the kind cannot be cut (the default) or the cut does not fall on its storage's groups
  // (column_shard_unit).
  virtual std::shared_ptr<Linear> shard(ShardAxis axis, int64_t begin, int64_t end, Device device) const;
  // Cols cuts must fall on multiples of this many input columns (1: anywhere; packed weights: their
  // groups or blocks); 0: the layer cannot be cut by input columns.
  virtual int64_t column_shard_unit() const { return 0; }
  // True when forward(x) is exactly ops::quant_matmul(x, w, y, opt) on the CPU and nothing else (a
  // packed layer without bias or adapters, x f32 on the CPU needing no gradient); then w and opt are
  // set. Lets a model run the layers that read one input in one ops::quant_matmul_many call.
  virtual bool packed_product(const Var& /*x*/, ops::PackedWeight& /*w*/, ops::QuantMatmulOptions& /*opt*/) const {
    return false;
  }
};

class DenseLinear : public Linear {
 public:
  // weight [out, in]; bias [out] or undefined. trainable: weight (and bias) require grad.
  DenseLinear(Tensor weight, Tensor bias, bool trainable);
  Var forward(const Var& x) const override;
  int64_t in_features() const override { return weight_.shape()[1]; }
  int64_t out_features() const override { return weight_.shape()[0]; }
  std::vector<Var> parameters() const override;
  Tensor effective_weight() const override { return weight_.value(); }
  Tensor bias() const override { return bias_.defined() ? bias_.value() : Tensor(); }
  std::string kind() const override { return "dense"; }
  std::shared_ptr<Linear> shard(ShardAxis axis, int64_t begin, int64_t end, Device device) const override;
  int64_t column_shard_unit() const override { return 1; }
  const Var& weight_var() const { return weight_; }

 private:
  Var weight_, bias_;
};

}  // namespace lowbit

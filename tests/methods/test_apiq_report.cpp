// ApiqMethod's tail after training: the block-wise error report keeps exactly report_sample()'s
// strided rows of each linear's inputs (InputCapture copies only those rows off the device), and
// the stage times of the last block are exposed. CPU, and CUDA when present.
#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

#include "lowbit/methods/apiq.h"
#include "lowbit/ops/device_init.h"

using namespace lowbit;

namespace {

LlamaModel tiny_model(Device dev) {
  LlamaConfig c;
  c.dim = 64;
  c.hidden_dim = 160;
  c.n_layers = 1;
  c.n_heads = c.n_kv_heads = 4;
  c.vocab_size = 32;
  c.max_seq_len = 256;
  return LlamaModel(c, weights_to(random_weights(c, 1, 0.1), dev), false);
}

void check_report_rows(Device dev, ApiqMode mode, int64_t batch) {
  const QuantFormat& f = parse_quant_format("int2g32");
  LlamaModel model = tiny_model(dev);
  // 4 windows of an odd length: 644 rows > kReportRows, so the report keeps every 2nd row, and the
  // chunks a hook sees start at odd and even offsets.
  const int64_t N = 4, L = 161;
  const Tensor X = Tensor::randn({N * L, 64}, 99, 1.0).to(dev);
  const Tensor none;
  const Tensor Y = BlockContext{model, 0, N, L, X, none, batch}.run_block(X);
  std::map<std::string, Tensor> w_fp;
  for (auto& [name, slot] : model.block(0).linears())
    w_fp[name] = (*slot)->effective_weight().to(Device::CPU).to(DType::F32).contiguous().clone();

  ApiqOptions o;
  o.mode = mode;
  o.layer.rank = 2;
  o.epochs = 1;
  o.batch = 2;
  ApiqMethod m(f, o);
  EXPECT_EQ(m.last_block_times().layer, -1);
  BlockContext ctx{model, 0, N, L, X, Y, batch};
  std::vector<LinearReport> reports;
  m.quantize_block(ctx, reports);
  ASSERT_EQ(reports.size(), 7u);

  const ApiqBlockTimes& t = m.last_block_times();
  EXPECT_EQ(t.layer, 0);
  for (double s : {t.train, t.finalize, t.install, t.report, t.capture}) EXPECT_GE(s, 0.0);
  EXPECT_GT(t.train, 0.0);
  EXPECT_GT(t.total(), 0.0);
  if (mode == ApiqMode::Layer) EXPECT_GT(t.capture, 0.0);
  else EXPECT_EQ(t.capture, 0.0);
  if (mode == ApiqMode::Layer) return;  // layer-wise reports on each linear's full training inputs

  // Independently: every input row of every linear (after the block is quantized), then
  // report_sample's strided subsample; the reported errors must be exactly these.
  std::map<std::string, std::vector<Tensor>> all;
  ctx.run_block(X, [&](const std::string& name, const Tensor& x) {
    all[name].push_back(x.to(Device::CPU).to(DType::F32).contiguous().clone());
  });
  for (const auto& r : reports) {
    const std::string name = r.name.substr(std::string("model.layers.0.").size());
    ASSERT_TRUE(all.count(name)) << r.name;
    int64_t n = 0;
    for (const auto& c : all[name]) n += c.size(0);
    ASSERT_EQ(n, N * L);
    Tensor rows = Tensor::empty({n, all[name].front().size(1)});
    n = 0;
    for (const auto& c : all[name]) rows.slice(0, n, n + c.size(0)).copy_(c), n += c.size(0);
    Tensor q;
    for (auto& [n2, slot] : model.block(0).linears())
      if (n2 == name) q = (*slot)->effective_weight();
    // The block-wise report keeps the rows and computes the error on the model's device (strict
    // f32 there); the same computation on the same device gives the same number, up to cuBLAS's
    // choice of kernels.
    const double want = relative_output_error(report_sample(rows).to(dev), w_fp[name], q);
    if (dev == Device::CPU) {
      EXPECT_EQ(r.rel_error, want) << r.name << " batch " << batch;
    } else {
      EXPECT_NEAR(r.rel_error, want, 1e-6 * want) << r.name << " on " << device_name(dev) << " batch " << batch;
    }
    EXPECT_GT(r.rel_error, 0.0) << r.name;
  }
}

}  // namespace

TEST(ApiqReport, BlockwiseReportUsesReportSampleRowsCpu) {
  for (int64_t batch : {1, 3}) check_report_rows(Device::CPU, ApiqMode::Block, batch);
  check_report_rows(Device::CPU, ApiqMode::Layer, 2);
}

TEST(ApiqReport, BlockwiseReportUsesReportSampleRowsCuda) {
  if (!init_cuda()) GTEST_SKIP() << "no CUDA device (or a CPU-only build)";
  for (int64_t batch : {1, 3}) check_report_rows(Device::CUDA, ApiqMode::Block, batch);
  check_report_rows(Device::CUDA, ApiqMode::Layer, 2);
}

// End-to-end GPTQ pipeline on a Llama-2-7B-shaped model (random weights): the speed goal
// is < 5 minutes for 32 blocks with 128 x 2048 calibration tokens at int4g128 on an H100.
//   bench_gptq_7b [--layers N] [--nsamples 128] [--seqlen 2048] [--format int4g128] [--device cuda]
//                 [--tf32 0|1] [--fp64-factor 0|1] [--act-order 0|1]
// Prints JSON: seconds (pipeline only, GPU work finished; weight init excluded), per-block seconds
// (the first block's warm-up included), the GPTQ phases
// (gptq.h GptqPhaseSeconds; the rest of the pipeline time is its own FP-target and next-input
// passes), peak GPU and host memory. With --layers < 32 the full-model time is extrapolated per
// block and labelled as such. --tf32 1 lets f32 GEMMs (forward passes, Hessians, reports) use TF32
// tensor cores (10-bit mantissa inputs, like the fp16 activations of the reference gptq.py); the
// GPTQ column sweep and its trailing updates always run in full f32.
#include <omp.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>

#include "bench_util.h"
#include "lowbit/methods/calibration.h"
#include "lowbit/methods/ptq_methods.h"
#include "lowbit/ops/device_init.h"

using namespace lowbit;
using lowbit::bench::fast_random;
using lowbit::bench::random_mha_layer;


int main(int argc, char** argv) {
  int layers = 32;
  int64_t nsamples = 128, seqlen = 2048, batch = 8;
  std::string format = "int4g128", device = "cuda";
  bool tf32 = false, fp64_factor = true, act_order = false;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--layers") layers = std::stoi(v);
    else if (k == "--nsamples") nsamples = std::stoll(v);
    else if (k == "--seqlen") seqlen = std::stoll(v);
    else if (k == "--format") format = v;
    else if (k == "--device") device = v;
    else if (k == "--batch") batch = std::stoll(v);
    else if (k == "--tf32") tf32 = v == "1";
    else if (k == "--fp64-factor") fp64_factor = v == "1";
    else if (k == "--act-order") act_order = v == "1";
    else {
      std::fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  try {
    Device dev = Device::CPU;
    if (device == "cuda") {
      if (!init_cuda()) throw Error("no CUDA device");
      dev = Device::CUDA;
      cuda_set_allow_tf32(tf32);
    }
    LlamaConfig c;
    c.dim = 4096;
    c.hidden_dim = 11008;
    c.n_layers = layers;
    c.n_heads = c.n_kv_heads = 32;
    c.vocab_size = 32000;
    c.max_seq_len = 4096;
    auto t0 = std::chrono::steady_clock::now();
    LlamaWeights w;
    uint64_t seed = 1;
    auto rnd = [&](Shape s) { return fast_random(s, seed++, 0.02).to(dev); };
    auto ones = [&](int64_t n) { return Tensor::full({n}, 1.0).to(dev); };
    w.tok_embeddings = rnd({c.vocab_size, c.dim});
    w.final_norm = ones(c.dim);
    w.output = rnd({c.vocab_size, c.dim});
    c.tied_embeddings = false;
    for (int i = 0; i < layers; ++i) w.layers.push_back(random_mha_layer(c.dim, c.hidden_dim, seed, dev));
    LlamaModel model(c, w, false);
    w = LlamaWeights{};
    const double init_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::vector<int32_t> stream(size_t(nsamples * seqlen * 2));
    for (size_t i = 0; i < stream.size(); ++i) stream[i] = int32_t((i * 2654435761ull) % 32000);
    Tensor calib = sample_calibration(stream, nsamples, seqlen, 0);
    const QuantFormat& f = parse_quant_format(format);
    GptqOptions go;
    go.cuda_fp64_factorization = fp64_factor;
    go.act_order = act_order;
    GptqMethod gptq(f, go);
    gptq_phase_seconds() = {};
    PipelineOptions o;
    o.batch = batch;
    if (dev == Device::CUDA) cuda_reset_peak();
    const auto t1 = std::chrono::steady_clock::now();
    PipelineReport r = run_blockwise(model, calib, gptq, f, o);
    if (dev == Device::CUDA) cuda_synchronize();  // the last block's queued work
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
    const double per_block = seconds / layers;
    const GptqPhaseSeconds& ph = gptq_phase_seconds();
    double mean_err = 0;
    for (const auto& l : r.linears) mean_err += l.rel_error / double(r.linears.size());
    std::printf(
        "{\"bench\": \"gptq_7b_shape\", \"device\": \"%s\", \"format\": \"%s\", \"layers\": %d, \"nsamples\": %lld, "
        "\"seqlen\": %lld, \"init_seconds\": %.1f, \"pipeline_seconds\": %.1f, \"seconds_per_block\": %.2f, "
        "\"extrapolated_32_blocks_seconds\": %.1f, \"peak_gpu_bytes\": %lld, \"peak_host_rss_bytes\": %lld, "
        "\"omp_threads\": %d, \"bits_per_weight\": %.3f, \"tf32\": %d, \"fp64_factor\": %d, \"act_order\": %d, "
        "\"phase_seconds\": {\"capture\": %.2f, \"quantize\": %.2f, \"report\": %.2f, \"install\": %.2f, "
        "\"other_pipeline\": %.2f}, \"mean_rel_output_error\": %.5f}\n",
        dev == Device::CUDA ? cuda_device_name().c_str() : "cpu", f.name, layers, (long long)nsamples, (long long)seqlen,
        init_s, seconds, per_block, per_block * 32, dev == Device::CUDA ? (long long)cuda_peak_bytes() : 0LL,
        (long long)r.peak_rss_bytes, omp_get_max_threads(), r.bits_per_weight, int(tf32), int(fp64_factor), int(act_order),
        ph.capture, ph.quantize, ph.report, ph.install, seconds - ph.capture - ph.quantize - ph.report - ph.install,
        mean_err);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_gptq_7b: %s\n", e.what());
    return 1;
  }
  return 0;
}

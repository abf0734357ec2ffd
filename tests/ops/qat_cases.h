// The cases of the QAT quantizer ops' tests (test_qat_quant.cpp: CPU reference; test_parity.cpp:
// CPU vs CUDA): uniform integer formats as FormatTraits rows (the ops layer has no format registry)
// and ParetoQ's three low-bit grids, with shapes whose last group is short.
#pragma once
#include <string>
#include <vector>

#include "lowbit/core/tensor.h"
#include "lowbit/ops/qat_quant.h"

namespace lowbit::test {

struct QatFormatCase {
  FormatTraits f;
  int64_t out, in;
};

inline FormatTraits qat_traits(const char* name, QuantKind kind, int bits, int64_t group) {
  return FormatTraits{QuantFormatId::Int2G64, name, kind, bits,
                      group ? ScaleGranularity::PerGroup : ScaleGranularity::PerChannel, group, ScaleType::F16,
                      kind == QuantKind::IntAsym, false, 0, -1};
}

// asymmetric int2 g64 (2 full groups), symmetric int4 g32 on 100 columns (a short last group),
// asymmetric int3 per channel, symmetric int2 g64 on 300 columns (ternary / sign storage).
inline std::vector<QatFormatCase> qat_format_cases() {
  return {{qat_traits("int2g64", QuantKind::IntAsym, 2, 64), 5, 128},
          {qat_traits("int4g32s", QuantKind::IntSym, 4, 32), 7, 100},
          {qat_traits("int3pc", QuantKind::IntAsym, 3, 0), 3, 257},
          {qat_traits("int2g64s", QuantKind::IntSym, 2, 64), 33, 300}};
}

struct SeqCase {
  const char* name;
  ops::SeqGrid q;
};
inline std::vector<SeqCase> seq_cases() {
  return {{"sign", {true, 1.0, 0.0, 1.0}}, {"1.58", {false, 1.5, 0.0, 1.0}}, {"2", {false, 2.0, 0.5, 0.75}}};
}

// Parameters of one case in f32 (cast to f64 by the callers that want it): w ~ N(0, 1); steps and
// α uniform in [0.2, 0.8] per group (some elements clamp, most do not); offsets real-valued across
// the code range (rounded in the forward).
struct QatParams {
  Tensor w, step, offset, alpha, dy, codes;
};
inline QatParams qat_params(const QatFormatCase& c, uint64_t seed) {
  QatParams p;
  const Shape gs{c.out, c.f.n_groups(c.in)};
  p.w = Tensor::randn({c.out, c.in}, seed, 1.0, DType::F32);
  p.step = Tensor::uniform(gs, seed + 1, 0.2, 0.8, DType::F32);
  if (c.f.kind == QuantKind::IntAsym) p.offset = Tensor::uniform(gs, seed + 2, -0.4, double(c.f.qmax()) + 0.4, DType::F32);
  p.alpha = Tensor::uniform(gs, seed + 3, 0.5, 2.5, DType::F32);
  p.dy = Tensor::randn({c.out, c.in}, seed + 4, 1.0, DType::F32);
  p.codes = Tensor::uniform({c.out, c.in}, seed + 5, -3.0, 3.0, DType::F32);
  return p;
}

}  // namespace lowbit::test

// PTQTP (Xiao et al. 2025, "PTQTP: Post-Training Quantization to Trit-Planes for Large Language
// Models", arXiv 2509.16989; what the paper says and where lowbit departs from it:
// docs/results/ptqtp.md, "What the paper says vs lowbit"): every group of 128 weights of a row is
// approximated by two ternary planes with one scale each, w ~ a1 * t1 + a2 * t2, t1, t2 in {-1, 0, 1},
// stored in the tp2g128 format (quant/format.h). Data-free: the fit minimises the weight error
// ||w - a1 t1 - a2 t2||^2 of each group on its own, by alternating two exact steps:
//   scale step  given t1, t2: (a1, a2) = (S^T S + lambda I)^-1 S^T w, S = [t1 t2] (n x 2), the paper's
//               2 x 2 adaptive ridge regression in closed form; lambda adaptive (below);
//   trit step   given a1, a2: each weight takes the pair (t1, t2) of the nine whose value
//               t1 a1 + t2 a2 is nearest (exhaustive, exact).
// Initialisation, the paper's progressive decomposition (its framework figure: dense +-1 planes, one
// scale per ROW, then reshaped into groups): t1 = sign(w), a1 = mean|w| over the row; t2 = sign(r),
// r = w - a1 t1 (a2 = mean|r|); each group then starts from these planes with its own scale step.
// Iterations stop at a fixed point (no trit changed), when the scales move by less than tol
// (relative), or after max_iters (the paper's T_max; its value is not in the accessible text).
// Adaptive ridge (the paper's lambda_i is "adaptive, for numerical stability"; its exact rule is not in
// the accessible text, this is lowbit's): lambda = lambda0 * tr(S^T S) / 2, raised where needed so that
// cond(S^T S + lambda I) <= cond_max (planes nearly collinear, or one plane empty). A scale step that
// would raise the error (possible with lambda > 0) is not taken, so the error is non-increasing over
// iterations. lowbit's addition (PtqtpOptions::start, the default): the alternation starts from the
// balanced-ternary grid a1 = 3 a2 = 3 amax / 4 (the format's RTN) instead, or from both (the fit with
// the lower weight error kept). The lowest weight error is not the best model: the paper's start gives
// up a group's largest weights, which SmolLM2-135M needs (docs/results/ptqtp.md). Finally the scales are
// rounded to f16 and the trit step is run once more with the stored scales (quantize_with_params), so
// the codes are optimal for what is stored. PtqtpOptions::row_scales fits one (a1, a2) per row (the
// paper's formulation without the group reshape), stored repeated in every group of tp2g128 (same
// accuracy as a per-row format would have; no per-row format exists).
#pragma once
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "lowbit/methods/pipeline.h"
#include "lowbit/quant/quantized_tensor.h"

namespace lowbit {

// Where the alternation starts: the paper's progressive sign decomposition, the format's RTN grid,
// or both (the better fit kept).
enum class PtqtpStart { Paper, Grid, Both };
const char* ptqtp_start_name(PtqtpStart s);
PtqtpStart parse_ptqtp_start(const std::string& s);  // "paper", "grid", "both"; throws otherwise

struct PtqtpOptions {
  int max_iters = 50;       // iteration cap of the alternating procedure (the paper's T_max)
  double tol = 1e-4;        // stop when max|delta a| <= tol * max|a|
  double lambda0 = 1e-6;    // base ridge, relative to tr(S^T S) / 2
  double cond_max = 1e4;    // adaptive ridge: cond(S^T S + lambda I) <= cond_max
  // grid: measured best on SmolLM2-135M (WikiText-2 ppl 111.7 vs 172.4 both, 210.2 paper; RTN 128.4),
  // both: best on stories260K (5.06 vs 5.84 grid, 5.29 paper); docs/results/ptqtp.md.
  PtqtpStart start = PtqtpStart::Grid;
  bool row_scales = false;  // one (a1, a2) per row instead of per group of 128
};

// The two planes as one code per weight: q = 3 (t2 + 1) + (t1 + 1) in [0, 8] (tp2g128's codes).
inline int tp_t1(uint8_t q) { return int(q % 3) - 1; }
inline int tp_t2(uint8_t q) { return int(q / 3) - 1; }
inline uint8_t tp_code(int t1, int t2) { return uint8_t(3 * (t2 + 1) + (t1 + 1)); }

// Scale step: the ridge least-squares (a1, a2) for fixed codes q[0, n) (lambda as described above;
// lambda_used, when not null, receives the ridge applied).
void ptqtp_solve_scales(const float* w, const uint8_t* q, int64_t n, const PtqtpOptions& o, double& a1, double& a2,
                        double* lambda_used = nullptr);
// Trit step: every q[i] becomes the pair nearest to w[i] for the scales (a1, a2) (ties: lower code).
void ptqtp_assign_trits(const float* w, int64_t n, double a1, double a2, uint8_t* q);
// Squared error sum_i (w_i - t1 a1 - t2 a2)^2.
double ptqtp_group_error(const float* w, const uint8_t* q, int64_t n, double a1, double a2);

struct PtqtpGroupFit {
  double a1 = 0, a2 = 0;      // f32-precision scales (before the f16 rounding of the format)
  std::vector<uint8_t> q;     // codes for (a1, a2)
  int iters = 0;              // alternations run
  std::vector<double> errors; // squared error after the initialisation and after each iteration
                              // (of the start that was kept)
};
// The whole alternating procedure on one group of n weights. row_a1: the first plane's initial scale
// mean|w| over the whole row (the paper's start; the second plane's signs and initial scale follow
// from it over the group); NaN: the group's own mean|w| (the group is the row).
PtqtpGroupFit ptqtp_fit_group(const float* w, int64_t n, const PtqtpOptions& o,
                              double row_a1 = std::numeric_limits<double>::quiet_NaN());

struct PtqtpStats {
  int64_t groups = 0;
  double mean_iters = 0;
  int max_iters_hit = 0;  // groups stopped by the iteration cap
};
// Quantizes W [out, in] into a trit-plane format (tp2g128): every group fitted, scales rounded to
// f16, codes re-assigned for them. Throws for other formats.
QuantizedTensor ptqtp_quantize(const Tensor& w, const QuantFormat& f, const PtqtpOptions& o, PtqtpStats* stats = nullptr);

// The block method: each linear of the block quantized on its own (data-free; calibration inputs,
// when given, only feed the error report). Layers of a mixed plan in another format get RTN.
class PtqtpMethod : public BlockMethod {
 public:
  PtqtpMethod(const QuantFormat& f, PtqtpOptions o);
  std::string name() const override { return "ptqtp"; }
  std::string options_key() const override;
  void quantize_block(BlockContext& ctx, std::vector<LinearReport>& reports) override;

 private:
  const QuantFormat& f_;
  PtqtpOptions o_;
};

}  // namespace lowbit

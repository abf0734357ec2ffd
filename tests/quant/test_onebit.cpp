// OneBit (quant/onebit.h, issue 15): SVID on a worked example and on random weights (power
// iteration and NMF agree, are non-negative and beat the scalar absmean scale), the onebit format
// (packing, decode, bad tensors), the straight-through weight function against finite differences
// of its surrogate, and the training layer's packed export.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "common/expect_message.h"
#include "lowbit/ops/quant_matmul.h"
#include "lowbit/quant/format.h"
#include "lowbit/quant/onebit.h"
#include "lowbit/quant/quantize.h"
#include "lowbit/quant/quantized_tensor.h"

using namespace lowbit;

namespace {

double frob_err(const Tensor& a, const Tensor& b) {
  const Tensor x = a.to(DType::F64).contiguous(), y = b.to(DType::F64).contiguous();
  double e = 0;
  for (int64_t i = 0; i < x.numel(); ++i) e += (x.data<double>()[i] - y.data<double>()[i]) * (x.data<double>()[i] - y.data<double>()[i]);
  return std::sqrt(e);
}

// sign(W) * mean|W| (BitNet's absmean scale / ParetoQ's 1-bit init, one scalar for the tensor).
Tensor absmean_sign(const Tensor& w_in) {
  const Tensor w = w_in.to(DType::F64).contiguous();
  double m = 0;
  for (int64_t i = 0; i < w.numel(); ++i) m += std::fabs(w.data<double>()[i]);
  m /= double(w.numel());
  Tensor y = Tensor::empty(w.shape(), DType::F64);
  for (int64_t i = 0; i < w.numel(); ++i) y.data<double>()[i] = w.data<double>()[i] >= 0 ? m : -m;
  return y;
}

// diag(h) sign(W) diag(g) in f64 from an Svid.
Tensor svid_weight(const Tensor& w_in, const Svid& s) {
  const Tensor w = w_in.to(DType::F64).contiguous();
  const int64_t out = w.size(0), in = w.size(1);
  Tensor y = Tensor::empty({out, in}, DType::F64);
  for (int64_t i = 0; i < out; ++i)
    for (int64_t j = 0; j < in; ++j) {
      const double v = s.h[size_t(i)] * s.g[size_t(j)];
      y.data<double>()[i * in + j] = w.data<double>()[i * in + j] >= 0 ? v : -v;
    }
  return y;
}

// Rows of different scale and columns of different scale (what SVID's two vectors capture):
// W_ij = r_i c_j z_ij with z standard normal.
Tensor scaled_weight(int64_t out, int64_t in, uint64_t seed) {
  Tensor w = Tensor::randn({out, in}, seed, 1.0, DType::F64);
  for (int64_t i = 0; i < out; ++i)
    for (int64_t j = 0; j < in; ++j) w.data<double>()[i * in + j] *= (0.2 + 0.1 * double(i % 7)) * (0.5 + 0.05 * double(j % 11));
  return w;
}

}  // namespace

// A worked example: |W| is exactly rank 1, |W| = u vᵀ with u = (1, 2), v = (3, 1, 2), so SVID
// reconstructs W exactly: h gᵀ = u vᵀ with ‖h‖ = ‖g‖ (the balance), h = u √(‖v‖/‖u‖).
TEST(OneBitSvid, RecoversAnExactlyRankOneMagnitude) {
  const Tensor w = Tensor::from_vector(std::vector<double>{3, -1, 2, -6, 2, -4}, {2, 3});
  for (SvidMethod m : {SvidMethod::Power, SvidMethod::Nmf}) {
    const Svid s = svid(w, m);
    ASSERT_EQ(s.h.size(), 2u);
    ASSERT_EQ(s.g.size(), 3u);
    const double k = std::sqrt(std::sqrt(14.0) / std::sqrt(5.0));  // ‖v‖ = √14, ‖u‖ = √5
    EXPECT_NEAR(s.h[0], 1 * k, 1e-9) << svid_method_name(m);
    EXPECT_NEAR(s.h[1], 2 * k, 1e-9) << svid_method_name(m);
    EXPECT_NEAR(s.g[0], 3 / k, 1e-9) << svid_method_name(m);
    EXPECT_NEAR(s.g[1], 1 / k, 1e-9) << svid_method_name(m);
    EXPECT_NEAR(s.g[2], 2 / k, 1e-9) << svid_method_name(m);
    EXPECT_LT(frob_err(svid_weight(w, s), w), 1e-9) << svid_method_name(m);
  }
  // Packed (h and g at f16): the decoded weight is W up to f16 rounding of the values.
  const QuantizedTensor q = onebit_quantize(w);
  const Tensor d = q.dequantize();
  for (int64_t i = 0; i < 6; ++i) EXPECT_NEAR(d.data<float>()[i], w.data<double>()[i], 2e-3 * std::fabs(w.data<double>()[i]));
}

// On weights whose |W| is not rank 1: both factorisations are non-negative, agree (the rank-1
// non-negative optimum is |W|'s dominant singular pair), and reconstruct better than one absmean
// scale for the whole tensor — by 17-18 % on these weights (rows and columns of different scales;
// the rest of the error is |z|'s spread around its mean, which no rank-1 factor removes): > 10 % asserted.
TEST(OneBitSvid, PowerAndNmfAgreeAreNonNegativeAndBeatAbsmean) {
  for (uint64_t seed : {1u, 2u, 3u}) {
    const Tensor w = scaled_weight(24, 40, seed);
    const Svid p = svid(w, SvidMethod::Power, 500), n = svid(w, SvidMethod::Nmf, 500);
    for (const Svid* s : {&p, &n}) {
      for (double x : s->h) EXPECT_GE(x, 0.0);
      for (double x : s->g) EXPECT_GE(x, 0.0);
    }
    const double ep = frob_err(svid_weight(w, p), w), en = frob_err(svid_weight(w, n), w);
    const double ea = frob_err(absmean_sign(w), w);
    EXPECT_NEAR(ep, en, 1e-6 * ep) << "seed " << seed;
    EXPECT_LT(ep, 0.9 * ea) << "seed " << seed << ": SVID " << ep << " vs absmean " << ea;
    // The packed tensor (f16 values) keeps the advantage.
    EXPECT_LT(frob_err(onebit_quantize(w).dequantize(), w), 0.9 * ea) << "seed " << seed;
  }
  // Plain Gaussian weights (no row/column structure): still no worse than absmean.
  const Tensor g = Tensor::randn({32, 48}, 9, 0.05, DType::F64);
  EXPECT_LE(frob_err(svid_weight(g, svid(g)), g), frob_err(absmean_sign(g), g) * (1 + 1e-12));
  EXPECT_THROW(parse_svid_method("svd"), Error);
}

TEST(OneBitFormat, TableRowStorageAndDecode) {
  const QuantFormat& f = parse_quant_format("onebit");
  EXPECT_EQ(int(f.id), 48);  // stable id (written to checkpoints)
  EXPECT_EQ(f.kind, QuantKind::SignValue);
  EXPECT_TRUE(f.has_column_scales());
  EXPECT_FALSE(f.has_column_mask());
  EXPECT_EQ(f.row_bytes(64), 8);
  EXPECT_EQ(f.row_bytes(65), 9);
  // [64, 64]: 1 bit + 16 / in (g) + 16 / out (h) per weight = 1.5
  EXPECT_DOUBLE_EQ(f.bits_per_weight(64, 64), 1.5);
  EXPECT_NEAR(f.bits_per_weight(4096, 4096), 1.0 + 32.0 / 4096, 1e-12);
  // Decode: w_ij = h_i (+-1) g_j, the sign bit 1 = +1; sign(0) = +1.
  const Tensor w = Tensor::from_vector(std::vector<float>{0.5f, -0.25f, 0.0f, -1.0f, 2.0f, 0.125f, -0.5f, 1.0f, 3.0f},
                                       {1, 9});
  const QuantizedTensor q = onebit_pack(w, {2.0}, {1, 1, 1, 1, 1, 1, 1, 1, 0.5});
  EXPECT_EQ(q.codes.shape(), Shape({1, 2}));
  EXPECT_EQ(q.codes.data<uint8_t>()[0], 0b10110101);  // columns 0, 2, 4, 5, 7 are >= 0
  EXPECT_EQ(q.codes.data<uint8_t>()[1], 0b1);
  const Tensor d = q.dequantize();
  const float want[9] = {2, -2, 2, -2, 2, 2, -2, 2, 1};
  for (int j = 0; j < 9; ++j) EXPECT_EQ(d.data<float>()[j], want[j]) << j;
  std::vector<uint8_t> codes(9);
  q.unpack_row(0, codes.data());
  for (int j = 0; j < 9; ++j) EXPECT_EQ(codes[size_t(j)], want[j] > 0 ? 1 : 0) << j;
  // A row slice and a column slice (whole bytes) decode to the same values.
  const QuantizedTensor big = onebit_quantize(scaled_weight(6, 40, 4));
  const Tensor bd = big.dequantize();
  const QuantizedTensor cs = big.slice_cols(8, 24), rs = big.slice_rows(2, 5);
  EXPECT_EQ(big.column_shard_unit(), 8);
  for (int64_t i = 0; i < 6; ++i)
    for (int64_t j = 8; j < 24; ++j) EXPECT_EQ(cs.dequantize().data<float>()[i * 16 + j - 8], bd.data<float>()[i * 40 + j]);
  for (int64_t i = 2; i < 5; ++i)
    for (int64_t j = 0; j < 40; ++j) EXPECT_EQ(rs.dequantize().data<float>()[(i - 2) * 40 + j], bd.data<float>()[i * 40 + j]);
  EXPECT_THROW(big.slice_cols(4, 24), Error);
  // quantize() is SVID; the per-row parameter path (make_quantized_tensor) gives g = 1.
  const QuantizedTensor viaq = quantize(w, f);
  EXPECT_EQ(viaq.col_scales.numel(), 9);
  const GroupParams p = f.codec->params_from_range(f, -1.0f, 3.0f, 1.0f);
  EXPECT_EQ(p.scale, 3.0f);
  std::vector<uint8_t> c9(9);
  for (int j = 0; j < 9; ++j) c9[size_t(j)] = f.codec->encode(f, w.data<float>()[j], p);
  const QuantizedTensor mq = make_quantized_tensor(f, 1, 9, c9.data(), &p, 1.0f);
  EXPECT_EQ(mq.dequantize().data<float>()[8], 3.0f);
  EXPECT_EQ(mq.dequantize().data<float>()[1], -3.0f);
}

// Malformed onebit tensors are refused naming the field (the checkpoint loader calls validate()
// and check_codes() and prefixes the file and layer).
TEST(OneBitFormat, BadTensorsAreRefusedNamingTheField) {
  const QuantizedTensor good = onebit_quantize(scaled_weight(3, 12, 5));
  auto expect_error = [](const QuantizedTensor& q, const char* what, bool codes) {
    const std::string m = test::expect_message([&] {
      q.validate();
      if (codes) q.check_codes();
    }, what);
    EXPECT_TRUE(m.empty() || m.find("onebit") != std::string::npos) << m;  // empty: already a failure
  };
  QuantizedTensor q = good;
  q.col_scales = Tensor();
  expect_error(q, "col_scales", false);
  q = good;
  q.col_scales = Tensor::empty({11}, DType::F16);
  expect_error(q, "col_scales", false);
  q = good;
  q.col_scales = Tensor::empty({12}, DType::F32);
  expect_error(q, "col_scales", false);
  q = good;
  q.scales = Tensor::empty({3, 2}, DType::F16);
  expect_error(q, "scales", false);
  q = good;
  q.zeros = Tensor::empty({3, 1}, DType::F16);
  expect_error(q, "zeros", false);
  q = good;
  q.col_mask = Tensor::zeros({2}, DType::U8);
  expect_error(q, "col_mask", false);
  q = good;
  q.codes = Tensor::zeros({3, 3}, DType::U8);
  expect_error(q, "codes", false);
  q = good;
  q.codes = good.codes.clone();
  q.codes.data<uint8_t>()[1 * 2 + 1] |= 0x80;  // row 1: a sign bit past column 12
  expect_error(q, "row 1 has sign bits set beyond its 12 columns", true);
  EXPECT_NO_THROW(good.check_codes());
}

// The straight-through weight function: at a base point W0 its surrogate is
//   Ŵ_ij = h_i g_j (s0_ij + (W_ij − W0_ij)),  s0 = sign(W0)
// (sign passed through as the identity), whose derivatives in W, h, g (and x through y = x Ŵᵀ) are
// what onebit_weight's backward must give. Central differences in f64 on the surrogate's loss.
TEST(OneBitWeight, GradientsMatchFiniteDifferencesOfTheSurrogate) {
  const int64_t out = 5, in = 13, nb = 3;
  const Tensor W0 = Tensor::randn({out, in}, 21, 0.1, DType::F64);
  Tensor W = W0.clone(), H = Tensor::uniform({out}, 22, 0.5, 1.5, DType::F64), G = Tensor::uniform({in}, 23, 0.5, 1.5, DType::F64);
  Tensor X = Tensor::randn({nb, in}, 24, 1.0, DType::F64);
  const Tensor P = Tensor::randn({nb, out}, 25, 1.0, DType::F64);
  auto surrogate = [&] {
    double loss = 0;
    for (int64_t o = 0; o < out; ++o)
      for (int64_t j = 0; j < in; ++j) {
        const double s0 = W0.item(o * in + j) >= 0 ? 1.0 : -1.0;
        const double wq = H.item(o) * G.item(j) * (s0 + W.item(o * in + j) - W0.item(o * in + j));
        for (int64_t b = 0; b < nb; ++b) loss += P.item(b * out + o) * X.item(b * in + j) * wq;
      }
    return loss;
  };
  Var wv(W.clone(), true), hv(H.clone(), true), gv(G.clone(), true), xv(X.clone(), true);
  const Var y = linear(xv, onebit_weight(wv, hv, gv));
  double fwd = 0;
  for (int64_t i = 0; i < nb * out; ++i) fwd += y.value().item(i) * P.item(i);
  ASSERT_NEAR(fwd, surrogate(), 1e-12) << "the surrogate equals the forward at the base point";
  backward(sum(mul(y, Var(P))));
  auto check = [&](Tensor& t, const Tensor& grad, const char* what) {
    ASSERT_TRUE(grad.defined()) << what;
    for (int64_t i = 0; i < t.numel(); ++i) {
      const double orig = t.item(i), h = 1e-6;
      t.set_item(i, orig + h);
      const double fp = surrogate();
      t.set_item(i, orig - h);
      const double fm = surrogate();
      t.set_item(i, orig);
      const double num = (fp - fm) / (2 * h);
      ASSERT_NEAR(grad.item(i), num, 1e-6 * std::max(1.0, std::fabs(num))) << what << " element " << i;
    }
  };
  check(W, wv.grad(), "dW");
  check(H, hv.grad(), "dh");
  check(G, gv.grad(), "dg");
  check(X, xv.grad(), "dx");
  // Bad operands are named.
  EXPECT_THROW(onebit_weight(wv, Var(Tensor::zeros({out + 1}, DType::F64)), gv), Error);
  EXPECT_THROW(onebit_weight(wv, hv, Var(Tensor::zeros({in}, DType::F32))), Error);
}

// The layer starts as the packed SVID tensor (h, g rounded to f16), trains, and after snap_values()
// its function is exactly the packed tensor encode() writes.
TEST(OneBitTrainLinear, StartsAtSvidAndExportsExactlyWhatItComputes) {
  const Tensor w = scaled_weight(7, 24, 11).to(DType::F32);
  OneBitTrainLinear t(w, Tensor());
  const Tensor start = t.effective_weight();
  const Tensor packed = onebit_quantize(w).dequantize();
  for (int64_t i = 0; i < w.numel(); ++i) ASSERT_EQ(start.data<float>()[i], packed.data<float>()[i]) << i;
  // A few plain gradient steps on a random objective move W, h and g.
  const Tensor x = Tensor::randn({4, 24}, 12, 1.0);
  const Tensor p = Tensor::randn({4, 7}, 13, 1.0);
  for (int step = 0; step < 3; ++step) {
    for (Var v : t.parameters()) v.zero_grad();
    backward(sum(mul(t.forward(Var(x)), Var(p))));
    for (Var v : t.parameters()) {
      Tensor& val = v.mutable_value();
      const Tensor& g = v.grad();
      for (int64_t i = 0; i < val.numel(); ++i) val.data<float>()[i] -= 0.05f * g.data<float>()[i];
    }
  }
  t.snap_values();
  const Tensor trained = t.effective_weight(), enc = t.encode().dequantize();
  bool moved = false;
  for (int64_t i = 0; i < w.numel(); ++i) {
    ASSERT_EQ(trained.data<float>()[i], enc.data<float>()[i]) << i;
    moved = moved || trained.data<float>()[i] != start.data<float>()[i];
  }
  EXPECT_TRUE(moved);
  EXPECT_THROW(OneBitTrainLinear(Tensor::zeros({4}), Tensor()), Error);
}

// The packed product: quant_matmul's Exact body (g ⊙ x, a 256-entry table per 8 columns) against
// the Reference body (row decode, f64 sums) on odd shapes — a partial last byte, a single column,
// single rows, prompt-sized M — through every CPU path (Int8 falls back to Exact: no integer
// kernel). Bound: f32 summation, 1e-5 of Σ|w||x| per output. No GPU form: the device layout is
// refused naming the format.
TEST(OneBitMatmul, TableBodyMatchesTheReferenceOnOddShapes) {
  struct S {
    int64_t out, in, M;
  };
  int cells = 0;
  for (const S& s : {S{1, 1, 1}, S{3, 7, 2}, S{5, 8, 1}, S{9, 33, 4}, S{16, 64, 9}, S{7, 172, 3}, S{64, 257, 40},
                     S{33, 1000, 2}}) {
    const Tensor w = scaled_weight(s.out, s.in, uint64_t(s.in * 31 + s.out)).to(DType::F32);
    const QuantizedTensor q = onebit_quantize(w);
    const ops::PackedWeight v = q.packed_view();
    EXPECT_EQ(v.layout, ops::PackedLayout::SignValue);
    EXPECT_FALSE(ops::quant_matmul_has_int8_kernel(v));
    EXPECT_FALSE(ops::quant_matmul_has_cuda_layout(v));
    const Tensor x = Tensor::randn({s.M, s.in}, uint64_t(s.M + 5), 1.0);
    Tensor yref = Tensor::empty({s.M, s.out});
    ops::quant_matmul(x, v, yref, {ops::QuantMatmulPath::Reference});
    const Tensor wd = q.dequantize();
    for (auto path : {ops::QuantMatmulPath::Auto, ops::QuantMatmulPath::Exact, ops::QuantMatmulPath::Int8}) {
      Tensor y = Tensor::empty({s.M, s.out});
      ops::quant_matmul(x, v, y, {path});
      ++cells;
      for (int64_t m = 0; m < s.M; ++m)
        for (int64_t o = 0; o < s.out; ++o) {
          double sc = 0;
          for (int64_t j = 0; j < s.in; ++j)
            sc += std::fabs(double(wd.data<float>()[o * s.in + j]) * x.data<float>()[m * s.in + j]);
          ASSERT_NEAR(y.data<float>()[m * s.out + o], yref.data<float>()[m * s.out + o], 1e-5 * sc + 1e-7)
              << "[" << s.out << "x" << s.in << "] M=" << s.M << " path " << int(path) << " output (" << m << ", " << o << ")";
        }
    }
  }
  EXPECT_EQ(cells, 24);
  const QuantizedTensor q = onebit_quantize(Tensor::randn({4, 64}, 3, 0.1));
  try {
    ops::device_layout_on_host(q.packed_view());
    FAIL() << "a onebit weight got a GPU layout";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("[onebit]"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("has no GPU form"), std::string::npos) << e.what();
  }
}

// Mutation fuzz of the container (the checkpoint loader's checks: validate() + check_codes()): 500
// random tensors whose fields have random shapes, dtypes and bytes are either refused with a
// lowbit::Error or decode and multiply without reading outside their storage (ASan in the lead's
// sanitizer run). Deterministic (fixed seed).
TEST(OneBitFormat, MutatedTensorsAreRefusedOrDecodeSafely) {
  const QuantizedTensor good = onebit_quantize(scaled_weight(5, 21, 8));
  uint64_t s = 0x9e3779b97f4a7c15ull;
  auto next = [&] {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    return s;
  };
  auto random_tensor = [&](const Tensor& like) {
    if (next() % 4 == 0) return Tensor();  // missing
    const int64_t d0 = like.dim() > 0 ? like.size(0) + int64_t(next() % 3) - 1 : 1;
    Shape sh = like.dim() == 2 ? Shape{std::max<int64_t>(d0, 0), like.size(1) + int64_t(next() % 3) - 1} : Shape{std::max<int64_t>(d0, 0)};
    for (auto& v : sh) v = std::max<int64_t>(v, 0);
    const DType dt = next() % 5 == 0 ? (like.dtype() == DType::U8 ? DType::F16 : DType::U8) : like.dtype();
    Tensor t = Tensor::zeros(sh, dt);
    auto* b = static_cast<uint8_t*>(t.raw_data());
    for (size_t i = 0; i < t.nbytes(); ++i) b[i] = uint8_t(next());
    return t;
  };
  int refused = 0, decoded = 0;
  for (int it = 0; it < 500; ++it) {
    QuantizedTensor q = good;
    switch (next() % 5) {
      case 0: q.codes = random_tensor(good.codes); break;
      case 1: q.scales = random_tensor(good.scales); break;
      case 2: q.col_scales = random_tensor(good.col_scales); break;
      case 3: q.zeros = next() % 2 ? random_tensor(good.scales) : Tensor(); break;
      default: {  // only bytes: sign bits (padding included) and values
        q.codes = good.codes.clone();
        q.col_scales = good.col_scales.clone();
        q.codes.data<uint8_t>()[next() % uint64_t(q.codes.numel())] ^= uint8_t(1u << (next() % 8));
        static_cast<uint16_t*>(q.col_scales.raw_data())[next() % 21] = uint16_t(next());
      }
    }
    try {
      q.validate();
      q.check_codes();
    } catch (const Error& e) {
      ++refused;
      EXPECT_NE(std::string(e.what()).find("onebit"), std::string::npos) << e.what();
      continue;
    }
    ++decoded;
    const Tensor d = q.dequantize();
    ASSERT_EQ(d.shape(), Shape({5, 21}));
    Tensor y = Tensor::empty({2, 5});
    ops::quant_matmul(Tensor::randn({2, 21}, 3, 1.0), q.packed_view(), y);
  }
  EXPECT_GT(refused, 100);
  EXPECT_GT(decoded, 50);
}

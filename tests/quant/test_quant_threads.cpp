// The row-parallel quantizer (quantize.cpp, quantized_tensor.cpp, lwc_clipped_params): the same
// bytes with 1 and several OpenMP threads, equal to a plain per-element loop over the format's
// codec, and errors that name the same (first) element as a sequential scan would.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "lowbit/quant/lwc.h"
#include "lowbit/quant/quantize.h"

using namespace lowbit;

namespace {

// Runs fn with `threads` OpenMP threads, restoring the previous setting.
template <class Fn>
auto with_threads(int threads, Fn&& fn) {
  struct Restore {
    int n;
    ~Restore() { omp_set_num_threads(n); }
  } restore{omp_get_max_threads()};
  omp_set_num_threads(threads);
  return fn();
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  if (a.defined() != b.defined()) return false;
  if (!a.defined()) return true;
  return a.dtype() == b.dtype() && a.shape() == b.shape() && std::memcmp(a.raw_data(), b.raw_data(), a.nbytes()) == 0;
}

void expect_same(const QuantizedTensor& a, const QuantizedTensor& b, const std::string& what) {
  EXPECT_EQ(a.format, b.format) << what;
  EXPECT_EQ(a.shape, b.shape) << what;
  EXPECT_TRUE(same_bytes(a.codes, b.codes)) << what << ": codes differ";
  EXPECT_TRUE(same_bytes(a.scales, b.scales)) << what << ": scales differ";
  EXPECT_TRUE(same_bytes(a.zeros, b.zeros)) << what << ": zeros differ";
  EXPECT_TRUE(same_bytes(a.tensor_scale, b.tensor_scale)) << what << ": tensor scales differ";
}

// N(0, 0.02) weights with outliers and an all-zero row (as tests/quant/test_quantize.cpp).
Tensor weight(int64_t out, int64_t in, uint64_t seed) {
  Tensor w = Tensor::randn({out, in}, seed, 0.02);
  float* p = w.data<float>();
  p[3] = 0.3f, p[in + 5] = -0.25f;
  for (int64_t c = 0; c < in; ++c) p[2 * in + c] = 0.0f;
  return w;
}

// The quantizer written as one sequential per-element loop over the codec's scalar functions.
struct Reference {
  std::vector<uint8_t> codes;  // packed, [out, row_bytes]
  std::vector<float> deq;      // [out, in]
};
Reference reference(const Tensor& w, const QuantFormat& f) {
  const int64_t out = w.size(0), in = w.size(1), groups = f.n_groups(in), rb = f.row_bytes(in);
  const float* pw = w.data<float>();
  const float t = f.codec->tensor_scale(f, pw, w.numel());
  Reference r;
  r.codes.assign(size_t(out * rb), 0);
  r.deq.assign(size_t(out * in), 0.0f);
  std::vector<uint8_t> row(static_cast<size_t>(in));
  for (int64_t i = 0; i < out; ++i) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t b = f.group_begin(g), e = f.group_end(g, in);
      const GroupParams p = fit_group_params(f, pw + i * in + b, e - b, t);
      for (int64_t c = b; c < e; ++c) {
        row[size_t(c)] = f.codec->encode(f, pw[i * in + c], p);
        r.deq[size_t(i * in + c)] = f.codec->decode(f, row[size_t(c)], p);
      }
    }
    f.pack(row.data(), in, r.codes.data() + i * rb);
  }
  return r;
}

// Shapes: odd `in` with a short last group and a partial last packed byte / 3-bit word (1001 =
// 15 * 64 + 41 = 125 * 8 + 1), an `in` not a multiple of 4, large enough to run threaded; and a
// small one that stays on one thread.
const std::vector<std::pair<int64_t, int64_t>> kShapes = {{301, 1001}, {67, 203}, {5, 77}};
const char* const kFormats[] = {"int2g64", "int3g128", "int3g32s", "int4g32s", "int2pc", "int8pc", "ternary", "mxfp4", "nvfp4"};

}  // namespace

TEST(QuantThreads, QuantizeAndDequantizeAreIdenticalForAnyThreadCount) {
  for (const char* name : kFormats) {
    const QuantFormat& f = parse_quant_format(name);
    for (auto [out, in] : kShapes) {
      const std::string what = std::string(name) + " [" + std::to_string(out) + ", " + std::to_string(in) + "]";
      const Tensor w = weight(out, in, 17);
      const QuantizedTensor q1 = with_threads(1, [&] { return quantize(w, f); });
      const Tensor d1 = with_threads(1, [&] { return q1.dequantize(); });
      const Tensor fq1 = with_threads(1, [&] { return fake_quantize(w, f); });
      for (int threads : {2, 3, 8}) {
        const std::string wt = what + " threads " + std::to_string(threads);
        const QuantizedTensor qn = with_threads(threads, [&] { return quantize(w, f); });
        expect_same(q1, qn, wt);
        EXPECT_TRUE(same_bytes(d1, with_threads(threads, [&] { return q1.dequantize(); }))) << wt << ": dequantize";
        EXPECT_TRUE(same_bytes(fq1, with_threads(threads, [&] { return fake_quantize(w, f); }))) << wt << ": fake_quantize";
      }
      // Both equal the plain per-element loop.
      const Reference ref = reference(w, f);
      ASSERT_EQ(q1.codes.nbytes(), ref.codes.size()) << what;
      EXPECT_EQ(std::memcmp(q1.codes.raw_data(), ref.codes.data(), ref.codes.size()), 0) << what << ": codes";
      EXPECT_EQ(std::memcmp(d1.raw_data(), ref.deq.data(), ref.deq.size() * sizeof(float)), 0) << what << ": values";
      EXPECT_TRUE(same_bytes(d1, fq1)) << what << ": fake_quantize != dequantize(quantize)";
      // unpack_row gives back the codes row by row.
      std::vector<uint8_t> row(static_cast<size_t>(in)), packed(static_cast<size_t>(f.row_bytes(in)));
      for (int64_t r = 0; r < out; r += std::max<int64_t>(1, out / 7)) {
        q1.unpack_row(r, row.data());
        f.pack(row.data(), in, packed.data());
        EXPECT_EQ(std::memcmp(packed.data(), ref.codes.data() + r * f.row_bytes(in), packed.size()), 0) << what << " row " << r;
      }
    }
  }
}

TEST(QuantThreads, LwcClippedParamsAndEncodingAreIdenticalForAnyThreadCount) {
  for (const char* name : {"int2g64", "int3g128", "int4g32s", "int2pc"}) {
    const QuantFormat& f = parse_quant_format(name);
    for (auto [out, in] : kShapes) {
      const std::string what = std::string(name) + " [" + std::to_string(out) + ", " + std::to_string(in) + "]";
      const Tensor w = weight(out, in, 23);
      const Shape gs{out, f.n_groups(in)};
      const Tensor gamma = Tensor::uniform(gs, 5, -1.0, 5.0);
      const Tensor beta = f.has_zero ? Tensor::uniform(gs, 6, -1.0, 5.0) : Tensor();
      auto run = [&] {
        auto p = lwc_clipped_params(w, gamma, beta, f);
        return std::make_pair(p, quantize_with_params(w, f, p, 1.0f));
      };
      const auto [p1, q1] = with_threads(1, run);
      for (int threads : {2, 5}) {
        const auto [pn, qn] = with_threads(threads, run);
        ASSERT_EQ(p1.size(), pn.size());
        for (size_t i = 0; i < p1.size(); ++i)
          ASSERT_TRUE(p1[i].scale == pn[i].scale && p1[i].zero == pn[i].zero) << what << " group " << i;
        expect_same(q1, qn, what + " threads " + std::to_string(threads));
      }
      // Against the per-element encode with the same parameters.
      const int64_t groups = f.n_groups(in);
      std::vector<uint8_t> codes(size_t(out * in));
      for (int64_t r = 0; r < out; ++r)
        for (int64_t g = 0; g < groups; ++g)
          for (int64_t c = f.group_begin(g); c < f.group_end(g, in); ++c)
            codes[size_t(r * in + c)] = f.codec->encode(f, w.data<float>()[r * in + c], p1[size_t(r * groups + g)]);
      expect_same(q1, make_quantized_tensor(f, out, in, codes.data(), p1.data(), 1.0f), what + " reference");
    }
  }
}

TEST(QuantThreads, NonFiniteErrorNamesTheFirstElement) {
  const QuantFormat& f = parse_quant_format("int2g64");
  Tensor w = weight(301, 1001, 3);
  float* p = w.data<float>();
  // Later rows (other threads' chunks) and a later column of the same row are bad too.
  p[290 * 1001 + 0] = std::numeric_limits<float>::infinity();
  p[150 * 1001 + 700] = -std::numeric_limits<float>::infinity();
  p[150 * 1001 + 411] = std::nanf("");
  p[299 * 1001 + 1000] = std::nanf("");
  for (int threads : {1, 2, 4, 8}) {
    for (int which = 0; which < 3; ++which) {
      try {
        with_threads(threads, [&] {
          if (which == 0) quantize(w, f);
          else if (which == 1) fake_quantize(w, f);
          else quantize_with_params(w, f, std::vector<GroupParams>(size_t(301 * 16)), 1.0f);
          return 0;
        });
        ADD_FAILURE() << "no error with " << threads << " threads";
      } catch (const Error& e) {
        const std::string msg = e.what();
        EXPECT_NE(msg.find("non-finite value (nan) at row 150, column 411"), std::string::npos)
            << threads << " threads: " << msg;
      }
    }
  }
  // The last element alone.
  Tensor v = weight(64, 2048, 4);
  v.data<float>()[64 * 2048 - 1] = std::numeric_limits<float>::infinity();
  try {
    with_threads(4, [&] { return quantize(v, f); });
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("(inf) at row 63, column 2047"), std::string::npos) << e.what();
  }
}

TEST(QuantThreads, ParameterErrorsNameTheFirstRowOrGroup) {
  // A group scale too large for f16 (thrown inside the row loop of fit_all_group_params) in two
  // rows: the message is the first row's, whatever the thread count.
  const QuantFormat& f = parse_quant_format("int4g32");
  Tensor w = weight(300, 1000, 8);
  w.data<float>()[120 * 1000 + 7] = 1e9f;
  w.data<float>()[270 * 1000 + 9] = 3e9f;
  std::string first;
  for (int threads : {1, 2, 3, 8}) {
    try {
      with_threads(threads, [&] { return quantize(w, f); });
      ADD_FAILURE() << "no error";
    } catch (const Error& e) {
      if (first.empty()) first = e.what();
      EXPECT_EQ(first, e.what()) << threads << " threads";
    }
  }
  EXPECT_NE(first.find("does not fit in f16"), std::string::npos) << first;
  // Parameters the storage cannot hold (make_quantized_tensor's check): the first group named.
  const int64_t out = 300, in = 1000, groups = f.n_groups(in);
  std::vector<GroupParams> params(size_t(out * groups), GroupParams{0.5f, 3.0f});
  params[size_t(200 * groups + 0)].scale = 0.1f;  // not an f16 value
  params[size_t(17 * groups + 31)].scale = 0.3f;
  params[size_t(290 * groups + 5)].scale = 0.7f;
  std::vector<uint8_t> codes(size_t(out * in), 1);
  for (int threads : {1, 4}) {
    try {
      with_threads(threads, [&] { return make_quantized_tensor(f, out, in, codes.data(), params.data(), 1.0f); });
      ADD_FAILURE() << "no error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("of row 17 group 31 are not representable"), std::string::npos)
          << threads << " threads: " << e.what();
    }
  }
}

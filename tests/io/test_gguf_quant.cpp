// GGUF tensors in ggml block types: bit-exact dequantization and quantization against gguf-py (a
// Python oracle writes the file; skipped without python3 + gguf + numpy), the packed
// QuantizedTensor path, write/read round trips and malformed files.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>

#include "io_test_util.h"
#include "lowbit/core/error.h"
#include "lowbit/io/gguf.h"
#include "lowbit/quant/quantize.h"
#include "common/test_util.h"

using namespace lowbit;
using namespace lowbit::test;

namespace {

const char* const kBlockTypes[] = {"q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k",
                                   "q4_k", "q5_k", "q6_k", "tq1_0", "tq2_0", "iq4_nl", "iq4_xs"};
const char* const kQuantizable[] = {"q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "tq1_0", "tq2_0"};  // by gguf-py
const char* const kKQuants[] = {"q2_k", "q3_k", "q4_k", "q5_k", "q6_k"};

// Runs the oracle script into `out`; false (with the reason) when python3/gguf/numpy are missing.
bool run_oracle(const std::string& out, std::string& why) {
  const std::string script = std::string(LOWBIT_SOURCE_DIR) + "/tests/io/oracle/gguf_quant_oracle.py";
  if (std::system("python3 -c 'import gguf, numpy' >/dev/null 2>&1") != 0) {
    why = "python3 with the gguf and numpy modules is not available (pip install gguf numpy)";
    return false;
  }
  const std::string cmd = "python3 '" + script + "' '" + out + "'";
  const int rc = std::system(cmd.c_str());
  if (rc != 0) {
    why = "oracle script failed: " + cmd;
    return false;
  }
  return true;
}

bool same_bits(const Tensor& a, const Tensor& b, std::string& where) {
  if (a.shape() != b.shape()) {
    where = "shape " + shape_str(a.shape()) + " vs " + shape_str(b.shape());
    return false;
  }
  const float *pa = a.data<float>(), *pb = b.data<float>();
  for (int64_t i = 0; i < a.numel(); ++i)
    if (std::memcmp(pa + i, pb + i, 4) != 0) {
      where = "element " + std::to_string(i) + ": " + std::to_string(pa[i]) + " vs " + std::to_string(pb[i]);
      return false;
    }
  return true;
}

// Byte offset of the ggml type field of tensor `name` in a GGUF v3 header.
size_t type_field_offset(const std::vector<uint8_t>& bytes, const std::string& name) {
  for (size_t i = 8; i + name.size() + 12 < bytes.size(); ++i) {
    uint64_t len;
    std::memcpy(&len, bytes.data() + i, 8);
    if (len == name.size() && std::memcmp(bytes.data() + i + 8, name.data(), name.size()) == 0) {
      const size_t at = i + 8 + name.size();
      uint32_t n_dims;
      std::memcpy(&n_dims, bytes.data() + at, 4);
      return at + 4 + 8 * size_t(n_dims);
    }
  }
  return 0;
}

}  // namespace

TEST(GgufQuant, DequantizeAndQuantizeMatchGgufPy) {
  const auto dir = temp_dir("gguf-oracle");
  const std::string path = (dir / "oracle.gguf").string();
  std::string why;
  if (!run_oracle(path, why)) GTEST_SKIP() << why;
  GgufFile f = GgufFile::open(path);
  for (const char* name : kBlockTypes) {
    SCOPED_TRACE(name);
    const std::string raw = std::string("raw.") + name, deq = std::string("deq.") + name;
    ASSERT_NE(f.find_tensor(raw), nullptr);
    const Tensor expected = f.load_f32(deq);
    std::string where;
    // The f32 loader (dequantize_row of the format table) ...
    EXPECT_TRUE(same_bits(f.load_f32(raw), expected, where)) << where;
    // ... and the packed QuantizedTensor path.
    QuantizedTensor q = f.load_quantized(raw);
    EXPECT_EQ(q.fmt().name, std::string(name));
    EXPECT_EQ(q.shape, expected.shape());
    EXPECT_TRUE(same_bits(q.dequantize(), expected, where)) << where;
    std::vector<float> row(size_t(q.in_features()));
    q.dequantize_row(q.out_features() - 1, row.data());
    EXPECT_EQ(std::memcmp(row.data(), expected.data<float>() + (q.out_features() - 1) * q.in_features(),
                          row.size() * 4),
              0);
  }
  for (const char* name : kQuantizable) {
    SCOPED_TRACE(name);
    const GgufTensorInfo* t = f.find_tensor(std::string("quant.") + name);
    ASSERT_NE(t, nullptr);
    QuantizedTensor q = quantize(f.load_f32(std::string("src.") + name), parse_quant_format(name));
    ASSERT_EQ(uint64_t(q.codes.nbytes()), t->nbytes);
    EXPECT_EQ(std::memcmp(q.codes.raw_data(), f.tensor_bytes(*t), size_t(t->nbytes)), 0)
        << "lowbit's reference quantizer differs from gguf.quants.quantize";
  }
}

TEST(GgufQuant, WriteReadRoundTripKeepsBlocks) {
  const auto dir = temp_dir("gguf-qrt");
  const std::string path = (dir / "q.gguf").string();
  Tensor w = Tensor::randn({7, 512}, 3, 0.05);
  std::vector<std::pair<std::string, QuantizedTensor>> qs;
  for (const char* name : kQuantizable) qs.emplace_back(std::string("w.") + name, quantize(w, parse_quant_format(name)));
  write_gguf(path, {{"general.architecture", GgufValue::string("test")}}, {{"dense", w}}, 32, qs);
  GgufFile f = GgufFile::open(path);
  for (const auto& [n, q] : qs) {
    SCOPED_TRACE(n);
    QuantizedTensor back = f.load_quantized(n);
    EXPECT_EQ(back.format, q.format);
    EXPECT_TRUE(bit_identical(back.codes, q.codes));
    EXPECT_TRUE(bit_identical(f.load_f32(n), q.dequantize()));
    // Quantization error is bounded (the reference rounding is sane).
    EXPECT_LT(max_abs_diff(q.dequantize(), w), q.fmt().bits >= 8 ? 2e-3 : (q.fmt().bits >= 4 ? 0.05 : 0.3));
  }
  EXPECT_TRUE(bit_identical(f.load_f32("dense"), w));
  EXPECT_THROW(f.load_quantized("dense"), Error);
}

// The k-quant and iq4 reference quantizers (no gguf-py oracle; byte-exact with ggml's own
// quantize_row_*_ref by scripts/ggml-quant-oracle/run.sh): error bounded relative to the weights'
// spread, all-zero blocks stay zero, and more bits give smaller errors.
TEST(GgufQuant, KQuantReferenceQuantizersAreAccurate) {
  Tensor w = Tensor::randn({5, 512}, 8, 0.05);
  for (int64_t c = 0; c < 256; ++c) w.data<float>()[c] = 0.0f;  // an all-zero super-block
  double prev = 1e9;
  const double bound[] = {0.05, 0.03, 0.015, 0.008, 0.004};  // q2_k .. q6_k, weights ~ N(0, 0.05)
  for (int k = 0; k < 5; ++k) {
    SCOPED_TRACE(kKQuants[k]);
    QuantizedTensor q = quantize(w, parse_quant_format(kKQuants[k]));
    const Tensor d = q.dequantize();
    for (int64_t c = 0; c < 256; ++c) ASSERT_EQ(d.data<float>()[c], 0.0f);
    double se = 0;
    for (int64_t i = 0; i < w.numel(); ++i) {
      const double e = double(d.data<float>()[i]) - double(w.data<float>()[i]);
      se += e * e;
    }
    const double rmse = std::sqrt(se / double(w.numel()));
    std::printf("%s: rmse %.5f (weights N(0, 0.05))\n", kKQuants[k], rmse);
    EXPECT_LT(rmse, bound[k]);
    EXPECT_LT(rmse, prev);
    prev = rmse;
  }
  for (const char* name : {"iq4_nl", "iq4_xs"}) {
    QuantizedTensor q = quantize(w, parse_quant_format(name));
    const Tensor d = q.dequantize();
    for (int64_t c = 0; c < 256; ++c) ASSERT_EQ(d.data<float>()[c], 0.0f) << name;
    EXPECT_LT(max_abs_diff(d, w), 0.05) << name;
  }
}

// The container's ggml type table (ids and sizes of every ggml type, for validating files) agrees
// with the format table's rows for the types lowbit decodes.
TEST(GgufQuant, TypeTableAgreesWithFormatTable) {
  int n = 0;
  for (const QuantFormat& f : all_quant_formats()) {
    if (!f.is_ggml_block()) continue;
    const GgmlTypeTraits* t = ggml_type_traits(uint32_t(f.ggml_type));
    ASSERT_NE(t, nullptr) << f.name;
    EXPECT_EQ(t->block_size, f.group_size) << f.name;
    EXPECT_EQ(t->type_size, f.block_bytes) << f.name;
    EXPECT_EQ(parse_quant_format(t->name).id, f.id) << f.name;  // "Q4_K" parses too
    ++n;
  }
  EXPECT_EQ(n, 14);
}

TEST(GgufQuant, RowsMustBeWholeBlocks) {
  const QuantFormat& f = parse_quant_format("q4_k");
  EXPECT_THROW(quantize(Tensor::randn({2, 100}, 1), parse_quant_format("q4_0")), Error);
  try {
    make_ggml_quantized_tensor(f, 2, 100, Tensor::zeros({2 * 144}, DType::U8), "w");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("multiple of the block size 256"), std::string::npos) << e.what();
  }
  EXPECT_THROW(make_ggml_quantized_tensor(f, 2, 256, Tensor::zeros({2 * 143}, DType::U8), "w"), Error);
}

TEST(GgufQuant, MalformedFilesAreRejected) {
  const auto dir = temp_dir("gguf-qbad");
  const std::string path = (dir / "q.gguf").string();
  QuantizedTensor q = quantize(Tensor::randn({4, 64}, 5, 0.1), parse_quant_format("q4_0"));
  write_gguf(path, {}, {}, 32, {{"blk.0.attn_q.weight", q}});
  const std::vector<uint8_t> good = read_bytes(path);
  const size_t type_at = type_field_offset(good, "blk.0.attn_q.weight");
  ASSERT_GT(type_at, 0u);

  auto expect_error = [&](const std::vector<uint8_t>& bytes, bool at_load, std::initializer_list<const char*> words) {
    const std::string bad = (dir / "bad.gguf").string();
    write_bytes(bad, bytes);
    try {
      GgufFile f = GgufFile::open(bad);
      if (at_load) f.load_f32("blk.0.attn_q.weight");
      FAIL() << "expected an error";
    } catch (const Error& e) {
      for (const char* w : words) EXPECT_NE(std::string(e.what()).find(w), std::string::npos) << e.what();
    }
  };
  // Truncated tensor data: the error names the tensor.
  expect_error(std::vector<uint8_t>(good.begin(), good.end() - 40), false, {"blk.0.attn_q.weight", "truncated"});
  // Unknown ggml type id.
  std::vector<uint8_t> b = good;
  const uint32_t unknown = 77;
  std::memcpy(b.data() + type_at, &unknown, 4);
  expect_error(b, false, {"blk.0.attn_q.weight", "unknown ggml type id 77"});
  // Another known type: the declared data no longer fits the file.
  b = good;
  const uint32_t q5_0 = 6;  // same 32-value blocks, 22 bytes: the data size no longer matches
  std::memcpy(b.data() + type_at, &q5_0, 4);
  expect_error(b, false, {"blk.0.attn_q.weight"});
  // A known type lowbit cannot decode (IQ2_XXS): 64-value rows are no whole 256-value blocks.
  b = good;
  const uint32_t iq2_xxs = 16;
  std::memcpy(b.data() + type_at, &iq2_xxs, 4);
  expect_error(b, false, {"blk.0.attn_q.weight", "IQ2_XXS", "block size"});
  // With whole 256-value rows the file opens, and loading names the tensor and the type.
  QuantizedTensor q256 = quantize(Tensor::randn({4, 256}, 5, 0.1), parse_quant_format("q4_0"));
  write_gguf(path, {}, {}, 32, {{"blk.0.attn_q.weight", q256}});
  b = read_bytes(path);
  std::memcpy(b.data() + type_field_offset(b, "blk.0.attn_q.weight"), &iq2_xxs, 4);
  expect_error(b, true, {"blk.0.attn_q.weight", "IQ2_XXS", "cannot load"});
}

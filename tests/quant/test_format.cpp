// The format traits table, element encodings, packing and the QuantizedTensor container.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <set>

#include "lowbit/quant/format.h"
#include "lowbit/quant/quantize.h"
#include "lowbit/quant/quantized_tensor.h"

using namespace lowbit;

TEST(QuantFormat, TableIsConsistent) {
  std::set<int> ids;
  std::set<std::string> names;
  for (const QuantFormat& f : all_quant_formats()) {
    EXPECT_TRUE(ids.insert(int(f.id)).second) << f.name;
    EXPECT_TRUE(names.insert(f.name).second) << f.name;
    EXPECT_EQ(&quant_format(f.id), &f);
    EXPECT_EQ(&parse_quant_format(f.name), &f);
    // (trit planes keep their second scale in the zeros tensor; ptq161 its mu and int4 zero)
    EXPECT_EQ(f.has_zero, f.kind == QuantKind::IntAsym || f.kind == QuantKind::TritPlanes ||
                              f.kind == QuantKind::SalientBinary)
        << f.name;
    EXPECT_EQ(f.group_size == 0, f.granularity != ScaleGranularity::PerGroup) << f.name;
    if (f.is_ggml_block()) {
      EXPECT_EQ(f.codec, nullptr);
      EXPECT_NE(f.dequantize_row, nullptr);
      EXPECT_GT(f.block_bytes, 0);
      EXPECT_EQ(f.row_bytes(512), 512 / f.group_size * f.block_bytes) << f.name;
      EXPECT_EQ(quant_format_for_ggml_type(uint32_t(f.ggml_type)), &f);
      continue;
    }
    EXPECT_NE(f.codec, nullptr);
    if (f.has_column_mask()) {  // nominal: 20 % salient columns (12 of 64) at 4 bits, 52 sign bits
      EXPECT_EQ(f.row_bytes(64), 7 + 6) << f.name;
      continue;
    }
    if (f.kind == QuantKind::SignValue) {  // onebit: one sign bit per column (test_onebit.cpp)
      EXPECT_EQ(f.row_bytes(64), 8) << f.name;
      continue;
    }
    EXPECT_EQ(f.row_bytes(64), packed_bytes(f.bits, 64));
    EXPECT_EQ(f.group_size % 8, 0) << f.name << ": dequantize_row unpacks groups from byte boundaries";
  }
  EXPECT_EQ(all_quant_formats().size(), 48u);
  EXPECT_EQ(int(parse_quant_format("onebit").id), 48);  // stable id (OneBit)
  EXPECT_EQ(int(parse_quant_format("int8g64").id), 46);  // stable id (Matryoshka parents, 45-47)
  EXPECT_EQ(int(parse_quant_format("tp2g128").id), 43);  // stable id (written to checkpoints)
  EXPECT_EQ(int(parse_quant_format("ptq161").id), 44);
  EXPECT_EQ(parse_quant_format("tp2g128").qmax(), 8);
  EXPECT_EQ(quant_format_for_ggml_type(0), nullptr);  // F32 is not a block format
  EXPECT_EQ(&parse_quant_format("INT4G128"), &quant_format(QuantFormatId::Int4G128));
  const QuantFormat& f = parse_quant_format("int4g128s");
  EXPECT_EQ(f.kind, QuantKind::IntSym);
  EXPECT_EQ(f.bits, 4);
  EXPECT_EQ(f.group_size, 128);
  EXPECT_EQ(parse_quant_format("int3g64").bits, 3);
  EXPECT_EQ(parse_quant_format("int8pc").granularity, ScaleGranularity::PerChannel);
  EXPECT_EQ(parse_quant_format("mxfp4").group_size, 32);
  EXPECT_EQ(parse_quant_format("nvfp4").group_size, 16);
}

TEST(QuantFormat, UnknownNameOrIdThrows) {
  EXPECT_THROW(parse_quant_format("int5g128"), Error);
  EXPECT_THROW(parse_quant_format(""), Error);
  EXPECT_THROW(quant_format(QuantFormatId(999)), Error);
  try {
    parse_quant_format("q4_kk");
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("int4g128"), std::string::npos) << "message lists the known names";
  }
}

TEST(QuantFormat, BitsPerWeightAsDocumented) {
  const int64_t n = 4096;
  auto bpw = [&](const char* name) { return parse_quant_format(name).bits_per_weight(n, n); };
  EXPECT_DOUBLE_EQ(bpw("int4g128"), 4.0 + 32.0 / 128);   // f16 scale + f16 zero per 128
  EXPECT_DOUBLE_EQ(bpw("int4g128s"), 4.0 + 16.0 / 128);  // f16 scale per 128
  EXPECT_DOUBLE_EQ(bpw("int3g128"), 3.0 + 32.0 / 128);
  EXPECT_DOUBLE_EQ(bpw("int3g64"), 3.0 + 32.0 / 64);
  EXPECT_DOUBLE_EQ(bpw("int2g64"), 2.0 + 32.0 / 64);
  EXPECT_DOUBLE_EQ(bpw("int4g32"), 4.0 + 32.0 / 32);
  EXPECT_DOUBLE_EQ(bpw("int8pc"), 8.0 + 16.0 / n);
  EXPECT_DOUBLE_EQ(bpw("int8g64"), 8.0 + 32.0 / 64);  // Matryoshka parent: f16 scale + f16 zero per 64
  EXPECT_DOUBLE_EQ(bpw("int4pc"), 4.0 + 32.0 / n);
  EXPECT_DOUBLE_EQ(bpw("mxfp4"), 4.0 + 8.0 / 32);  // E8M0 per 32
  EXPECT_DOUBLE_EQ(bpw("nvfp4"), 4.0 + 8.0 / 16 + 32.0 / double(n * n));  // E4M3 per 16 + fp32 tensor
  EXPECT_DOUBLE_EQ(bpw("ternary"), 2.0 + 32.0 / double(n * n));          // 2-bit codes + fp32 gamma
  EXPECT_DOUBLE_EQ(bpw("tp2g128"), 4.0 + 32.0 / 128);  // 4-bit pair codes + two f16 plane scales per 128
  // ggml blocks: block bytes * 8 / block size.
  EXPECT_DOUBLE_EQ(bpw("q4_0"), 4.5);
  EXPECT_DOUBLE_EQ(bpw("q4_1"), 5.0);
  EXPECT_DOUBLE_EQ(bpw("q5_0"), 5.5);
  EXPECT_DOUBLE_EQ(bpw("q5_1"), 6.0);
  EXPECT_DOUBLE_EQ(bpw("q8_0"), 8.5);
  EXPECT_DOUBLE_EQ(bpw("q2_k"), 2.625);
  EXPECT_DOUBLE_EQ(bpw("q3_k"), 3.4375);
  EXPECT_DOUBLE_EQ(bpw("q4_k"), 4.5);
  EXPECT_DOUBLE_EQ(bpw("q5_k"), 5.5);
  EXPECT_DOUBLE_EQ(bpw("q6_k"), 6.5625);
  EXPECT_DOUBLE_EQ(bpw("tq1_0"), 1.6875);
  EXPECT_DOUBLE_EQ(bpw("tq2_0"), 2.0625);
  EXPECT_DOUBLE_EQ(bpw("iq4_nl"), 4.5);
  EXPECT_DOUBLE_EQ(bpw("iq4_xs"), 4.25);
  EXPECT_EQ(&parse_quant_format("Q4_K"), &quant_format(QuantFormatId::Q4_K));
  EXPECT_THROW(parse_quant_format("q4_k").bits_per_weight(4, 100), Error);  // not whole blocks
  // Odd shapes count the padding and the short last group.
  const QuantFormat& f3 = parse_quant_format("int3g64");
  EXPECT_EQ(f3.row_bytes(100), 39);  // ceil(100/8) * 3
  EXPECT_EQ(f3.storage_bytes(3, 100), 3 * 39 + 3 * 2 * 4);
}

TEST(QuantFormat, PackUnpackRoundTrip) {
  std::mt19937 rng(7);
  for (int bits : {2, 3, 4, 8})
    for (int64_t n : {1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 100, 257}) {
      std::vector<uint8_t> codes(static_cast<size_t>(n)), back(static_cast<size_t>(n), 0xff);
      for (auto& c : codes) c = uint8_t(rng() & ((1u << bits) - 1));
      std::vector<uint8_t> packed(static_cast<size_t>(packed_bytes(bits, n)), 0xaa);
      pack_codes(bits, codes.data(), n, packed.data());
      unpack_codes(bits, packed.data(), n, back.data());
      EXPECT_EQ(codes, back) << bits << " bits, n = " << n;
      // Padding bits of the last byte are zero.
      if (bits == 3 && n % 8) {  // unused bits of the last 24-bit word
        size_t k = packed.size() - 3;
        uint32_t word = packed[k] | packed[k + 1] << 8 | packed[k + 2] << 16;
        EXPECT_EQ(word >> (3 * (n % 8)), 0u) << "n = " << n;
      } else if (bits != 3 && (n * bits) % 8) {
        EXPECT_EQ(packed.back() >> ((n * bits) % 8), 0) << bits << " bits, n = " << n;
      }
    }
  // The documented layouts.
  uint8_t c4[3] = {1, 2, 3}, p4[2];
  pack_codes(4, c4, 3, p4);
  EXPECT_EQ(p4[0], 0x21);
  EXPECT_EQ(p4[1], 0x03);
  uint8_t c2[5] = {1, 2, 3, 0, 2}, p2[2];
  pack_codes(2, c2, 5, p2);
  EXPECT_EQ(p2[0], 0x39);  // 1 | 2<<2 | 3<<4 | 0<<6
  EXPECT_EQ(p2[1], 0x02);
  uint8_t c3[8] = {1, 2, 3, 4, 5, 6, 7, 0}, p3[3];
  pack_codes(3, c3, 8, p3);
  uint32_t word = p3[0] | p3[1] << 8 | p3[2] << 16;
  for (int j = 0; j < 8; ++j) EXPECT_EQ((word >> (3 * j)) & 7, c3[j]);
  EXPECT_THROW(packed_bytes(5, 10), Error);
}

TEST(QuantFormat, E2M1Encoding) {
  const float mags[8] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6};
  for (uint8_t c = 0; c < 16; ++c) {
    EXPECT_EQ(e2m1_to_float(c), (c & 8 ? -1 : 1) * mags[c & 7]);
    if (c != 8) {
      EXPECT_EQ(float_to_e2m1(e2m1_to_float(c)), c);  // -0 encodes as +0
    }
  }
  EXPECT_EQ(e2m1_to_float(float_to_e2m1(100.0f)), 6.0f);    // saturates
  EXPECT_EQ(e2m1_to_float(float_to_e2m1(-7.0f)), -6.0f);
  EXPECT_EQ(e2m1_to_float(float_to_e2m1(0.74f)), 0.5f);
  EXPECT_EQ(e2m1_to_float(float_to_e2m1(0.75f)), 1.0f);    // tie -> even code
  EXPECT_EQ(e2m1_to_float(float_to_e2m1(2.5f)), 2.0f);     // tie -> even code
  EXPECT_EQ(e2m1_to_float(float_to_e2m1(5.0f)), 4.0f);     // tie -> even code
  EXPECT_EQ(e2m1_to_float(float_to_e2m1(5.01f)), 6.0f);
}

TEST(QuantFormat, E4M3AndE8M0Encoding) {
  EXPECT_EQ(e4m3_to_float(0x7e), 448.0f);
  EXPECT_EQ(e4m3_to_float(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_EQ(e4m3_to_float(0x38), 1.0f);
  EXPECT_TRUE(std::isnan(e4m3_to_float(0x7f)));
  for (int c = 0; c < 127; ++c) {
    EXPECT_EQ(float_to_e4m3(e4m3_to_float(uint8_t(c))), c) << c;
    EXPECT_EQ(float_to_e4m3(-e4m3_to_float(uint8_t(c))), c | 0x80) << c;
  }
  EXPECT_EQ(float_to_e4m3(1000.0f), 0x7e);               // saturates
  EXPECT_EQ(e4m3_to_float(float_to_e4m3(1.0625f)), 1.0f);  // tie between 1 and 1.125 -> even mantissa
  EXPECT_EQ(e4m3_to_float(float_to_e4m3(1.07f)), 1.125f);
  // The arithmetic encoder (core/format_traits.h) against the definition: the nearest of the 127
  // finite values, ties to the even code, at every midpoint and just either side of it.
  for (int c = 0; c < 126; ++c) {
    const float lo = e4m3_to_float(uint8_t(c)), hi = e4m3_to_float(uint8_t(c + 1)), mid = (lo + hi) / 2;
    EXPECT_EQ(float_to_e4m3(mid), (c % 2 == 0 ? c : c + 1)) << c;
    EXPECT_EQ(float_to_e4m3(std::nextafter(mid, 0.0f)), c) << c;
    EXPECT_EQ(float_to_e4m3(std::nextafter(mid, 1e9f)), c + 1) << c;
    EXPECT_EQ(float_to_e4m3(-std::nextafter(mid, 0.0f)), c | 0x80) << c;
  }
  EXPECT_EQ(float_to_e4m3(447.99f), 0x7e);
  EXPECT_EQ(float_to_e4m3(std::nanf("")), 0x7e);
  EXPECT_EQ(e8m0_to_float(0), std::ldexp(1.0f, -127));
  EXPECT_EQ(e8m0_to_float(127), 1.0f);
  EXPECT_EQ(e8m0_to_float(130), 8.0f);
  EXPECT_TRUE(std::isnan(e8m0_to_float(255)));
}

static QuantizedTensor small_quantized(const char* name, int64_t out = 4, int64_t in = 96) {
  return quantize(Tensor::randn({out, in}, 3, 0.05), parse_quant_format(name));
}

TEST(QuantizedTensor, ShapesFollowTheFormat) {
  QuantizedTensor q = small_quantized("int3g64", 5, 100);
  EXPECT_EQ(q.codes.shape(), Shape({5, 39}));
  EXPECT_EQ(q.scales.shape(), Shape({5, 2}));
  EXPECT_EQ(q.scales.dtype(), DType::F16);
  EXPECT_EQ(q.zeros.shape(), Shape({5, 2}));
  EXPECT_FALSE(q.tensor_scale.defined());
  EXPECT_EQ(q.nbytes(), parse_quant_format("int3g64").storage_bytes(5, 100));
  QuantizedTensor m = small_quantized("mxfp4");
  EXPECT_EQ(m.scales.dtype(), DType::U8);
  EXPECT_FALSE(m.zeros.defined());
  QuantizedTensor nv = small_quantized("nvfp4");
  EXPECT_EQ(nv.scales.shape(), Shape({4, 6}));
  EXPECT_TRUE(nv.tensor_scale.defined());
  QuantizedTensor t = small_quantized("ternary");
  EXPECT_FALSE(t.scales.defined());
  EXPECT_EQ(t.codes.shape(), Shape({4, 24}));
}

TEST(QuantizedTensor, TritPlaneCodecAndStorage) {
  const QuantFormat& f = parse_quant_format("tp2g128");
  // Code q = 3 (t2 + 1) + (t1 + 1): w = t1 a1 + t2 a2.
  const GroupParams p{1.5f, 0.25f};
  for (uint8_t q = 0; q < 9; ++q) {
    const int t1 = q % 3 - 1, t2 = q / 3 - 1;
    EXPECT_EQ(f.codec->decode(f, q, p), float(t1) * 1.5f + float(t2) * 0.25f) << int(q);
    EXPECT_EQ(f.codec->encode(f, f.codec->decode(f, q, p), p), q) << int(q);  // every pair round trips
  }
  EXPECT_EQ(f.codec->encode(f, 0.1f, p), 4);    // nearest is 0 (t1 = t2 = 0)
  EXPECT_EQ(f.codec->encode(f, 1.2f, p), 3 * 0 + 2);  // 1.25 = a1 - a2: t1 = 1, t2 = -1
  EXPECT_EQ(f.codec->encode(f, -9.0f, p), 0);   // clamps to -(a1 + a2)
  // From a range: the balanced-ternary grid a1 = 3 a2, a2 = amax / 4 (f16 values).
  const GroupParams r = f.codec->params_from_range(f, -2.0f, 1.0f, 1.0f);
  EXPECT_EQ(r.zero, 0.5f);
  EXPECT_EQ(r.scale, 1.5f);
  // Storage: two 2-bit planes per row (t1 + 1, then t2 + 1), a1 in scales, a2 in zeros (f16).
  QuantizedTensor q = small_quantized("tp2g128", 3, 200);
  EXPECT_EQ(q.codes.shape(), Shape({3, 100}));
  EXPECT_EQ(f.row_bytes(13), 8);  // 2 * ceil(13 / 4)
  std::vector<uint8_t> pair(200);
  q.unpack_row(1, pair.data());
  const uint8_t* row1 = q.codes.data<uint8_t>() + 100;
  for (int64_t i = 0; i < 200; ++i) {
    EXPECT_EQ(row1[i / 4] >> (2 * (i % 4)) & 3, pair[size_t(i)] % 3) << i;        // plane 1
    EXPECT_EQ(row1[50 + i / 4] >> (2 * (i % 4)) & 3, pair[size_t(i)] / 3) << i;   // plane 2
  }
  EXPECT_EQ(q.scales.shape(), Shape({3, 2}));
  EXPECT_EQ(q.zeros.shape(), Shape({3, 2}));
  EXPECT_FALSE(q.tensor_scale.defined());
  EXPECT_EQ(q.nbytes(), f.storage_bytes(3, 200));
  EXPECT_NO_THROW(q.check_codes());
  // A plane code the encoder never writes (3) is malformed input.
  q.codes.data<uint8_t>()[100 + 50 + 7] = uint8_t(0x30);  // row 1, plane 2, column 30
  try {
    q.check_codes();
    ADD_FAILURE() << "plane code 3 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("plane 2 holds code 3 (not a trit: t + 1 is 0, 1 or 2) at row 1, column 30"),
              std::string::npos) << e.what();
  }
}

TEST(QuantizedTensor, MalformedInputsThrow) {
  {
    QuantizedTensor q = small_quantized("int4g32");
    q.codes = Tensor::zeros({4, 47}, DType::U8);  // packed size mismatch (48 expected)
    EXPECT_THROW(q.dequantize(), Error);
  }
  {
    QuantizedTensor q = small_quantized("int4g32");
    q.zeros = Tensor();  // asymmetric format without zero points
    EXPECT_THROW(q.validate(), Error);
  }
  {
    QuantizedTensor q = small_quantized("int4g32s");
    q.zeros = Tensor::zeros({4, 3}, DType::F16);  // symmetric format with zero points
    EXPECT_THROW(q.validate(), Error);
  }
  {
    QuantizedTensor q = small_quantized("int4g32");
    q.scales = q.scales.to(DType::F32);  // wrong scale dtype
    EXPECT_THROW(q.validate(), Error);
  }
  {
    QuantizedTensor q = small_quantized("nvfp4");
    q.tensor_scale.fill_(std::nan(""));
    EXPECT_THROW(q.validate(), Error);
  }
  {
    QuantizedTensor q = small_quantized("int4g32");
    q.shape = {4};
    EXPECT_THROW(q.validate(), Error);
  }
  // Parameters that the storage cannot hold are rejected.
  const QuantFormat& f = parse_quant_format("int4g32");
  std::vector<uint8_t> codes(32, 0);
  GroupParams p{0.1f, 3.0f};  // 0.1 is not an f16 value
  EXPECT_THROW(make_quantized_tensor(f, 1, 32, codes.data(), &p, 1.0f), Error);
}

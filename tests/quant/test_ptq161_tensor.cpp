// The format table's ptq161 format (QuantKind::SalientBinary; quant/ptq161_tensor.h packs it): a
// hand-packed worked example (bytes, decoded values, storage), unpack_row, the data-free quantize(),
// the container of earlier versions converted bit for bit, and malformed tensors rejected with the
// field named (validate at load, padding bits in check_codes).
#include <gtest/gtest.h>

#include <string>

#include "common/expect_message.h"
#include "lowbit/core/error.h"
#include "lowbit/quant/ptq161_tensor.h"
#include "lowbit/quant/quantize.h"

using namespace lowbit;

namespace {

QuantizedTensor worked_example() {
  // 2 x 5, salient columns 1 and 4.
  return pack_ptq161(2, 5, {0, 1, 0, 0, 1}, {1, 0, -1, 1, 0, -1, 0, -1, -1, 0}, {0, 3, 0, 0, 15, 0, 0, 0, 0, 9},
                     {0.5, 0.25}, {0.125, -0.5}, {0.5f, 0.25f}, {8.0f, 4.0f}, {1.0, 7.0, 2.0, 0.5, 7.0});
}

void expect_rejected(const QuantizedTensor& t, const std::string& needle) {
  test::expect_message([&] {
    t.validate();
    t.check_codes();
  }, needle);
}

}  // namespace

TEST(Ptq161Format, IsARowOfTheFormatTable) {
  const QuantFormat& f = parse_quant_format("ptq161");
  EXPECT_EQ(f.id, QuantFormatId::PTQ161);
  EXPECT_EQ(int(f.id), 44);
  EXPECT_EQ(f.kind, QuantKind::SalientBinary);
  EXPECT_TRUE(f.has_column_mask());
  EXPECT_EQ(f.n_groups(4096), 2);
  // Nominal sizes at 20 % salient columns (819 of 4096): 3277 sign bits + 819 nibbles per row, four
  // f16 per row, the mask and 3277 f16 column factors.
  EXPECT_EQ(f.row_bytes(4096), (3277 + 7) / 8 + (819 + 1) / 2);
  // (each row's two parts padded to whole bytes: 1.6206 against 1.6189 unpadded)
  EXPECT_EQ(f.storage_bytes(4096, 4096), 4096 * (410 + 410) + 4096 * 8 + 512 + 2 * 3277);
  EXPECT_NEAR(f.bits_per_weight(4096, 4096), 1.6206, 1e-4);
  // The binary columns' codec: mu +- alpha.
  const GroupParams p = f.codec->params_from_range(f, -1.0f, 3.0f, 1.0f);
  EXPECT_EQ(p.scale, 2.0f);
  EXPECT_EQ(p.zero, 1.0f);
  EXPECT_EQ(f.codec->decode(f, f.codec->encode(f, 2.5f, p), p), 3.0f);
  EXPECT_EQ(f.codec->decode(f, f.codec->encode(f, 0.5f, p), p), -1.0f);
}

TEST(Ptq161Format, WorkedExamplePacksAndDecodes) {
  const QuantizedTensor t = worked_example();
  EXPECT_EQ(t.salient(), 2);
  EXPECT_EQ(t.row_bytes(), 2);  // 1 byte of 3 sign bits + 1 byte of 2 nibbles
  EXPECT_EQ(t.col_mask.data<uint8_t>()[0], 0b10010);
  const uint8_t* c = t.codes.data<uint8_t>();
  EXPECT_EQ(c[0], 0b101);  // row 0: +, -, + on columns 0, 2, 3
  EXPECT_EQ(c[1], 0xF3);   // codes 3 (column 1) and 15 (column 4)
  EXPECT_EQ(c[2], 0);
  EXPECT_EQ(c[3], 0x90);
  const Tensor w = t.dequantize();
  const float expect[] = {0.625f, -2.5f, -0.75f, 0.3125f, 3.5f, -0.75f, -1.0f, -1.5f, -0.375f, 1.25f};
  for (int i = 0; i < 10; ++i) EXPECT_EQ(w.data<float>()[i], expect[i]) << i;
  // (alpha, s) and (mu, z) per row.
  EXPECT_EQ(t.group_params(1, 0).scale, 0.25f);
  EXPECT_EQ(t.group_params(1, 0).zero, -0.5f);
  EXPECT_EQ(t.group_params(1, 1).scale, 0.25f);
  EXPECT_EQ(t.group_params(1, 1).zero, 4.0f);
  uint8_t codes[5];
  t.unpack_row(0, codes);
  EXPECT_EQ(std::vector<uint8_t>(codes, codes + 5), (std::vector<uint8_t>{1, 3, 0, 1, 15}));
  // mask 1 + codes 4 + scales 8 + zeros 8 + col_scales 6 bytes.
  EXPECT_EQ(t.nbytes(), 27);
  // The op's view decodes the same rows.
  const ops::PackedWeight v = t.packed_view();
  EXPECT_EQ(v.layout, ops::PackedLayout::SalientBinary);
  EXPECT_EQ(v.salient, 2);
  float row[5];
  v.dequantize_row(1, row);
  for (int j = 0; j < 5; ++j) EXPECT_EQ(row[j], expect[5 + j]);
}

TEST(Ptq161Format, DataFreeQuantizeKeepsTheHeaviestColumns) {
  Tensor w = Tensor::randn({6, 20}, 3, 0.05);
  for (int64_t i = 0; i < 6; ++i) w.data<float>()[i * 20 + 7] = 1.0f, w.data<float>()[i * 20 + 12] = -2.0f;
  const QuantizedTensor q = quantize(w, parse_quant_format("ptq161"));
  EXPECT_EQ(q.salient(), 4);  // 20 % of 20
  EXPECT_TRUE(q.col_mask.data<uint8_t>()[0] & 0x80);  // column 7
  EXPECT_TRUE(q.col_mask.data<uint8_t>()[1] & 0x10);  // column 12
  const Tensor d = q.dequantize();
  for (int64_t i = 0; i < 6; ++i) {
    EXPECT_NEAR(d.data<float>()[i * 20 + 7], 1.0f, 0.11f);
    EXPECT_NEAR(d.data<float>()[i * 20 + 12], -2.0f, 0.11f);
  }
  EXPECT_EQ(max_abs_diff(fake_quantize(w, parse_quant_format("ptq161")), d), 0.0);
  // The per-group RTN API has no column mask: it refuses.
  EXPECT_THROW(quantize_with_params(w, parse_quant_format("ptq161"), std::vector<GroupParams>(12), 1.0f), Error);
}

TEST(Ptq161Format, LegacyContainerConvertsBitForBit) {
  const QuantizedTensor t = worked_example();
  // The five tensors earlier versions wrote: mask, signs [out, 1], q4 [out, 1], rows (alpha, mu, s, z), cols.
  Tensor signs = Tensor::empty({2, 1}, DType::U8), q4 = Tensor::empty({2, 1}, DType::U8);
  Tensor rows = Tensor::empty({2, 4}, DType::F16);
  for (int i = 0; i < 2; ++i) {
    signs.data<uint8_t>()[i] = t.codes.data<uint8_t>()[2 * i];
    q4.data<uint8_t>()[i] = t.codes.data<uint8_t>()[2 * i + 1];
    auto* r = static_cast<uint16_t*>(rows.raw_data()) + 4 * i;
    const auto* s = static_cast<const uint16_t*>(t.scales.raw_data()) + 2 * i;
    const auto* z = static_cast<const uint16_t*>(t.zeros.raw_data()) + 2 * i;
    r[0] = s[0], r[1] = z[0], r[2] = s[1], r[3] = z[1];
  }
  const QuantizedTensor l = ptq161_from_legacy(2, 5, t.col_mask, signs, q4, rows, t.col_scales, "layer.x");
  EXPECT_EQ(max_abs_diff(l.dequantize(), t.dequantize()), 0.0);
  EXPECT_EQ(l.nbytes(), t.nbytes());
  const std::string m = test::expect_message(
      [&] { ptq161_from_legacy(2, 5, t.col_mask, signs, Tensor::zeros({2, 2}, DType::U8), rows, t.col_scales, "layer.x"); },
      "'q4'");
  EXPECT_TRUE(m.empty() || m.find("layer.x") != std::string::npos) << m;  // empty: already a failure
  EXPECT_THROW(ptq161_from_legacy(2, 5, t.col_mask, signs, q4, rows.to(DType::F32), t.col_scales, "x"), Error);
}

TEST(Ptq161Format, RejectsMalformedTensors) {
  {
    QuantizedTensor t = worked_example();
    t.col_mask = t.col_mask.clone();
    t.col_mask.data<uint8_t>()[0] |= 0x80;  // column 7 of a 5-column layer
    expect_rejected(t, "beyond column 5");
  }
  {
    QuantizedTensor t = worked_example();
    t.col_mask = t.col_mask.clone();
    t.col_mask.data<uint8_t>()[0] |= 0x01;  // a third salient column: col_scales no longer fits
    expect_rejected(t, "'col_scales'");
  }
  {
    QuantizedTensor t = worked_example();
    t.scales = t.scales.to(DType::F32);
    expect_rejected(t, "'scales'");
  }
  {
    QuantizedTensor t = worked_example();
    t.col_scales = Tensor();
    expect_rejected(t, "lacks its 'col_scales'");
  }
  {
    QuantizedTensor t = worked_example();
    t.codes = Tensor::zeros({2, 3}, DType::U8);
    expect_rejected(t, "'codes'");
  }
  {
    QuantizedTensor t = worked_example();
    t.codes = t.codes.clone();
    t.codes.data<uint8_t>()[2] |= 0x08;  // row 1: a 4th sign bit for 3 binary columns
    expect_rejected(t, "row 1 has sign bits set beyond");
  }
  {
    QuantizedTensor t = worked_example();
    t.codes = t.codes.clone();
    t.col_mask = t.col_mask.clone();
    t.col_mask.data<uint8_t>()[0] = 0b10000;  // one salient column: 4 binary, a half-used nibble byte
    t.col_scales = Tensor::zeros({4}, DType::F16);
    expect_rejected(t, "4-bit code after its 1 salient columns");
  }
  {
    QuantizedTensor t = quantize(Tensor::randn({3, 8}, 1, 0.1), parse_quant_format("int4g32"));
    t.col_mask = Tensor::zeros({1}, DType::U8);  // another format with a mask
    expect_rejected(t, "'col_mask' tensor");
  }
  EXPECT_THROW(pack_ptq161(1, 2, {1, 0}, {0, 1}, {16, 0}, {1}, {0}, {1}, {0}, {1, 1}), Error);  // 16 is not 4-bit
  EXPECT_THROW(pack_ptq161(1, 2, {1}, {0, 1}, {1, 0}, {1}, {0}, {1}, {0}, {1, 1}), Error);     // mask size
}

// PTQ1.61's packed layout (quant/ptq161_tensor.h): a hand-packed worked example (bytes, decoded
// values, storage bits), pack -> decode exactness, and malformed tensors rejected with the field named.
#include <gtest/gtest.h>

#include <string>

#include "lowbit/core/error.h"
#include "lowbit/quant/ptq161_tensor.h"

using namespace lowbit;

namespace {

Ptq161Tensor worked_example() {
  // 2 x 5, salient columns 1 and 4.
  return pack_ptq161(2, 5, {0, 1, 0, 0, 1}, {1, 0, -1, 1, 0, -1, 0, -1, -1, 0}, {0, 3, 0, 0, 15, 0, 0, 0, 0, 9},
                     {0.5, 0.25}, {0.125, -0.5}, {0.5f, 0.25f}, {8.0f, 4.0f}, {1.0, 7.0, 2.0, 0.5, 7.0});
}

void expect_rejected(const Ptq161Tensor& t, const std::string& needle) {
  try {
    t.validate("layer.x");
    ADD_FAILURE() << "accepted (expected an error naming '" << needle << "')";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("layer.x"), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(Ptq161Tensor, WorkedExamplePacksAndDecodes) {
  const Ptq161Tensor t = worked_example();
  EXPECT_EQ(t.salient(), 2);
  EXPECT_EQ(t.mask.data<uint8_t>()[0], 0b10010);
  EXPECT_EQ(t.signs.data<uint8_t>()[0], 0b101);  // row 0: +, -, + on columns 0, 2, 3
  EXPECT_EQ(t.signs.data<uint8_t>()[1], 0);
  EXPECT_EQ(t.q4.data<uint8_t>()[0], 0xF3);      // codes 3 (column 1) and 15 (column 4)
  EXPECT_EQ(t.q4.data<uint8_t>()[1], 0x90);
  const Tensor w = t.dequantize();
  const float expect[] = {0.625f, -2.5f, -0.75f, 0.3125f, 3.5f, -0.75f, -1.0f, -1.5f, -0.375f, 1.25f};
  for (int i = 0; i < 10; ++i) EXPECT_EQ(w.data<float>()[i], expect[i]) << i;
  // mask 1 + signs 2 + q4 2 + rows 16 + cols 6 bytes.
  EXPECT_EQ(t.storage_bytes(), 27);
  EXPECT_DOUBLE_EQ(t.bits_per_weight(), 27 * 8 / 10.0);
}

TEST(Ptq161Tensor, RejectsMalformedTensors) {
  {
    Ptq161Tensor t = worked_example();
    t.mask = t.mask.clone();
    t.mask.data<uint8_t>()[0] |= 0x80;  // column 7 of a 5-column layer
    expect_rejected(t, "beyond column 5");
  }
  {
    Ptq161Tensor t = worked_example();
    t.mask = t.mask.clone();
    t.mask.data<uint8_t>()[0] |= 0x01;  // a third salient column: the 4-bit codes no longer fit
    expect_rejected(t, "ptq161 tensor 'q4'");
  }
  {
    Ptq161Tensor t = worked_example();
    t.rows = t.rows.to(DType::F32);
    expect_rejected(t, "ptq161 tensor 'rows'");
  }
  {
    Ptq161Tensor t = worked_example();
    t.cols = Tensor();
    expect_rejected(t, "missing ptq161 tensor 'cols'");
  }
  {
    Ptq161Tensor t = worked_example();
    t.q4 = Tensor::zeros({2, 2}, DType::U8);
    expect_rejected(t, "ptq161 tensor 'q4'");
  }
  EXPECT_THROW(pack_ptq161(1, 2, {1, 0}, {0, 1}, {16, 0}, {1}, {0}, {1}, {0}, {1, 1}), Error);  // 16 is not 4-bit
  EXPECT_THROW(pack_ptq161(1, 2, {1}, {0, 1}, {1, 0}, {1}, {0}, {1}, {0}, {1, 1}), Error);     // mask size
}

// quantization_config JSON round trips and the mapping of GPTQ / AWQ configs.
#include <gtest/gtest.h>

#include "lowbit/core/error.h"
#include "lowbit/quant/qconfig.h"

using namespace lowbit;

TEST(QuantConfig, RoundTripsEveryFormat) {
  for (const QuantFormat& f : all_quant_formats()) {
    QuantConfig c;
    c.format = &f;
    c.method = "gptq";
    c.method_args = {{"damp_percent", 0.01}, {"desc_act", true}};
    c.modules_not_to_convert = {"lm_head"};
    nlohmann::json j = to_quantization_config(c);
    QuantConfig back = parse_quantization_config(nlohmann::json::parse(j.dump()));
    EXPECT_EQ(back.format, &f) << f.name;
    EXPECT_EQ(back.method, "gptq");
    EXPECT_EQ(back.method_args, c.method_args);
    EXPECT_EQ(back.modules_not_to_convert, c.modules_not_to_convert);
  }
  QuantConfig c;
  c.format = &parse_quant_format("int4g128");
  nlohmann::json j = to_quantization_config(c);
  EXPECT_EQ(j["bits_per_weight"], 4.25);
  EXPECT_EQ(j["group_size"], 128);
  c.format = &parse_quant_format("int8pc");
  EXPECT_EQ(to_quantization_config(c)["group_size"], -1);
}

TEST(QuantConfig, MapsGptqAndAwqConfigs) {
  auto gptq = nlohmann::json::parse(R"({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": false,
                                        "desc_act": true, "damp_percent": 0.01})");
  QuantConfig c = parse_quantization_config(gptq);
  EXPECT_EQ(c.format, &parse_quant_format("int4g128"));
  EXPECT_EQ(c.method, "gptq");
  EXPECT_EQ(c.method_args["desc_act"], true);
  auto gptq_sym = nlohmann::json::parse(R"({"quant_method": "gptq", "bits": 3, "group_size": -1, "sym": true})");
  EXPECT_EQ(parse_quantization_config(gptq_sym).format, &parse_quant_format("int3pcs"));
  auto awq = nlohmann::json::parse(R"({"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": true,
                                       "version": "gemm"})");
  EXPECT_EQ(parse_quantization_config(awq).format, &parse_quant_format("int4g64"));
}

TEST(QuantConfig, MalformedConfigsThrow) {
  using nlohmann::json;
  EXPECT_THROW(parse_quantization_config(json::array()), Error);
  EXPECT_THROW(parse_quantization_config(json{{"bits", 4}}), Error);                              // no quant_method
  EXPECT_THROW(parse_quantization_config(json{{"quant_method", "bitsandbytes"}}), Error);         // unsupported
  EXPECT_THROW(parse_quantization_config(json{{"quant_method", "lowbit"}, {"format", "int5"}}), Error);
  EXPECT_THROW(parse_quantization_config(json{{"quant_method", "lowbit"}, {"format", "int4g128"}, {"bits", 3}}),
               Error);  // inconsistent
  EXPECT_THROW(parse_quantization_config(json{{"quant_method", "lowbit"}, {"format", 4}}), Error);  // wrong type
  EXPECT_THROW(parse_quantization_config(json{{"quant_method", "gptq"}, {"bits", 4}, {"group_size", 256}}), Error);
}

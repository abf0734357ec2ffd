// The rule engine of mixed formats per tensor (quant/format_map.h): --format-map files (first match
// wins, default line, layer ranges, errors naming file and line) and llama.cpp's presets on the
// shapes that matter (SmolLM2's 576-wide rows that fall back, a 768-wide model that does not).
#include <gtest/gtest.h>

#include <functional>

#include "lowbit/core/error.h"
#include "lowbit/quant/format_map.h"

using namespace lowbit;

namespace {

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

// SmolLM2-135M: dim 576, 1536 FFN, 30 layers, 9 heads / 3 kv heads, tied embeddings.
LlamaConfig smollm2() {
  LlamaConfig c;
  c.dim = 576;
  c.hidden_dim = 1536;
  c.n_layers = 30;
  c.n_heads = 9;
  c.n_kv_heads = 3;
  c.vocab_size = 49152;
  c.tied_embeddings = true;
  return c;
}

// A 768-wide model (rows whole k-quant super-blocks), 12 layers, untied head.
LlamaConfig d768() {
  LlamaConfig c;
  c.dim = 768;
  c.hidden_dim = 2048;
  c.n_layers = 12;
  c.n_heads = 12;
  c.n_kv_heads = 12;
  c.vocab_size = 512;
  c.tied_embeddings = false;
  return c;
}

std::string fmt(const FormatPlan& p, const std::string& module) {
  auto it = p.formats.find(module);
  return it == p.formats.end() ? "(none)" : quant_format(it->second).name;
}
std::string layer(int i, const char* lin) { return "model.layers." + std::to_string(i) + "." + lin; }

}  // namespace

TEST(FormatMap, FirstMatchWinsWithLayersGlobsAndDefault) {
  const std::string text =
      "# mixed plan\n"
      "attn_v layers=0-1,3 q8_0   # first layers of v\n"
      "attn_* q5_0\n"
      "\n"
      "ffn_down layers=2 q6_k\n"
      "token_embd q8_0\n"
      "default q4_0\n";
  FormatMap m = parse_format_map(text, "plan.txt");
  ASSERT_EQ(m.rules.size(), 4u);
  EXPECT_TRUE(m.has_default);
  EXPECT_EQ(m.default_line, 7);
  LlamaConfig c = d768();
  c.n_layers = 4;
  FormatPlan p = plan_from_map(m, c, quant_format(QuantFormatId::Int4G128));
  EXPECT_EQ(fmt(p, layer(0, "self_attn.v_proj")), "q8_0");
  EXPECT_EQ(fmt(p, layer(2, "self_attn.v_proj")), "q5_0");  // not in layers=0-1,3: the glob wins
  EXPECT_EQ(fmt(p, layer(3, "self_attn.v_proj")), "q8_0");
  EXPECT_EQ(fmt(p, layer(1, "self_attn.q_proj")), "q5_0");
  EXPECT_EQ(fmt(p, layer(1, "self_attn.o_proj")), "q5_0");
  EXPECT_EQ(fmt(p, layer(2, "mlp.down_proj")), "q6_k");
  EXPECT_EQ(fmt(p, layer(1, "mlp.down_proj")), "q4_0");  // default
  EXPECT_EQ(fmt(p, layer(0, "mlp.gate_proj")), "q4_0");
  EXPECT_EQ(fmt(p, "model.embed_tokens"), "q8_0");
  EXPECT_EQ(fmt(p, "lm_head"), "(none)");  // no rule: stays f32
  EXPECT_EQ(p.vocab_formats().size(), 1u);
  EXPECT_EQ(p.origin, "format-map plan.txt");
  // Without a default line, the given --format is the default.
  FormatPlan q = plan_from_map(parse_format_map("attn_v q8_0\n", "m"), c, quant_format(QuantFormatId::Q4_1));
  EXPECT_EQ(fmt(q, layer(0, "mlp.up_proj")), "q4_1");
  EXPECT_EQ(fmt(q, layer(0, "self_attn.v_proj")), "q8_0");
  // '*' does not pack the vocabulary matrices (named only).
  FormatPlan g = plan_from_map(parse_format_map("* int4g128\n", "m"), c, quant_format(QuantFormatId::Q4_1));
  EXPECT_EQ(fmt(g, layer(0, "mlp.up_proj")), "int4g128");
  EXPECT_EQ(fmt(g, "model.embed_tokens"), "(none)");
}

TEST(FormatMap, BadFilesNameTheFileAndLine) {
  const LlamaConfig c = d768();
  struct Row {
    const char* text;
    const char* expect;
  } rows[] = {
      {"attn_v q9_9\n", "m.txt:1: unknown format 'q9_9'"},
      {"\n\nattn_vv q4_0\n", "m.txt:3: pattern 'attn_vv' matches no tensor kind"},
      {"attn_v\n", "m.txt:1: 'attn_v' has no format"},
      {"attn_v layers=0 q4_0 extra\n", "m.txt:1: expected 'PATTERN [layers=A-B,...] FORMAT'"},
      {"attn_v lay=0 q4_0\n", "m.txt:1: 'lay=0' is not a layer list"},
      {"attn_v layers=3-1 q4_0\n", "m.txt:1: layer range 3-1 is empty"},
      {"attn_v layers=a q4_0\n", "m.txt:1: 'a' is not a layer index"},
      {"token_embd layers=0 q8_0\n", "m.txt:1: token_embd is not per layer"},
      {"output int4g128\n", "m.txt:1: output is packed as a ggml block type"},
      {"default q4_0\ndefault q8_0\n", "m.txt:2: a second 'default' line (the first is line 1)"},
      {"default\n", "m.txt:1: expected 'default FORMAT'"},
  };
  for (const Row& r : rows) {
    const std::string e = error_of([&] { parse_format_map(r.text, "m.txt"); });
    EXPECT_NE(e.find(r.expect), std::string::npos) << r.text << " -> " << e;
  }
  // Errors that need the model: layers past its end, rows that are not whole blocks.
  EXPECT_NE(error_of([&] { plan_from_map(parse_format_map("attn_v layers=10-12 q8_0\n", "m.txt"), c,
                                         quant_format(QuantFormatId::Q4_0)); })
                .find("m.txt:1: layers 10-12 but the model has 12 layers (0-11)"),
            std::string::npos);
  const std::string e = error_of(
      [&] { plan_from_map(parse_format_map("default q4_k\n", "m.txt"), smollm2(), quant_format(QuantFormatId::Q4_0)); });
  EXPECT_NE(e.find("m.txt:1: blk.0.attn_q has rows of 576 values, not a multiple of q4_k's 256-value blocks"),
            std::string::npos)
      << e;
  EXPECT_NE(error_of([] { read_format_map("/nonexistent/plan.txt"); }).find("/nonexistent/plan.txt: cannot open"),
            std::string::npos);
}

// llama.cpp's choice on SmolLM2 (576-wide rows: the k-quants fall back; 1536-wide ffn_down rows
// fit), as llama-quantize 0.3.36 logs it.
TEST(FormatMap, PresetsOnSmolLM2FallBackAsLlamaCpp) {
  const LlamaConfig c = smollm2();
  FormatPlan p = plan_from_preset("q4_k_m", c);
  EXPECT_EQ(p.llama_ftype, 15);
  EXPECT_EQ(fmt(p, "model.embed_tokens"), "q8_0");           // tied: output rule, 576 % 32 == 0 -> q6_k -> q8_0
  EXPECT_EQ(fmt(p, layer(0, "self_attn.q_proj")), "q5_0");  // q4_k -> q5_0
  EXPECT_EQ(fmt(p, layer(0, "self_attn.v_proj")), "q8_0");  // use_more_bits(0): q6_k -> q8_0
  EXPECT_EQ(fmt(p, layer(4, "self_attn.v_proj")), "q5_0");  // (4 - 3) % 3 != 2
  EXPECT_EQ(fmt(p, layer(5, "self_attn.v_proj")), "q8_0");  // (5 - 3) % 3 == 2
  EXPECT_EQ(fmt(p, layer(27, "self_attn.v_proj")), "q8_0"); // last eighth (>= 26)
  EXPECT_EQ(fmt(p, layer(4, "mlp.down_proj")), "q4_k");     // 1536 columns: fits
  EXPECT_EQ(fmt(p, layer(5, "mlp.down_proj")), "q6_k");
  EXPECT_EQ(fmt(p, layer(4, "mlp.gate_proj")), "q5_0");
  EXPECT_FALSE(p.notes.empty());
  // Q3_K_S and Q2_K: every 576-wide tensor at q4_0, ffn_down (1536 wide) at q3_k in both, token_embd
  // q8_0: the same plan, as the issue measured (identical llama-quantize files).
  FormatPlan s = plan_from_preset("q3_k_s", c), k2 = plan_from_preset("Q2_K", c);
  EXPECT_EQ(s.formats, k2.formats);
  for (const char* lin : {"self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj"}) {
    EXPECT_EQ(fmt(s, layer(3, lin)), "q4_0") << lin;
    EXPECT_EQ(fmt(k2, layer(3, lin)), "q4_0") << lin;
  }
  EXPECT_EQ(fmt(s, layer(3, "mlp.down_proj")), "q3_k");
  EXPECT_EQ(fmt(k2, layer(3, "mlp.down_proj")), "q3_k");
  EXPECT_EQ(fmt(plan_from_preset("q8_0", c), "model.embed_tokens"), "q8_0");
  EXPECT_EQ(fmt(plan_from_preset("q6_k", c), layer(1, "mlp.down_proj")), "q6_k");
  EXPECT_EQ(fmt(plan_from_preset("q6_k", c), layer(1, "mlp.up_proj")), "q8_0");
  EXPECT_EQ(fmt(plan_from_preset("q5_k_m", c), layer(1, "mlp.up_proj")), "q5_1");
  EXPECT_NE(error_of([&] { plan_from_preset("q4_k_x", c); }).find("unknown preset 'q4_k_x' (known: q4_0,"),
            std::string::npos);
}

TEST(FormatMap, PresetsOnA768WideModel) {
  const LlamaConfig c = d768();  // 12 layers: n/8 = 1, 7n/8 = 10
  FormatPlan p = plan_from_preset("q4_k_m", c);
  EXPECT_TRUE(p.notes.empty());
  EXPECT_EQ(fmt(p, "model.embed_tokens"), "q4_k");  // untied: the base type
  EXPECT_EQ(fmt(p, "lm_head"), "q6_k");
  EXPECT_EQ(fmt(p, layer(0, "self_attn.v_proj")), "q6_k");
  EXPECT_EQ(fmt(p, layer(1, "self_attn.v_proj")), "q4_k");
  EXPECT_EQ(fmt(p, layer(3, "mlp.down_proj")), "q6_k");  // (3 - 1) % 3 == 2
  EXPECT_EQ(fmt(p, layer(10, "mlp.down_proj")), "q6_k");
  EXPECT_EQ(fmt(p, layer(5, "self_attn.q_proj")), "q4_k");
  FormatPlan m3 = plan_from_preset("q3_k_m", c);
  EXPECT_EQ(fmt(m3, layer(1, "self_attn.v_proj")), "q5_k");
  EXPECT_EQ(fmt(m3, layer(2, "self_attn.v_proj")), "q4_k");
  EXPECT_EQ(fmt(m3, layer(0, "mlp.down_proj")), "q4_k");  // 12/16 == 0: no q5_k layer
  EXPECT_EQ(fmt(m3, layer(0, "self_attn.o_proj")), "q4_k");
  EXPECT_EQ(fmt(m3, layer(0, "mlp.up_proj")), "q3_k");
  FormatPlan k2 = plan_from_preset("q2_k", c);
  EXPECT_EQ(fmt(k2, layer(0, "self_attn.v_proj")), "q3_k");  // n_gqa 1 < 4
  EXPECT_EQ(fmt(k2, layer(0, "self_attn.q_proj")), "q2_k");
  FormatPlan s4 = plan_from_preset("q4_k_s", c);
  EXPECT_EQ(fmt(s4, layer(3, "self_attn.v_proj")), "q5_k");
  EXPECT_EQ(fmt(s4, layer(4, "self_attn.v_proj")), "q4_k");
  EXPECT_EQ(fmt(s4, layer(0, "mlp.down_proj")), "q5_k");
  EXPECT_EQ(fmt(s4, layer(1, "mlp.down_proj")), "q4_k");
  LlamaConfig g = c;
  g.n_kv_heads = 3;  // n_gqa 4
  EXPECT_EQ(fmt(plan_from_preset("q2_k", g), layer(0, "self_attn.v_proj")), "q4_k");
}

// The iq4 presets and llama-quantize's imatrix-only rules (llama-quant.cpp: ffn_down of the first
// n/8 layers q5_k for iq4_nl / iq4_xs without an imatrix, q4_1 / q5_1 for q4_0 / q5_0 with one).
TEST(FormatMap, Iq4PresetsAndImatrixRules) {
  const LlamaConfig c = smollm2();  // 30 layers: n/8 = 3; n_gqa 3 (< 4: attn_v keeps the base type)
  FormatPlan nl = plan_from_preset("iq4_nl", c), nli = plan_from_preset("iq4_nl", c, /*imatrix=*/true);
  EXPECT_EQ(nl.llama_ftype, 25);
  EXPECT_EQ(fmt(nl, "model.embed_tokens"), "q8_0");  // tied: q6_k -> q8_0 (576 columns)
  EXPECT_EQ(fmt(nl, layer(2, "mlp.down_proj")), "q5_k");
  EXPECT_EQ(fmt(nl, layer(3, "mlp.down_proj")), "iq4_nl");
  EXPECT_EQ(fmt(nli, layer(2, "mlp.down_proj")), "iq4_nl");
  EXPECT_EQ(fmt(nl, layer(0, "self_attn.v_proj")), "iq4_nl");
  FormatPlan xs = plan_from_preset("IQ4_XS", c);
  EXPECT_EQ(xs.llama_ftype, 30);
  EXPECT_EQ(fmt(xs, layer(5, "self_attn.q_proj")), "iq4_nl");  // 576 columns: iq4_xs -> iq4_nl
  EXPECT_EQ(fmt(xs, layer(5, "mlp.down_proj")), "iq4_xs");     // 1536 columns fit
  LlamaConfig g = c;
  g.n_heads = 12, g.n_kv_heads = 3;  // n_gqa 4
  EXPECT_EQ(fmt(plan_from_preset("iq4_nl", g), layer(7, "self_attn.v_proj")), "q5_1");  // q5_k -> q5_1 (576 columns)
  FormatPlan q40 = plan_from_preset("q4_0", c), q40i = plan_from_preset("q4_0", c, true);
  EXPECT_EQ(fmt(q40, layer(2, "mlp.down_proj")), "q4_0");
  EXPECT_EQ(fmt(q40i, layer(2, "mlp.down_proj")), "q4_1");
  EXPECT_EQ(fmt(q40i, layer(3, "mlp.down_proj")), "q4_0");
  EXPECT_EQ(fmt(plan_from_preset("q5_0", c, true), layer(0, "mlp.down_proj")), "q5_1");
  // The k-quant presets do not depend on an imatrix.
  EXPECT_EQ(plan_from_preset("q4_k_m", c).formats, plan_from_preset("q4_k_m", c, true).formats);
}

// llama.cpp's tensor_type_fallback, and `--format F` (plan_from_format) following it on the linears
// whose rows F's blocks do not fit (SmolLM2: 576-wide rows; 1536-wide ffn_down fits 256).
TEST(FormatMap, SingleFormatFallsBackAsLlamaCpp) {
  using Id = QuantFormatId;
  const std::pair<Id, Id> rule[] = {{Id::Q2_K, Id::Q4_0},  {Id::Q3_K, Id::Q4_0},  {Id::Q4_K, Id::Q5_0},
                                    {Id::Q5_K, Id::Q5_1},  {Id::Q6_K, Id::Q8_0},  {Id::IQ4_XS, Id::IQ4_NL},
                                    {Id::TQ1_0, Id::Q4_0}, {Id::TQ2_0, Id::Q4_0}, {Id::Q4_0, Id::Q4_0}};
  for (const auto& [from, to] : rule) {
    EXPECT_EQ(llama_fallback_format(from, 576, "t"), to) << quant_format(from).name;
    EXPECT_EQ(llama_fallback_format(from, 1536, "t"), from) << quant_format(from).name;  // fits: unchanged
  }
  // Rows that fit no fallback (llama.cpp: f16): an error naming the tensor.
  std::string e = error_of([&] { llama_fallback_format(Id::Q4_K, 172, "--format q4_k: blk.0.ffn_down"); });
  EXPECT_NE(e.find("--format q4_k: blk.0.ffn_down has rows of 172 values, not a multiple of 32 (q4_k's fallback q5_0)"),
            std::string::npos) << e;
  e = error_of([&] { llama_fallback_format(Id::Q8_0, 172, "x"); });
  EXPECT_NE(e.find("x has rows of 172 values, not a multiple of 32 (q8_0's block)"), std::string::npos) << e;

  const LlamaConfig c = smollm2();
  for (const char* name : {"q4_k", "q3_k", "q2_k", "q5_k", "q6_k", "iq4_xs"}) {
    const QuantFormat& f = parse_quant_format(name);
    const std::optional<FormatPlan> p = plan_from_format(f, c);
    ASSERT_TRUE(p.has_value()) << name;
    EXPECT_EQ(p->base, f.id);
    EXPECT_EQ(p->origin, std::string("format ") + name);
    EXPECT_EQ(p->llama_ftype, -1);               // general.file_type: the base type's (export)
    EXPECT_EQ(p->vocab_formats().size(), 0u);    // token_embd stays f32, as without a plan
    EXPECT_EQ(p->formats.size(), 7u * 30u);
    EXPECT_EQ(p->notes.size(), 6u * 30u) << name;  // every linear but ffn_down
    for (int i : {0, 17}) {
      EXPECT_EQ(fmt(*p, layer(i, "mlp.down_proj")), name);
      for (const char* lin : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                              "mlp.gate_proj", "mlp.up_proj"})
        EXPECT_EQ(fmt(*p, layer(i, lin)), quant_format(llama_fallback_format(f.id, 576, "t")).name) << name << " " << lin;
    }
  }
  EXPECT_FALSE(plan_from_format(parse_quant_format("q4_k"), d768()).has_value());  // every row fits
  EXPECT_FALSE(plan_from_format(parse_quant_format("q4_0"), c).has_value());
  EXPECT_FALSE(plan_from_format(parse_quant_format("int4g128"), c).has_value());  // lowbit's own: short last group
  LlamaConfig s = c;
  s.hidden_dim = 172;  // ffn_down rows fit neither q4_k nor q5_0
  e = error_of([&] { plan_from_format(parse_quant_format("q4_k"), s); });
  EXPECT_NE(e.find("--format q4_k: blk.0.ffn_down has rows of 172 values"), std::string::npos) << e;
}

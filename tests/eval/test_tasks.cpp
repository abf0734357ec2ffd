// Zero-shot task scoring on stories260K with task rows built from the model's own greedy text:
// the greedy continuation must win against distractors, and malformed files must be refused.
#include <gtest/gtest.h>

#include <fstream>

#include <nlohmann/json.hpp>

#include "common/test_util.h"
#include "lowbit/eval/tasks.h"
#include "lowbit/io/llama2c.h"
#include "lowbit/runtime/generate.h"
#include "lowbit/tokenizer/llama2c_tokenizer.h"

using namespace lowbit;

namespace {
// A KIVI spec (bits, group, window); the CQ fields stay empty.
KVQuantSpec kivi_spec(int bits, int64_t group, int64_t window) {
  KVQuantSpec s;
  s.bits = bits;
  s.group = group;
  s.window = window;
  return s;
}
}  // namespace

TEST(Tasks, GreedyContinuationsWin) {
  LOWBIT_REQUIRE_SHARED(model_path, "models/stories260K/stories260K.bin");
  LOWBIT_REQUIRE_SHARED(tok_path, "models/stories260K/tok512.bin");
  Checkpoint ck = load_llama2c(model_path);
  LlamaModel model(ck.config, ck.weights);
  Llama2cTokenizer tok(tok_path, 512);
  const std::string context = "Once upon a time, there was a little girl named Lily.";
  GenerateOptions g;
  g.steps = 40;
  g.sampler.temperature = 0;
  std::string greedy;
  generate(model, tok, context, g, [&](const std::string& p) { greedy += p; });
  ASSERT_GT(greedy.size(), 5u);
  // The first word of the greedy text (it starts with a space) is LAMBADA's target.
  const std::string word = greedy.substr(1, greedy.find(' ', 1) - 1);
  auto dir = test::temp_dir("tasks");
  {
    std::ofstream mc(dir / "mc.jsonl");
    nlohmann::json row = {{"query", context}, {"choices", {"zebra xylophone quantum", greedy.substr(1)}}, {"gold", 1}};
    mc << row.dump() << "\n" << row.dump() << "\n";
    std::ofstream lb(dir / "lb.jsonl");
    lb << nlohmann::json{{"context", context}, {"continuation", word}}.dump() << "\n";
    std::ofstream wg(dir / "wg.jsonl");
    wg << nlohmann::json{{"context_options", {"Zebra quantum sofa xylophone.", context}}, {"continuation", greedy.substr(1)}, {"gold", 1}}.dump() << "\n";
  }
  TaskOptions o;
  o.progress = false;
  TaskResult mc = evaluate_task(model, tok, (dir / "mc.jsonl").string(), o);
  EXPECT_EQ(mc.kind, "multiple_choice");
  EXPECT_EQ(mc.rows, 2);
  EXPECT_EQ(mc.acc, 1.0);
  TaskResult lb = evaluate_task(model, tok, (dir / "lb.jsonl").string(), o);
  EXPECT_EQ(lb.kind, "lambada");
  EXPECT_EQ(lb.acc, 1.0) << "word '" << word << "'";
  TaskResult wg = evaluate_task(model, tok, (dir / "wg.jsonl").string(), o);
  EXPECT_EQ(wg.kind, "winogrande");
  EXPECT_EQ(wg.acc, 1.0);
  // Malformed files.
  std::ofstream(dir / "bad1.jsonl") << "{not json\n";
  std::ofstream(dir / "bad2.jsonl") << R"({"query": "q", "choices": ["a", "b"], "gold": 5})" << "\n";
  std::ofstream(dir / "bad3.jsonl") << R"({"foo": 1})" << "\n";
  for (const char* f : {"bad1.jsonl", "bad2.jsonl", "bad3.jsonl", "missing.jsonl"})
    EXPECT_THROW(evaluate_task(model, tok, (dir / f).string(), o), Error) << f;
}

// KVQuantSpec::quantized_len on worked values, and the share of quantized keys/values the scored
// positions read (TaskResult::kv_quantized_fraction): KIVI's 128-token window leaves a short prompt
// unquantized (0), window 0 with groups of one token quantizes everything (1), and
// --kv-window 0 with KIVI's group 32 quantizes the complete groups of 32 only.
TEST(Tasks, KvQuantizedFraction) {
  KVQuantSpec kivi = kivi_spec(4, 32, 0);
  EXPECT_EQ(kivi.quantized_len(0), 0);
  EXPECT_EQ(kivi.quantized_len(30), 0);
  EXPECT_EQ(kivi.quantized_len(31), 32);
  EXPECT_EQ(kivi.quantized_len(62), 32);
  EXPECT_EQ(kivi.quantized_len(63), 64);
  kivi.window = 128;
  EXPECT_EQ(kivi.quantized_len(158), 0);
  EXPECT_EQ(kivi.quantized_len(159), 32);
  EXPECT_EQ((kivi_spec(0, 32, 0).quantized_len(100)), 0);  // off

  LOWBIT_REQUIRE_SHARED(model_path, "models/stories260K/stories260K.bin");
  LOWBIT_REQUIRE_SHARED(tok_path, "models/stories260K/tok512.bin");
  Checkpoint ck = load_llama2c(model_path);
  LlamaModel model(ck.config, ck.weights);
  Llama2cTokenizer tok(tok_path, 512);
  auto dir = test::temp_dir("tasks-kv");
  // 32 tokens of context (BOS included), then the continuation: the scored queries sit at positions 31..
  const std::string context = "Once upon a time, there was a little girl named Lily. She liked to play outside in the park.";
  const std::string cont = "She saw a big dog.";
  std::ofstream(dir / "lb.jsonl") << nlohmann::json{{"context", context}, {"continuation", cont}}.dump() << "\n";
  TaskOptions o;
  o.progress = false;
  EXPECT_EQ(evaluate_task(model, tok, (dir / "lb.jsonl").string(), o).kv_quantized_fraction, -1);  // no KIVI
  const std::vector<int> ids = tok.encode(context + " " + cont, true);
  const int64_t n = int64_t(ids.size()), first = int64_t(tok.encode(context, true).size());
  ASSERT_GT(n, first + 2);
  ASSERT_LT(n, 64);
  ASSERT_GE(first, 32);
  ModelTransforms t;
  t.kv = kivi_spec(4, 32, 128);
  model.set_transforms(t);
  EXPECT_EQ(evaluate_task(model, tok, (dir / "lb.jsonl").string(), o).kv_quantized_fraction, 0.0);
  t.kv = kivi_spec(4, 1, 0);
  model.set_transforms(t);
  EXPECT_DOUBLE_EQ(evaluate_task(model, tok, (dir / "lb.jsonl").string(), o).kv_quantized_fraction, 1.0);
  // Window 0, groups of 32: every scored query (positions first-1 .. n-2, all in 31..62) reads the
  // first 32 tokens quantized and the rest in full precision.
  t.kv = kivi_spec(4, 32, 0);
  model.set_transforms(t);
  double want = 0;
  for (int64_t p = first - 1; p < n - 1; ++p) want += 32.0 / double(p + 1);
  want /= double(n - first);
  EXPECT_NEAR(evaluate_task(model, tok, (dir / "lb.jsonl").string(), o).kv_quantized_fraction, want, 1e-12);
}

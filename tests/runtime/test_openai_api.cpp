// The OpenAI request parser (runtime/openai_api.h): valid bodies give the fields, every malformed
// body is an ApiError with status 400 naming the field (table-driven), and a stream of mutated
// bodies never throws anything else (a cheap in-process fuzz; fuzz/fuzz_openai_request.cpp is the
// libFuzzer target).
#include <gtest/gtest.h>

#include <random>

#include "lowbit/runtime/openai_api.h"

using namespace lowbit;

TEST(OpenAiApi, ParsesCompletionAndChatBodies) {
  ApiRequest r = parse_api_request(
      R"({"model":"m","prompt":"Once","max_tokens":5,"temperature":0,"top_p":0.5,"seed":-3,"stop":["x","y"],"stream":true,
          "stream_options":{"include_usage":true},"n":1,"logprobs":null,"unknown":{"a":[1]}})",
      false);
  EXPECT_EQ(r.prompt, "Once");
  EXPECT_EQ(r.max_tokens, 5);
  EXPECT_EQ(r.temperature, 0);
  EXPECT_EQ(r.top_p, 0.5);
  EXPECT_EQ(*r.seed, uint64_t(-3));
  EXPECT_EQ(r.stop, (std::vector<std::string>{"x", "y"}));
  EXPECT_TRUE(r.stream && r.include_usage);
  r = parse_api_request(R"({"prompt":[1,2,3]})", false);
  EXPECT_EQ(r.prompt_ids, (std::vector<int>{1, 2, 3}));
  EXPECT_EQ(r.max_tokens, 0);
  EXPECT_FALSE(r.seed.has_value());
  r = parse_api_request(R"({"prompt":["one"],"stop":"\n"})", false);
  EXPECT_EQ(r.prompt, "one");
  EXPECT_EQ(r.stop, (std::vector<std::string>{"\n"}));
  r = parse_api_request(R"({"messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"a"},
      {"type":"text","text":"b"}]},{"role":"assistant","content":null}],"max_completion_tokens":7})",
                        true);
  ASSERT_EQ(r.messages.size(), 3u);
  EXPECT_EQ(r.messages[1]["content"], "ab");
  EXPECT_EQ(r.messages[2]["content"], "");
  EXPECT_EQ(r.max_tokens, 7);
}

TEST(OpenAiApi, MalformedBodiesAre400NamingTheField) {
  struct Row {
    bool chat;
    std::string body, param, says;
  };
  const std::string deep = std::string(100, '[') + std::string(100, ']');
  const std::vector<Row> rows = {
      {false, "", "", "not valid JSON"},
      {false, "{", "", "not valid JSON"},
      {false, "{\"prompt\": \"a\"", "", "not valid JSON"},
      {false, "[1,2]", "", "JSON object"},
      {false, "\"text\"", "", "JSON object"},
      {false, "null", "", "JSON object"},
      {false, "{\"prompt\": \"\xff\xfe\"}", "", "not valid JSON"},
      {false, "{\"prompt\": " + deep + "}", "", "deeper"},
      {false, "{}", "prompt", "required"},
      {false, "{\"prompt\": 5}", "prompt", "'prompt' must be"},
      {false, "{\"prompt\": {}}", "prompt", "'prompt' must be"},
      {false, "{\"prompt\": [\"a\", \"b\"]}", "prompt", "one prompt"},
      {false, "{\"prompt\": [1, -2]}", "prompt", "token ids"},
      {false, "{\"prompt\": [1, \"x\"]}", "prompt", "token ids"},
      {false, "{\"prompt\": []}", "prompt", "'prompt' must be"},
      {false, "{\"prompt\": \"a\", \"max_tokens\": \"5\"}", "max_tokens", "integer"},
      {false, "{\"prompt\": \"a\", \"max_tokens\": 0}", "max_tokens", "from 1"},
      {false, "{\"prompt\": \"a\", \"max_tokens\": -1}", "max_tokens", "from 1"},
      {false, "{\"prompt\": \"a\", \"max_tokens\": 1.5}", "max_tokens", "integer"},
      {false, "{\"prompt\": \"a\", \"max_tokens\": 99999999999999999999}", "max_tokens", ""},
      {false, "{\"prompt\": \"a\", \"temperature\": \"hot\"}", "temperature", "number"},
      {false, "{\"prompt\": \"a\", \"temperature\": -0.1}", "temperature", "must be in"},
      {false, "{\"prompt\": \"a\", \"temperature\": 2.5}", "temperature", "must be in"},
      {false, "{\"prompt\": \"a\", \"temperature\": 1e999}", "", ""},
      {false, "{\"prompt\": \"a\", \"top_p\": 0}", "top_p", "must be in"},
      {false, "{\"prompt\": \"a\", \"top_p\": 1.01}", "top_p", "must be in"},
      {false, "{\"prompt\": \"a\", \"seed\": 1.5}", "seed", "integer"},
      {false, "{\"prompt\": \"a\", \"seed\": \"1\"}", "seed", "integer"},
      {false, "{\"prompt\": \"a\", \"stop\": 3}", "stop", "string"},
      {false, "{\"prompt\": \"a\", \"stop\": [\"a\", 3]}", "stop", "string"},
      {false, "{\"prompt\": \"a\", \"stop\": [\"\"]}", "stop", "empty"},
      {false, "{\"prompt\": \"a\", \"stop\": [\"a\",\"b\",\"c\",\"d\",\"e\"]}", "stop", "at most 4"},
      {false, "{\"prompt\": \"a\", \"stream\": \"yes\"}", "stream", "boolean"},
      {false, "{\"prompt\": \"a\", \"stream_options\": 1}", "stream_options", "object"},
      {false, "{\"prompt\": \"a\", \"stream_options\": {\"include_usage\": 1}}", "stream_options.include_usage", "boolean"},
      {false, "{\"prompt\": \"a\", \"n\": 2}", "n", "n = 1"},
      {false, "{\"prompt\": \"a\", \"ignore_eos\": 1}", "ignore_eos", "boolean"},
      {false, "{\"prompt\": \"a\", \"model\": 7}", "model", "string"},
      {true, "{}", "messages", "required"},
      {true, "{\"messages\": []}", "messages", "non-empty"},
      {true, "{\"messages\": \"hi\"}", "messages", "non-empty array"},
      {true, "{\"messages\": [1]}", "messages[0]", "object"},
      {true, "{\"messages\": [{\"content\": \"x\"}]}", "messages[0].role", "string"},
      {true, "{\"messages\": [{\"role\": \"king\", \"content\": \"x\"}]}", "messages[0].role", "must be system"},
      {true, "{\"messages\": [{\"role\": \"user\"}]}", "messages[0].content", "required"},
      {true, "{\"messages\": [{\"role\": \"user\", \"content\": 5}]}", "messages[0].content", "string or an array"},
      {true, "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image_url\"}]}]}", "messages[0].content",
       "text"},
      {true, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"max_tokens\": 0}", "max_tokens", "from 1"},
      {true, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"max_completion_tokens\": \"a\"}",
       "max_completion_tokens", "integer"},
  };
  for (const Row& row : rows) {
    try {
      parse_api_request(row.body, row.chat);
      ADD_FAILURE() << "accepted: " << row.body;
    } catch (const ApiError& e) {
      EXPECT_EQ(e.status, 400) << row.body;
      if (!row.param.empty()) {
        EXPECT_EQ(e.param, row.param) << row.body << ": " << e.what();
      }
      EXPECT_NE(std::string(e.what()).find(row.says), std::string::npos) << row.body << ": " << e.what();
      const auto body = api_error_body(e);
      EXPECT_EQ(body["error"]["type"], "invalid_request_error");
      EXPECT_TRUE(body["error"]["message"].is_string());
    }
  }
}

TEST(OpenAiApi, MutatedBodiesOnlyEverGiveApiErrors) {
  const std::vector<std::string> seeds = {
      R"({"model":"m","prompt":"Once upon","max_tokens":5,"temperature":0.7,"top_p":0.9,"seed":3,"stop":["x"],"stream":true})",
      R"({"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"stream_options":{"include_usage":true}})",
      R"({"prompt":[1,2,3],"n":1,"stop":"\n"})"};
  std::mt19937 rng(7);
  const std::string alphabet = "{}[]\",:0123456789.-eE truefalsn\\u\xff\x00";
  int accepted = 0;
  for (int it = 0; it < 20000; ++it) {
    std::string s = seeds[size_t(it) % seeds.size()];
    const int edits = 1 + int(rng() % 4);
    for (int e = 0; e < edits && !s.empty(); ++e) {
      const size_t pos = rng() % s.size();
      switch (rng() % 3) {
        case 0: s[pos] = alphabet[rng() % alphabet.size()]; break;
        case 1: s.erase(pos, 1 + rng() % 3); break;
        default: s.insert(pos, 1, alphabet[rng() % alphabet.size()]);
      }
    }
    for (bool chat : {false, true}) {
      try {
        parse_api_request(s, chat);
        ++accepted;
      } catch (const ApiError& e) {
        EXPECT_EQ(e.status, 400);
      } catch (const std::exception& e) {
        ADD_FAILURE() << "unexpected exception " << e.what() << " for " << s;
      }
    }
  }
  EXPECT_GT(accepted, 0);
}

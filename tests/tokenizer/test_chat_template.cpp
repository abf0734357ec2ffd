// Chat templates: lowbit's Jinja2-subset interpreter against Python jinja2 (as transformers runs
// it) on the real templates of SmolLM2/ChatML, Llama 2, Llama 3, Mistral, Qwen2, Qwen3, Gemma and
// Phi-3 plus two feature fixtures (features.jinja; features_macros.jinja: macros, break/continue,
// printf-style % and |format), every case of chat_templates/cases.json, add_generation_prompt
// false and true. The Python side (render_chat_templates.py) needs jinja2; without python3 or
// jinja2 the comparison skips. Unsupported constructs must be errors.
#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <nlohmann/json.hpp>
#include <sstream>

#include "lowbit/core/error.h"
#include "lowbit/tokenizer/chat_template.h"

namespace lowbit {
namespace {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

const fs::path kDir = fs::path(LOWBIT_SOURCE_DIR) / "tests/tokenizer/chat_templates";

std::string read_all(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::ostringstream os;
  os << f.rdbuf();
  return os.str();
}

// stdout of a command and its exit status.
std::pair<std::string, int> run(const std::string& cmd) {
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return {"", -1};
  std::array<char, 65536> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  const int st = pclose(p);
  return {out, WIFEXITED(st) ? WEXITSTATUS(st) : -1};
}

TEST(ChatTemplate, MatchesPythonJinja2) {
  const std::string script = (fs::path(LOWBIT_SOURCE_DIR) / "tests/tokenizer/render_chat_templates.py").string();
  auto [out, rc] = run("python3 '" + script + "' 2>/dev/null");
  if (rc == 3 || rc == 127 || rc == -1) GTEST_SKIP() << "python3 with jinja2 is not available (pip install jinja2)";
  ASSERT_EQ(rc, 0) << "render_chat_templates.py failed";
  const ojson rows = ojson::parse(out);
  const ojson cases = ojson::parse(read_all(kDir / "cases.json"));
  ASSERT_GE(rows.size(), 9u * cases.size() * 2);
  int compared = 0, errors = 0;
  for (const auto& row : rows) {
    const std::string tname = row.at("template").get<std::string>();
    const std::string cname = row.at("case").get<std::string>();
    const ojson* c = nullptr;
    for (const auto& x : cases)
      if (x.at("name") == cname) c = &x;
    ASSERT_NE(c, nullptr);
    ChatTemplateInputs in;
    in.messages = c->at("messages");
    in.add_generation_prompt = row.at("add_generation_prompt").get<bool>();
    in.bos_token = "<s>";
    in.eos_token = "</s>";
    in.extra["tools"] = c->contains("tools") ? c->at("tools") : ojson(nullptr);
    in.extra["documents"] = nullptr;
    const std::string what = tname + " / " + cname + " / agp=" + (in.add_generation_prompt ? "true" : "false");
    if (row.contains("error")) {
      try {
        render_chat_template(read_all(kDir / tname), in, tname);
        ADD_FAILURE() << what << ": jinja2 raised '" << row.at("error").get<std::string>() << "' but lowbit rendered";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find(row.at("error").get<std::string>()), std::string::npos) << e.what();
      }
      ++errors;
      continue;
    }
    std::string got;
    try {
      got = render_chat_template(read_all(kDir / tname), in, tname);
    } catch (const Error& e) {
      ADD_FAILURE() << what << ": " << e.what();
      continue;
    }
    EXPECT_EQ(got, row.at("out").get<std::string>()) << what;
    ++compared;
  }
  EXPECT_GT(compared, 100);
  EXPECT_GT(errors, 0);  // raise_exception paths (roles not alternating, Gemma's system role)
}

TEST(ChatTemplate, SmolLM2PromptIsChatML) {
  ChatTemplateInputs in;
  in.messages = ojson::parse(R"([{"role": "user", "content": "What is the capital of France?"}])");
  in.add_generation_prompt = true;
  EXPECT_EQ(render_chat_template(read_all(kDir / "smollm2.jinja"), in),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n");
}

TEST(ChatTemplate, UnsupportedConstructsAreErrors) {
  ChatTemplateInputs in;
  in.messages = ojson::parse(R"([{"role": "user", "content": "x"}])");
  for (const char* bad : {
           "{% macro m() %}x{% endmacro %}{% call m() %}y{% endcall %}",  // statement
           "{% break %}",                             // loop control outside a loop
           "{% macro m() %}{% break %}{% endmacro %}{% for x in [1] %}{{ m() }}{% endfor %}",
           "{% macro m(n) %}{{ m(n) }}{% endmacro %}{{ m(1) }}",  // unbounded recursion
           "{% macro m(a) %}{{ a }}{% endmacro %}{{ m(1, 2) }}",  // too many arguments
           "{% macro m(a) %}{{ a }}{% endmacro %}{{ m(b=1) }}",   // unknown keyword
           "{% macro m(a=1, b) %}{% endmacro %}",     // non-default after default
           "{{ '%(a)s' % 1 }}",                       // mapping format
           "{{ '%s %s' % 1 }}",                       // not enough arguments
           "{{ '%s' % (1, 2) }}",                     // too many arguments
           "{{ '%d' % 'x' }}",                        // wrong type
           "{{ '%q' % 1 }}",                          // unknown conversion
           "{{ messages | frobnicate }}",             // filter
           "{{ 1 is prime }}",                        // test
           "{{ strftime_now('%Y') }}",                // unknown function
           "{% for m in messages %}{{ m }}",          // missing endfor
           "{{ x.y }}",                               // attribute of undefined
           "{{ messages[0].content.foo() }}",         // unknown method
           "{% if %}",                                // syntax
           "{{ 'unterminated }}",                     // lexer
           "{% set ns = namespace() %}{% set ns2.a = 1 %}",
       }) {
    EXPECT_THROW(render_chat_template(bad, in, "bad.jinja"), Error) << bad;
  }
  for (const std::string& bad : {"{{ " + std::string(5000, '(') + "1" + std::string(5000, ')') + " }}",
                                 "{{ " + std::string(5000, '-') + "1 }}",
                                 [] {
                                   std::string s;
                                   for (int i = 0; i < 3000; ++i) s += "{% if true %}";
                                   return s;
                                 }(),
                                 std::string("{% set big = 'x' * 1000000 %}{% for a in range(100000) %}{{ big }}{% endfor %}")}) {
    EXPECT_THROW(render_chat_template(bad, in, "bad.jinja"), Error) << bad;
  }
  try {
    render_chat_template("line1\n{{ messages | frobnicate }}", in, "t.jinja");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("t.jinja: line 2"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("frobnicate"), std::string::npos) << e.what();
  }
}

// A template comes from a model file, which may lie: work, value sizes, nesting and integer
// arithmetic are bounded, and each bound is a lowbit::Error naming it (never a hang, an exhausted
// memory or stack, or signed overflow — the suite runs under UBSan).
TEST(ChatTemplate, HostileTemplatesHitTheirLimits) {
  ChatTemplateInputs in;
  in.messages = ojson::parse(R"([{"role": "user", "content": "x"}])");
  const std::pair<std::string, const char*> cases[] = {
      {"{% for a in range(2000) %}{% for b in range(2000) %}{% endfor %}{% endfor %}", "steps"},
      {"{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "64 MiB"},
      {"{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "64 MiB"},
      {"{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}{% endfor %}", "list longer"},
      {"{{ ('x' * 1000000) * 1000 }}", "repetition"},
      {"{{ ' ' | center(width=1000000000000) }}", "center"},
      {"{{ [1] | tojson(indent=1000000000) }}", "indent"},
      {"{{ 9223372036854775807 + 1 }}", "overflow"},
      {"{{ -9223372036854775807 - 2 }}", "overflow"},
      {"{{ 4294967296 * 4294967296 }}", "overflow"},
      {"{{ 2 ** 64 }}", "overflow"},
      {"{{ 3 ** 1000000000000 }}", "overflow"},
      {"{{ (-9223372036854775807 - 1) // -1 }}", "overflow"},
      {"{{ (-9223372036854775807 - 1) % -1 }}", "overflow"},
      {"{{ -(-9223372036854775807 - 1) }}", "overflow"},
      {"{% set ns = namespace() %}{% set ns.self = ns %}{{ ns | tojson }}", "contain itself"},
      {"{% set ns = namespace() %}{% set ns.l = [1, {'a': ns}] %}", "contain itself"},
      {"{% set a = namespace() %}{% set b = namespace(p=a) %}{% set a.p = b %}", "contain itself"},
      {"{% set ns = namespace(x=[]) %}{% for i in range(1000) %}{% set ns.x = [ns.x] %}{% endfor %}{{ ns.x }}", "nested more than 100"},
      {"{% set ns = namespace(x={}) %}{% for i in range(1000) %}{% set ns.x = {'a': ns.x} %}{% endfor %}", "nested more than 100"},
  };
  for (const auto& [bad, what] : cases) {
    try {
      render_chat_template(bad, in, "hostile.jinja");
      ADD_FAILURE() << "rendered: " << bad;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << bad << "\n  -> " << e.what();
      EXPECT_NE(std::string(e.what()).find("hostile.jinja: line 1"), std::string::npos) << e.what();
    }
  }
  // A NUL byte inside a %-format is not a flag or a conversion (found by fuzz_chat_template).
  for (const std::string& nul : {std::string("{{ '%\0f' % 1.5 }}", 17), std::string("{{ '%\0\0d' % 1 }}", 16)}) {
    ASSERT_EQ(nul.find('}', 10), nul.size() - 2) << "the literal's length";
    try {
      render_chat_template(nul, in, "hostile.jinja");
      ADD_FAILURE() << "rendered a NUL format";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("format character"), std::string::npos) << e.what();
    }
  }
  // Wide formats are not cut at a buffer's size (Python pads to the full width).
  EXPECT_EQ(render_chat_template("{{ '%600d' % 7 }}", in), std::string(599, ' ') + "7");
  EXPECT_EQ(render_chat_template("{{ '%.700f' % 1 }}", in).size(), size_t(702));
  // Python's results where they fit in 64 bits.
  EXPECT_EQ(render_chat_template("{{ 2 ** 62 }} {{ (-1) ** 7 }} {{ 0 ** 0 }} {{ 1 ** 999999999999 }} {{ -7 // 2 }} {{ -7 % 2 }}", in),
            "4611686018427387904 -1 1 1 -4 1");
  EXPECT_EQ(render_chat_template("{{ 9223372036854775806 + 1 }} {{ -9223372036854775807 - 1 }}", in),
            "9223372036854775807 -9223372036854775808");
}

// Mutated real templates (bytes deleted, duplicated, replaced by template punctuation) either render
// or fail with lowbit::Error: never a crash, hang or read out of bounds (the suite runs under ASan).
TEST(ChatTemplate, MutatedTemplatesNeverCrash) {
  const ojson cases = ojson::parse(read_all(kDir / "cases.json"));
  ChatTemplateInputs in;
  in.messages = cases.at(3).at("messages");
  in.extra["tools"] = nullptr;
  std::mt19937 rng(11);
  const std::string alphabet = "{}%#-+()[]|~'\".,: \n\\abcdefor0123=!<>*";
  int rendered = 0, errors = 0;
  for (const char* name : {"qwen3.jinja", "llama2.jinja", "features.jinja", "gemma.jinja"}) {
    const std::string src = read_all(kDir / name);
    for (int trial = 0; trial < 300; ++trial) {
      std::string t = src;
      const int edits = 1 + int(rng() % 4);
      for (int e = 0; e < edits && !t.empty(); ++e) {
        const size_t pos = rng() % t.size();
        switch (rng() % 3) {
          case 0: t.erase(pos, 1 + rng() % 3); break;
          case 1: t.insert(pos, t.substr(pos, 1 + rng() % 8)); break;
          default: t[pos] = alphabet[rng() % alphabet.size()];
        }
      }
      try {
        render_chat_template(t, in, name);
        ++rendered;
      } catch (const Error&) {
        ++errors;
      }
    }
  }
  EXPECT_GT(rendered, 0);
  EXPECT_GT(errors, 0);
}

}  // namespace
}  // namespace lowbit

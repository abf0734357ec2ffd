// libFuzzer target: the chat-template interpreter (tokenizer/chat_template.h). A template comes from
// a model file (GGUF tokenizer.chat_template, tokenizer_config.json), which may lie: any source must
// render or throw lowbit::Error, within the interpreter's step, size and nesting bounds (no hang, no
// exhausted memory or stack). Seed corpus: tests/tokenizer/chat_templates/*.jinja.
#include <cstddef>
#include <cstdint>
#include <string>

#include "lowbit/core/error.h"
#include "lowbit/tokenizer/chat_template.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const lowbit::ChatTemplateInputs inputs = [] {
    lowbit::ChatTemplateInputs in;
    in.messages = nlohmann::ordered_json::parse(
        R"([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}])");
    in.add_generation_prompt = true;
    in.bos_token = "<s>";
    in.eos_token = "</s>";
    in.extra["tools"] = nullptr;
    return in;
  }();
  try {
    lowbit::render_chat_template(std::string(reinterpret_cast<const char*>(data), size), inputs, "fuzz.jinja");
  } catch (const lowbit::Error&) {
  }
  return 0;
}

// libFuzzer target: the OpenAI request parser of lowbit serve (runtime/openai_api.h). Any body
// must parse or throw lowbit::ApiError.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "lowbit/runtime/openai_api.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view body(reinterpret_cast<const char*>(data), size);
  for (bool chat : {false, true}) {
    try {
      lowbit::parse_api_request(body, chat);
    } catch (const lowbit::ApiError&) {
    }
  }
  return 0;
}

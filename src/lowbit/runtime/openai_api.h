// The request side of lowbit serve's OpenAI-compatible API, without HTTP: a request body (JSON
// text) becomes an ApiRequest or an ApiError carrying the HTTP status and an OpenAI-style error
// object. Every malformed body (not JSON, nested too deep, wrong field types, values out of
// range) is an ApiError; nothing else escapes (fuzz/fuzz_openai_request.cpp).
//
// Fields read (others are ignored, as OpenAI clients send many):
//   completions:  prompt (string, [string] or [token ids]), max_tokens, temperature, top_p, seed,
//                 stop (string or up to 4 strings), stream, stream_options.include_usage, n (= 1),
//                 ignore_eos (llama-server's extension, for benchmarks)
//   chat:         messages ([{role, content}], content a string or [{type: "text", text}]),
//                 max_tokens / max_completion_tokens, and the sampling fields above
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "lowbit/core/error.h"

namespace lowbit {

class ApiError : public Error {
 public:
  ApiError(int status, const std::string& message, std::string param = {},
           std::string type = "invalid_request_error")
      : Error(message), status(status), param(std::move(param)), type(std::move(type)) {}
  int status;          // HTTP status: 400, 401, 404, 413, 503, ...
  std::string param;   // the offending field ("" when none)
  std::string type;    // "invalid_request_error", "authentication_error", "server_error"
};

// {"error": {"message", "type", "param", "code"}} as OpenAI's API answers errors.
nlohmann::json api_error_body(const ApiError& e);

struct ApiRequest {
  bool chat = false;
  std::string prompt;                 // completions: prompt text (when prompt_ids is empty)
  std::vector<int> prompt_ids;        // completions: a prompt given as token ids
  nlohmann::ordered_json messages;    // chat: [{"role": ..., "content": string}, ...] (parts joined)
  int max_tokens = 0;                 // 0: not given (the server picks its default)
  double temperature = 1.0;
  double top_p = 1.0;
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;
  bool stream = false;
  bool include_usage = false;         // stream_options.include_usage
  bool ignore_eos = false;            // llama.cpp's extension: generate past EOS (benchmarks)
  std::string model;
};

// Largest nesting depth of arrays/objects accepted in a body.
inline constexpr int kApiMaxJsonDepth = 32;

// Parses and validates a /v1/completions (chat = false) or /v1/chat/completions body.
// Throws ApiError (status 400) naming the field and the problem.
ApiRequest parse_api_request(std::string_view body, bool chat);

}  // namespace lowbit

#include "lowbit/runtime/openai_api.h"

#include <cmath>
#include <limits>

namespace lowbit {

nlohmann::json api_error_body(const ApiError& e) {
  nlohmann::json err = {{"message", e.what()}, {"type", e.type}, {"param", nullptr}, {"code", nullptr}};
  if (!e.param.empty()) err["param"] = e.param;
  return {{"error", err}};
}

namespace {
[[noreturn]] void bad(const std::string& param, const std::string& message) { throw ApiError(400, message, param); }

// Deepest nesting of [ and { outside strings: nlohmann's DOM parser is iterative, but a body is
// refused early rather than built into a deep tree.
int json_depth(std::string_view s) {
  int depth = 0, deepest = 0;
  bool in_string = false;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (in_string) {
      if (c == '\\') ++i;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      deepest = std::max(deepest, ++depth);
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return deepest;
}

const nlohmann::json* field(const nlohmann::json& j, const char* name) {
  auto it = j.find(name);
  if (it == j.end() || it->is_null()) return nullptr;
  return &*it;
}

double number_in(const nlohmann::json& j, const char* name, double lo, double hi, bool lo_open, double def) {
  const nlohmann::json* f = field(j, name);
  if (!f) return def;
  if (!f->is_number()) bad(name, std::string("'") + name + "' must be a number, got " + f->type_name());
  const double v = f->get<double>();
  if (!std::isfinite(v) || v > hi || (lo_open ? v <= lo : v < lo)) {
    std::string range = std::string(lo_open ? "(" : "[") + std::to_string(lo) + ", " + std::to_string(hi) + "]";
    bad(name, std::string("'") + name + "' must be in " + range + ", got " + f->dump());
  }
  return v;
}

int positive_int(const nlohmann::json& j, const char* name) {
  const nlohmann::json* f = field(j, name);
  if (!f) return 0;
  if (!f->is_number_integer()) bad(name, std::string("'") + name + "' must be an integer, got " + f->type_name());
  const bool ok = f->is_number_unsigned()
                      ? f->get<uint64_t>() >= 1 && f->get<uint64_t>() <= uint64_t(std::numeric_limits<int>::max())
                      : f->get<int64_t>() >= 1 && f->get<int64_t>() <= std::numeric_limits<int>::max();
  if (!ok)
    bad(name, std::string("'") + name + "' must be an integer from 1 to 2147483647, got " + f->dump());
  return int(f->get<int64_t>());
}

std::string text_content(const nlohmann::json& content, size_t i) {
  const std::string where = "messages[" + std::to_string(i) + "].content";
  if (content.is_string()) return content.get<std::string>();
  if (!content.is_array()) bad(where, "'" + where + "' must be a string or an array of text parts");
  std::string text;
  for (const auto& part : content) {
    const nlohmann::json* type = part.is_object() ? field(part, "type") : nullptr;
    const nlohmann::json* t = part.is_object() ? field(part, "text") : nullptr;
    if (!type || !type->is_string() || type->get<std::string>() != "text" || !t || !t->is_string())
      bad(where, "'" + where + "': only parts {\"type\": \"text\", \"text\": string} are supported");
    text += t->get<std::string>();
  }
  return text;
}
}  // namespace

ApiRequest parse_api_request(std::string_view body, bool chat) {
  if (json_depth(body) > kApiMaxJsonDepth)
    throw ApiError(400, "request body nests arrays/objects deeper than " + std::to_string(kApiMaxJsonDepth) + " levels");
  nlohmann::json j = nlohmann::json::parse(body, nullptr, false);
  if (j.is_discarded()) throw ApiError(400, "request body is not valid JSON");
  if (!j.is_object()) throw ApiError(400, std::string("request body must be a JSON object, got ") + j.type_name());
  ApiRequest r;
  r.chat = chat;
  if (const auto* m = field(j, "model")) {
    if (!m->is_string()) bad("model", std::string("'model' must be a string, got ") + m->type_name());
    r.model = m->get<std::string>();
  }
  if (chat) {
    const nlohmann::json* msgs = field(j, "messages");
    if (!msgs) bad("messages", "'messages' is required");
    if (!msgs->is_array() || msgs->empty()) bad("messages", "'messages' must be a non-empty array");
    r.messages = nlohmann::ordered_json::array();
    for (size_t i = 0; i < msgs->size(); ++i) {
      const auto& m = (*msgs)[i];
      const std::string where = "messages[" + std::to_string(i) + "]";
      if (!m.is_object()) bad(where, "'" + where + "' must be an object");
      const nlohmann::json* role = field(m, "role");
      if (!role || !role->is_string()) bad(where + ".role", "'" + where + ".role' must be a string");
      const std::string rs = role->get<std::string>();
      if (rs != "system" && rs != "user" && rs != "assistant" && rs != "developer" && rs != "tool")
        bad(where + ".role", "'" + where + ".role' must be system, developer, user, assistant or tool, got '" + rs + "'");
      const nlohmann::json* content = field(m, "content");
      std::string text = content ? text_content(*content, i) : std::string();
      if (!content && rs != "assistant") bad(where + ".content", "'" + where + ".content' is required");
      r.messages.push_back({{"role", rs == "developer" ? "system" : rs}, {"content", text}});
    }
    r.max_tokens = positive_int(j, "max_completion_tokens");
    if (int mt = positive_int(j, "max_tokens")) r.max_tokens = mt;
  } else {
    const nlohmann::json* p = field(j, "prompt");
    if (!p) bad("prompt", "'prompt' is required");
    if (p->is_string()) {
      r.prompt = p->get<std::string>();
    } else if (p->is_array() && p->size() == 1 && (*p)[0].is_string()) {
      r.prompt = (*p)[0].get<std::string>();
    } else if (p->is_array() && !p->empty() && (*p)[0].is_number_integer()) {
      for (const auto& id : *p) {
        if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > std::numeric_limits<int>::max())
          bad("prompt", "'prompt' as token ids must be non-negative integers");
        r.prompt_ids.push_back(int(id.get<int64_t>()));
      }
    } else if (p->is_array() && p->size() > 1 && (*p)[0].is_string()) {
      bad("prompt", "only one prompt per request is supported (got " + std::to_string(p->size()) + ")");
    } else {
      bad("prompt", "'prompt' must be a string, [string] or an array of token ids");
    }
    r.max_tokens = positive_int(j, "max_tokens");
  }
  r.temperature = number_in(j, "temperature", 0, 2, false, 1.0);
  r.top_p = number_in(j, "top_p", 0, 1, true, 1.0);
  if (const auto* s = field(j, "seed")) {
    if (!s->is_number_integer()) bad("seed", std::string("'seed' must be an integer, got ") + s->type_name());
    r.seed = s->is_number_unsigned() ? s->get<uint64_t>() : uint64_t(s->get<int64_t>());
  }
  if (const auto* s = field(j, "stop")) {
    if (s->is_string()) {
      r.stop.push_back(s->get<std::string>());
    } else if (s->is_array()) {
      if (s->size() > 4) bad("stop", "'stop' takes at most 4 strings, got " + std::to_string(s->size()));
      for (const auto& x : *s) {
        if (!x.is_string()) bad("stop", "'stop' must be a string or an array of strings");
        r.stop.push_back(x.get<std::string>());
      }
    } else {
      bad("stop", std::string("'stop' must be a string or an array of strings, got ") + s->type_name());
    }
    for (const auto& x : r.stop)
      if (x.empty()) bad("stop", "'stop' strings must not be empty");
  }
  if (const auto* s = field(j, "stream")) {
    if (!s->is_boolean()) bad("stream", std::string("'stream' must be a boolean, got ") + s->type_name());
    r.stream = s->get<bool>();
  }
  if (const auto* so = field(j, "stream_options")) {
    if (!so->is_object()) bad("stream_options", "'stream_options' must be an object");
    if (const auto* u = field(*so, "include_usage")) {
      if (!u->is_boolean()) bad("stream_options.include_usage", "'stream_options.include_usage' must be a boolean");
      r.include_usage = u->get<bool>();
    }
  }
  if (const auto* ie = field(j, "ignore_eos")) {
    if (!ie->is_boolean()) bad("ignore_eos", std::string("'ignore_eos' must be a boolean, got ") + ie->type_name());
    r.ignore_eos = ie->get<bool>();
  }
  if (const auto* n = field(j, "n")) {
    if (!n->is_number_integer() || n->get<int64_t>() != 1) bad("n", "only n = 1 is supported, got " + n->dump());
  }
  return r;
}

}  // namespace lowbit

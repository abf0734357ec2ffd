// A small Jinja2 interpreter for chat templates (see chat_template.h): lexer (with trim_blocks /
// lstrip_blocks / whitespace control), recursive-descent parser following jinja2's operator
// precedence, tree-walking evaluator with Python value semantics (str(), repr of floats, truthiness,
// per-iteration loop scopes).
#include "lowbit/tokenizer/chat_template.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "lowbit/core/error.h"
#include "lowbit/tokenizer/unicode.h"

namespace lowbit {
namespace {

using ojson = nlohmann::ordered_json;

// ============================================================================== values

struct Value;
using ValueList = std::vector<Value>;
struct Object;
struct Args;
using Function = std::function<Value(Args&)>;

struct Value {
  enum Kind { kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kObject, kFunction } kind = kUndefined;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;
  std::shared_ptr<ValueList> list;
  std::shared_ptr<Object> obj;
  std::shared_ptr<Function> fn;
  std::string undefined_name;  // for error messages
  bool tuple = false;          // a kList that Python would print as a tuple

  static Value none() { Value v; v.kind = kNone; return v; }
  static Value boolean(bool x) { Value v; v.kind = kBool; v.b = x; return v; }
  static Value integer(int64_t x) { Value v; v.kind = kInt; v.i = x; return v; }
  static Value number(double x) { Value v; v.kind = kFloat; v.f = x; return v; }
  static Value string(std::string x) { Value v; v.kind = kString; v.s = std::move(x); return v; }
  static Value make_list(ValueList x = {}) { Value v; v.kind = kList; v.list = std::make_shared<ValueList>(std::move(x)); return v; }
  static Value make_object(bool ns = false);
  static Value function(Function f) { Value v; v.kind = kFunction; v.fn = std::make_shared<Function>(std::move(f)); return v; }
  static Value undefined(std::string name) { Value v; v.undefined_name = std::move(name); return v; }
  bool is_number() const { return kind == kInt || kind == kFloat || kind == kBool; }
  double as_double() const { return kind == kFloat ? f : kind == kInt ? double(i) : double(b); }
};

struct Object {
  std::vector<std::pair<std::string, Value>> items;  // insertion order, as Python dicts
  bool is_namespace = false;
  const Value* find(const std::string& k) const {
    for (const auto& [key, v] : items)
      if (key == k) return &v;
    return nullptr;
  }
  void set(const std::string& k, Value v) {
    for (auto& [key, old] : items)
      if (key == k) {
        old = std::move(v);
        return;
      }
    items.emplace_back(k, std::move(v));
  }
};

Value Value::make_object(bool ns) {
  Value v;
  v.kind = kObject;
  v.obj = std::make_shared<Object>();
  v.obj->is_namespace = ns;
  return v;
}

struct Args {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;
  const Value* get(size_t i, const char* name) const {
    if (i < pos.size()) return &pos[i];
    for (const auto& [k, v] : kw)
      if (k == name) return &v;
    return nullptr;
  }
};

Value from_json(const ojson& j) {
  switch (j.type()) {
    case ojson::value_t::null: return Value::none();
    case ojson::value_t::boolean: return Value::boolean(j.get<bool>());
    case ojson::value_t::number_integer:
    case ojson::value_t::number_unsigned: return Value::integer(j.get<int64_t>());
    case ojson::value_t::number_float: return Value::number(j.get<double>());
    case ojson::value_t::string: return Value::string(j.get<std::string>());
    case ojson::value_t::array: {
      Value v = Value::make_list();
      for (const auto& e : j) v.list->push_back(from_json(e));
      return v;
    }
    case ojson::value_t::object: {
      Value v = Value::make_object();
      for (const auto& [k, e] : j.items()) v.obj->items.emplace_back(k, from_json(e));
      return v;
    }
    default: return Value::none();
  }
}

const char* type_name(const Value& v) {
  switch (v.kind) {
    case Value::kUndefined: return "undefined";
    case Value::kNone: return "NoneType";
    case Value::kBool: return "bool";
    case Value::kInt: return "int";
    case Value::kFloat: return "float";
    case Value::kString: return "str";
    case Value::kList: return "list";
    case Value::kObject: return v.obj->is_namespace ? "Namespace" : "dict";
    case Value::kFunction: return "function";
  }
  return "?";
}

// Python repr() of a float: the shortest digits that round-trip, fixed notation for exponents in
// [-4, 16), else d.ddde+XX.
std::string float_repr(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buf[64];
  int prec = 1;
  for (; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof buf, "%.*e", prec - 1, x);
    if (std::strtod(buf, nullptr) == x) break;
  }
  std::string s = buf;  // [-]d.ddde[+-]XX
  const bool neg = s[0] == '-';
  if (neg) s.erase(0, 1);
  const size_t e = s.find('e');
  const int exp = std::atoi(s.c_str() + e + 1);
  std::string digits;
  for (size_t k = 0; k < e; ++k)
    if (s[k] != '.') digits += s[k];
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  std::string out;
  if (exp >= -4 && exp < 16) {
    if (exp < 0) {
      out = "0." + std::string(size_t(-exp - 1), '0') + digits;
    } else {
      const size_t int_len = size_t(exp) + 1;
      if (digits.size() <= int_len) {
        out = digits + std::string(int_len - digits.size(), '0') + ".0";
      } else {
        out = digits.substr(0, int_len) + "." + digits.substr(int_len);
      }
    }
  } else {
    out = digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char eb[16];
    std::snprintf(eb, sizeof eb, "e%c%02d", exp < 0 ? '-' : '+', std::abs(exp));
    out += eb;
  }
  return neg ? "-" + out : out;
}

std::string repr(const Value& v);

std::string str(const Value& v) {
  switch (v.kind) {
    case Value::kUndefined: return "";
    case Value::kNone: return "None";
    case Value::kBool: return v.b ? "True" : "False";
    case Value::kInt: return std::to_string(v.i);
    case Value::kFloat: return float_repr(v.f);
    case Value::kString: return v.s;
    case Value::kList: {
      std::string o = v.tuple ? "(" : "[";
      for (size_t k = 0; k < v.list->size(); ++k) o += (k ? ", " : "") + repr((*v.list)[k]);
      if (v.tuple && v.list->size() == 1) o += ",";
      return o + (v.tuple ? ")" : "]");
    }
    case Value::kObject: {
      if (v.obj->is_namespace) return "<Namespace>";
      std::string o = "{";
      bool first = true;
      for (const auto& [k, e] : v.obj->items) {
        o += (first ? "" : ", ") + repr(Value::string(k)) + ": " + repr(e);
        first = false;
      }
      return o + "}";
    }
    case Value::kFunction: return "<function>";
  }
  return "";
}

std::string repr(const Value& v) {
  if (v.kind != Value::kString) return str(v);
  // Python: single quotes unless the string contains ' and no ".
  const bool dq = v.s.find('\'') != std::string::npos && v.s.find('"') == std::string::npos;
  const char q = dq ? '"' : '\'';
  std::string o(1, q);
  for (unsigned char c : v.s) {
    if (c == '\\') o += "\\\\";
    else if (c == static_cast<unsigned char>(q)) o += std::string("\\") + q;
    else if (c == '\n') o += "\\n";
    else if (c == '\r') o += "\\r";
    else if (c == '\t') o += "\\t";
    else if (c < 0x20 || c == 0x7F) {
      char b[8];
      std::snprintf(b, sizeof b, "\\x%02x", c);
      o += b;
    } else o += char(c);
  }
  return o + q;
}

bool truthy(const Value& v) {
  switch (v.kind) {
    case Value::kUndefined: case Value::kNone: return false;
    case Value::kBool: return v.b;
    case Value::kInt: return v.i != 0;
    case Value::kFloat: return v.f != 0;
    case Value::kString: return !v.s.empty();
    case Value::kList: return !v.list->empty();
    case Value::kObject: return v.obj->is_namespace || !v.obj->items.empty();
    case Value::kFunction: return true;
  }
  return false;
}

bool equal(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.kind == Value::kFloat || b.kind == Value::kFloat) return a.as_double() == b.as_double();
    return (a.kind == Value::kInt ? a.i : int64_t(a.b)) == (b.kind == Value::kInt ? b.i : int64_t(b.b));
  }
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Value::kUndefined: case Value::kNone: return true;
    case Value::kString: return a.s == b.s;
    case Value::kList:
      if (a.list->size() != b.list->size()) return false;
      for (size_t k = 0; k < a.list->size(); ++k)
        if (!equal((*a.list)[k], (*b.list)[k])) return false;
      return true;
    case Value::kObject:
      if (a.obj == b.obj) return true;
      if (a.obj->items.size() != b.obj->items.size()) return false;
      for (const auto& [k, e] : a.obj->items) {
        const Value* o = b.obj->find(k);
        if (!o || !equal(e, *o)) return false;
      }
      return true;
    case Value::kFunction: return a.fn == b.fn;
    default: return false;
  }
}

// UTF-8 characters of a string (Python iterates and indexes code points).
std::vector<std::string> chars_of(const std::string& s) {
  std::vector<std::string> out;
  for (size_t i = 0; i < s.size();) {
    const auto d = unicode::decode_utf8(s, i);
    out.push_back(s.substr(i, d.len));
    i += d.len;
  }
  return out;
}

// Python's printf-style formatting ('fmt' % args, and jinja2's |format filter): conversions
// s, r, d, i, f, F, e, E, g, G, x, X, o, c and %%, with flags -, +, space, 0, #, a width and a
// precision (not '*'). `where` prefixes errors. Mapping keys ("%(name)s") are not supported.
std::string printf_format(const std::string& fmt, const std::vector<Value>& args, const std::string& where) {
  std::string out;
  size_t next_arg = 0;
  for (size_t k = 0; k < fmt.size(); ++k) {
    if (fmt[k] != '%') {
      out += fmt[k];
      continue;
    }
    if (++k >= fmt.size()) throw_error(where, ": incomplete format (a '%' at the end)");
    if (fmt[k] == '%') {
      out += '%';
      continue;
    }
    if (fmt[k] == '(') throw_error(where, ": '%(name)s' mapping formats are not supported");
    std::string flags;
    // (std::strchr finds a NUL byte too: the terminator.)
    while (k < fmt.size() && fmt[k] != '\0' && std::strchr("-+ 0#", fmt[k])) flags += fmt[k++];
    std::string width, prec;
    while (k < fmt.size() && std::isdigit(static_cast<unsigned char>(fmt[k]))) width += fmt[k++];
    bool has_prec = false;
    if (k < fmt.size() && fmt[k] == '.') {
      has_prec = true;
      ++k;
      while (k < fmt.size() && std::isdigit(static_cast<unsigned char>(fmt[k]))) prec += fmt[k++];
    }
    if (k >= fmt.size()) throw_error(where, ": incomplete format");
    if (fmt[k] == '*') throw_error(where, ": '*' widths in formats are not supported");
    if (width.size() > 4 || prec.size() > 4) throw_error(where, ": format width or precision too large");
    const char conv = fmt[k];
    if (next_arg >= args.size()) throw_error(where, ": not enough arguments for format string");
    const Value& v = args[next_arg++];
    if (conv == 's' || conv == 'r') {
      std::string text = conv == 's' ? str(v) : repr(v);
      if (has_prec) {
        const auto cs = chars_of(text);
        const size_t keep = std::min(cs.size(), size_t(std::atoi(prec.c_str())));
        text.clear();
        for (size_t c = 0; c < keep; ++c) text += cs[c];
      }
      const size_t len = chars_of(text).size(), w = size_t(std::atoi(width.c_str()));
      if (len < w) text = flags.find('-') != std::string::npos ? text + std::string(w - len, ' ') : std::string(w - len, ' ') + text;
      out += text;
      continue;
    }
    if (!v.is_number()) {
      if (conv == 'c' && v.kind == Value::kString && chars_of(v.s).size() == 1) {
        out += v.s;
        continue;
      }
      throw_error(where, ": %", std::string(1, conv), " format: a number is required, not ", type_name(v));
    }
    std::string spec = "%" + flags + width + (has_prec ? "." + prec : "");
    // snprintf into a string of the length it asks for (a width or precision up to 9999, so up
    // to ~10,300 characters for %f of a large double).
    auto format_one = [](const std::string& f, auto x) {
      const int n = std::snprintf(nullptr, 0, f.c_str(), x);
      if (n < 0) return std::string();
      std::string r(size_t(n) + 1, '\0');
      std::snprintf(r.data(), r.size(), f.c_str(), x);
      r.resize(size_t(n));
      return r;
    };
    std::string buf;
    if (conv == 'd' || conv == 'i' || conv == 'x' || conv == 'X' || conv == 'o' || conv == 'c') {
      const double d = v.as_double();
      if (!std::isfinite(d) || std::fabs(d) > 9.2e18) throw_error(where, ": cannot format ", str(v), " as an integer");
      const long long x = v.kind == Value::kFloat ? static_cast<long long>(std::trunc(d)) : static_cast<long long>(v.kind == Value::kInt ? v.i : v.b);
      if (conv == 'c') {
        if (x < 0 || x > 127) throw_error(where, ": %c of ", x, " is outside ASCII (lowbit formats ASCII only)");
        out += char(x);
        continue;
      }
      if ((conv == 'x' || conv == 'X' || conv == 'o') && x < 0) {
        spec.erase(std::remove(spec.begin(), spec.end(), '#'), spec.end());
        const std::string body = format_one(spec + "ll" + conv, -x);
        const size_t nz = body.find_first_not_of(' ');
        out += body.substr(0, nz == std::string::npos ? 0 : nz) + "-" + body.substr(nz == std::string::npos ? 0 : nz);
        continue;
      }
      spec += (conv == 'i' ? std::string("lld") : std::string("ll") + conv);
      buf = format_one(spec, x);
    } else if (conv != '\0' && std::strchr("fFeEgG", conv)) {
      spec += conv;
      buf = format_one(spec, v.as_double());
    } else {
      throw_error(where, ": unsupported format character '", std::string(1, conv), "'");
    }
    out += buf;
  }
  if (next_arg < args.size()) throw_error(where, ": not all arguments converted during string formatting");
  return out;
}

// Python's json.dumps(x, ensure_ascii=False, indent=indent) (separators ", " / ": " without
// indent, "," / ": " with one).
void to_json(const Value& v, std::string& o, int indent, int depth, const std::string& where) {
  auto nl = [&](int d) {
    if (indent >= 0) {
      o += '\n';
      o.append(size_t(indent * d), ' ');
    }
  };
  switch (v.kind) {
    case Value::kNone: o += "null"; return;
    case Value::kBool: o += v.b ? "true" : "false"; return;
    case Value::kInt: o += std::to_string(v.i); return;
    case Value::kFloat:
      if (std::isnan(v.f)) o += "NaN";
      else if (std::isinf(v.f)) o += v.f > 0 ? "Infinity" : "-Infinity";
      else o += float_repr(v.f);
      return;
    case Value::kString: {
      o += '"';
      for (unsigned char c : v.s) {
        switch (c) {
          case '"': o += "\\\""; break;
          case '\\': o += "\\\\"; break;
          case '\n': o += "\\n"; break;
          case '\r': o += "\\r"; break;
          case '\t': o += "\\t"; break;
          case '\b': o += "\\b"; break;
          case '\f': o += "\\f"; break;
          default:
            if (c < 0x20) {
              char b[8];
              std::snprintf(b, sizeof b, "\\u%04x", c);
              o += b;
            } else o += char(c);
        }
      }
      o += '"';
      return;
    }
    case Value::kList:
      if (v.list->empty()) {
        o += "[]";
        return;
      }
      o += '[';
      for (size_t k = 0; k < v.list->size(); ++k) {
        if (k) o += indent >= 0 ? "," : ", ";
        nl(depth + 1);
        to_json((*v.list)[k], o, indent, depth + 1, where);
      }
      nl(depth);
      o += ']';
      return;
    case Value::kObject: {
      if (v.obj->items.empty()) {
        o += "{}";
        return;
      }
      o += '{';
      bool first = true;
      for (const auto& [k, e] : v.obj->items) {
        if (!first) o += indent >= 0 ? "," : ", ";
        first = false;
        nl(depth + 1);
        to_json(Value::string(k), o, indent, depth + 1, where);
        o += ": ";
        to_json(e, o, indent, depth + 1, where);
      }
      nl(depth);
      o += '}';
      return;
    }
    default: throw_error(where, ": tojson: a value of type ", type_name(v), " is not JSON serializable");
  }
}

// ============================================================================== lexer

struct Tok {
  enum Kind { kName, kString, kInt, kFloat, kOp, kEnd } kind;
  std::string text;
  int line;
};

struct Piece {  // a template element before parsing
  enum Kind { kText, kOutput, kStatement } kind;
  std::string text;      // kText
  std::vector<Tok> toks;  // kOutput / kStatement (ending with kEnd)
  int line;
};

class Lexer {
 public:
  Lexer(const std::string& src, const std::string& name) : src_(src), name_(name) {}

  std::vector<Piece> run() {
    std::vector<Piece> out;
    size_t pos = 0;
    bool strip_next = false, trim_newline = false;
    while (pos <= src_.size()) {
      size_t p = find_tag(pos);
      std::string text = src_.substr(pos, (p == std::string::npos ? src_.size() : p) - pos);
      if (trim_newline && !text.empty() && text[0] == '\n') text.erase(0, 1);
      else if (trim_newline && text.compare(0, 2, "\r\n") == 0) text.erase(0, 2);
      if (strip_next) text.erase(0, text.find_first_not_of(" \t\r\n") == std::string::npos ? text.size() : text.find_first_not_of(" \t\r\n"));
      strip_next = trim_newline = false;
      if (p == std::string::npos) {
        if (!text.empty()) out.push_back({Piece::kText, text, {}, line_at(pos)});
        break;
      }
      const char kind = src_[p + 1];  // '{', '%' or '#'
      const char mod = p + 2 < src_.size() ? src_[p + 2] : 0;
      if (mod == '-') {
        const size_t keep = text.find_last_not_of(" \t\r\n");
        text.erase(keep == std::string::npos ? 0 : keep + 1);
      } else if (mod != '+' && kind != '{') {
        // lstrip_blocks: spaces and tabs from the start of the line to a block or comment tag.
        // Judged on the source, so a newline already removed by trim_blocks still counts.
        size_t j = p;
        while (j > pos && (src_[j - 1] == ' ' || src_[j - 1] == '\t')) --j;
        if (j == 0 || src_[j - 1] == '\n') {
          const size_t keep = text.find_last_not_of(" \t");
          text.erase(keep == std::string::npos ? 0 : keep + 1);
        }
      }
      if (!text.empty()) out.push_back({Piece::kText, text, {}, line_at(pos)});
      size_t q = p + 2 + ((mod == '-' || mod == '+') ? 1 : 0);
      const int line = line_at(p);
      if (kind == '#') {
        const size_t end = src_.find("#}", q);
        if (end == std::string::npos) throw_error(name_, ": line ", line, ": unterminated comment {# ... #}");
        strip_next = end > q && src_[end - 1] == '-';
        trim_newline = !strip_next && !(end > q && src_[end - 1] == '+');
        pos = end + 2;
        continue;
      }
      Piece piece{kind == '{' ? Piece::kOutput : Piece::kStatement, {}, {}, line};
      bool close_strip = false, close_plus = false;
      pos = lex_tag(q, kind == '{' ? '}' : '%', piece.toks, close_strip, close_plus);
      strip_next = close_strip;
      trim_newline = kind == '%' && !close_strip && !close_plus;
      // {% raw %}: everything up to {% endraw %} is text.
      if (kind == '%' && piece.toks.size() == 2 && piece.toks[0].kind == Tok::kName && piece.toks[0].text == "raw") {
        size_t r = pos;
        for (;;) {
          r = src_.find("{%", r);
          if (r == std::string::npos) throw_error(name_, ": line ", line, ": {% raw %} without {% endraw %}");
          size_t k = r + 2;
          if (k < src_.size() && (src_[k] == '-' || src_[k] == '+')) ++k;
          while (k < src_.size() && (src_[k] == ' ' || src_[k] == '\t' || src_[k] == '\n' || src_[k] == '\r')) ++k;
          if (src_.compare(k, 6, "endraw") == 0) break;
          r += 2;
        }
        std::string raw = src_.substr(pos, r - pos);
        if (trim_newline && !raw.empty() && raw[0] == '\n') raw.erase(0, 1);
        if (strip_next) raw.erase(0, raw.find_first_not_of(" \t\r\n") == std::string::npos ? raw.size() : raw.find_first_not_of(" \t\r\n"));
        // The endraw tag's own whitespace control and lstrip apply to the raw text's end.
        if (src_[r + 2] == '-') {
          const size_t keep = raw.find_last_not_of(" \t\r\n");
          raw.erase(keep == std::string::npos ? 0 : keep + 1);
        } else if (src_[r + 2] != '+') {
          const size_t keep = raw.find_last_not_of(" \t");
          if (keep != std::string::npos && raw[keep] == '\n') raw.erase(keep + 1);
        }
        if (!raw.empty()) out.push_back({Piece::kText, raw, {}, line});
        std::vector<Tok> end_toks;
        size_t k = r + 2 + ((src_[r + 2] == '-' || src_[r + 2] == '+') ? 1 : 0);
        pos = lex_tag(k, '%', end_toks, close_strip, close_plus);
        strip_next = close_strip;
        trim_newline = !close_strip && !close_plus;
        continue;
      }
      out.push_back(std::move(piece));
    }
    return out;
  }

 private:
  const std::string& src_;
  const std::string& name_;

  int line_at(size_t p) const { return 1 + int(std::count(src_.begin(), src_.begin() + std::ptrdiff_t(std::min(p, src_.size())), '\n')); }

  size_t find_tag(size_t from) const {
    for (size_t p = src_.find('{', from); p != std::string::npos; p = src_.find('{', p + 1))
      if (p + 1 < src_.size() && (src_[p + 1] == '{' || src_[p + 1] == '%' || src_[p + 1] == '#')) return p;
    return std::string::npos;
  }

  // Tokens of a tag's body from q to its closing delimiter ("}}" or "%}", optionally "-" / "+"
  // first); returns the position after the tag.
  size_t lex_tag(size_t q, char close, std::vector<Tok>& toks, bool& strip, bool& plus) {
    const int line = line_at(q);
    int depth = 0;
    size_t i = q;
    const size_t n = src_.size();
    auto err = [&](const std::string& what) { throw_error(name_, ": line ", line_at(i), ": ", what); };
    for (;;) {
      while (i < n && (src_[i] == ' ' || src_[i] == '\t' || src_[i] == '\n' || src_[i] == '\r')) ++i;
      if (i >= n) err(std::string("unterminated tag (missing '") + close + "}')");
      const char c = src_[i];
      if (depth == 0) {
        if ((c == '-' || c == '+') && i + 2 < n + 0 && src_[i + 1] == close && src_[i + 2] == '}') {
          strip = c == '-';
          plus = c == '+';
          toks.push_back({Tok::kEnd, "", line});
          return i + 3;
        }
        if (c == close && i + 1 < n && src_[i + 1] == '}') {
          strip = plus = false;
          toks.push_back({Tok::kEnd, "", line});
          return i + 2;
        }
      }
      if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t j = i;
        while (j < n && (std::isalnum(static_cast<unsigned char>(src_[j])) || src_[j] == '_')) ++j;
        toks.push_back({Tok::kName, src_.substr(i, j - i), line_at(i)});
        i = j;
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        size_t j = i;
        bool is_float = false;
        while (j < n && (std::isdigit(static_cast<unsigned char>(src_[j])) || src_[j] == '_')) ++j;
        if (j + 1 < n && src_[j] == '.' && std::isdigit(static_cast<unsigned char>(src_[j + 1]))) {
          is_float = true;
          ++j;
          while (j < n && std::isdigit(static_cast<unsigned char>(src_[j]))) ++j;
        }
        if (j < n && (src_[j] == 'e' || src_[j] == 'E')) {
          size_t k = j + 1;
          if (k < n && (src_[k] == '+' || src_[k] == '-')) ++k;
          if (k < n && std::isdigit(static_cast<unsigned char>(src_[k]))) {
            is_float = true;
            j = k;
            while (j < n && std::isdigit(static_cast<unsigned char>(src_[j]))) ++j;
          }
        }
        std::string t = src_.substr(i, j - i);
        t.erase(std::remove(t.begin(), t.end(), '_'), t.end());
        toks.push_back({is_float ? Tok::kFloat : Tok::kInt, t, line_at(i)});
        i = j;
      } else if (c == '\'' || c == '"') {
        std::string s;
        size_t j = i + 1;
        for (;; ++j) {
          if (j >= n) err("unterminated string literal");
          if (src_[j] == c) break;
          if (src_[j] == '\\' && j + 1 < n) {
            const char e = src_[++j];
            switch (e) {
              case 'n': s += '\n'; break;
              case 't': s += '\t'; break;
              case 'r': s += '\r'; break;
              case '\\': s += '\\'; break;
              case '\'': s += '\''; break;
              case '"': s += '"'; break;
              case '0': s += '\0'; break;
              case 'u': case 'x': case 'U': err("\\u / \\x escapes in string literals are not supported"); break;
              default: s += '\\'; s += e;  // Python keeps unknown escapes
            }
          } else {
            s += src_[j];
          }
        }
        toks.push_back({Tok::kString, s, line_at(i)});
        i = j + 1;
      } else {
        static const char* ops[] = {"**", "//", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "<", ">",
                                    "(", ")", "[", "]", "{", "}", ".", ",", ":", "|", "="};
        const char* hit = nullptr;
        for (const char* op : ops)
          if (src_.compare(i, std::char_traits<char>::length(op), op) == 0) {
            hit = op;
            break;
          }
        if (!hit) err(std::string("unexpected character '") + c + "' in a tag");
        const std::string op = hit;
        if (op == "(" || op == "[" || op == "{") ++depth;
        if (op == ")" || op == "]" || op == "}") --depth;
        toks.push_back({Tok::kOp, op, line_at(i)});
        i += op.size();
      }
    }
  }
};

// ============================================================================== AST

struct Expr;
using ExprP = std::shared_ptr<Expr>;
struct Expr {
  enum Kind { kLit, kName, kAttr, kItem, kSlice, kCall, kNot, kNeg, kPos, kBin, kAnd, kOr, kCond, kFilter, kTest,
              kList, kDict, kTuple } kind;
  Value lit;
  std::string s;  // name, attribute, operator, filter or test name
  std::vector<ExprP> a;
  std::vector<std::pair<std::string, ExprP>> kw;
  bool negate = false;
  int line = 0;
};

struct Node {
  enum Kind { kText, kOutput, kFor, kIf, kSet, kSetBlock, kMacro, kBreak, kContinue } kind;
  int line = 0;
  std::string text;                  // kText
  ExprP expr;                        // kOutput, kSet value, kFor iterable
  std::vector<std::string> targets;  // kFor, kSet, kSetBlock
  std::string attr;                  // kSet on ns.attr (targets[0] = ns)
  ExprP cond;                        // kFor filter
  std::vector<Node> body, else_body;
  std::vector<std::pair<ExprP, std::vector<Node>>> branches;  // kIf: (cond, body); else in else_body
  std::vector<ExprP> defaults;       // kMacro: default of each parameter targets[1..] (null: none)
};

class Parser {
 public:
  Parser(std::vector<Piece> pieces, const std::string& name) : pieces_(std::move(pieces)), name_(name) {}

  std::vector<Node> parse_all() {
    std::vector<Node> out = parse_block({});
    if (idx_ < pieces_.size()) fail(pieces_[idx_].line, "unexpected '{% " + pieces_[idx_].toks[0].text + " %}'");
    return out;
  }

 private:
  std::vector<Piece> pieces_;
  const std::string& name_;
  size_t idx_ = 0;
  int loop_depth_ = 0;  // for loops around the statement being parsed (break/continue need one)
  int depth_ = 0;  // nesting of blocks and sub-expressions: bounded, so no input can exhaust the stack
  struct DepthGuard {
    Parser& p;
    explicit DepthGuard(Parser& parser, int line) : p(parser) {
      if (++p.depth_ > 200) p.fail(line, "blocks or expressions nested more than 200 deep");
    }
    ~DepthGuard() { --p.depth_; }
  };
  // Current tag's tokens.
  const std::vector<Tok>* toks_ = nullptr;
  size_t t_ = 0;

  [[noreturn]] void fail(int line, const std::string& what) const { throw_error(name_, ": line ", line, ": ", what); }

  const Tok& peek(size_t k = 0) const { return (*toks_)[std::min(t_ + k, toks_->size() - 1)]; }
  const Tok& next() {
    const Tok& t = peek();
    if (t_ < toks_->size() - 1) ++t_;
    return t;
  }
  bool is_op(const char* op, size_t k = 0) const { return peek(k).kind == Tok::kOp && peek(k).text == op; }
  bool is_name(const char* n, size_t k = 0) const { return peek(k).kind == Tok::kName && peek(k).text == n; }
  void expect_op(const char* op) {
    if (!is_op(op)) fail(peek().line, std::string("expected '") + op + "', found '" + describe(peek()) + "'");
    next();
  }
  std::string expect_name() {
    if (peek().kind != Tok::kName) fail(peek().line, "expected a name, found '" + describe(peek()) + "'");
    return next().text;
  }
  void expect_end() {
    if (peek().kind != Tok::kEnd) fail(peek().line, "unexpected '" + describe(peek()) + "' at the end of a tag");
  }
  static std::string describe(const Tok& t) { return t.kind == Tok::kEnd ? "end of tag" : t.text; }

  // Nodes until a statement whose keyword is in `stop` (left unconsumed) or the end.
  std::vector<Node> parse_block(const std::vector<std::string>& stop) {
    DepthGuard guard(*this, idx_ < pieces_.size() ? pieces_[idx_].line : 0);
    std::vector<Node> out;
    while (idx_ < pieces_.size()) {
      const Piece& p = pieces_[idx_];
      if (p.kind == Piece::kText) {
        out.push_back(Node{Node::kText, p.line, p.text, {}, {}, {}, {}, {}, {}, {}, {}});
        ++idx_;
        continue;
      }
      toks_ = &p.toks;
      t_ = 0;
      if (p.kind == Piece::kOutput) {
        Node n{Node::kOutput, p.line, {}, parse_expr(), {}, {}, {}, {}, {}, {}, {}};
        expect_end();
        out.push_back(std::move(n));
        ++idx_;
        continue;
      }
      if (peek().kind != Tok::kName) fail(p.line, "a statement must start with a keyword");
      const std::string kw = peek().text;
      if (std::find(stop.begin(), stop.end(), kw) != stop.end()) return out;
      ++idx_;
      next();
      if (kw == "for") out.push_back(parse_for(p.line));
      else if (kw == "if") out.push_back(parse_if(p.line));
      else if (kw == "set") out.push_back(parse_set(p.line));
      else if (kw == "macro") out.push_back(parse_macro(p.line));
      else if (kw == "break" || kw == "continue") {
        // jinja2.ext.loopcontrols, which transformers enables.
        if (loop_depth_ == 0) fail(p.line, "'{% " + kw + " %}' outside a for loop");
        expect_end();
        Node n{kw == "break" ? Node::kBreak : Node::kContinue, p.line, {}, {}, {}, {}, {}, {}, {}, {}, {}};
        out.push_back(std::move(n));
      } else if (kw == "endfor" || kw == "endif" || kw == "else" || kw == "elif" || kw == "endset" || kw == "endmacro")
        fail(p.line, "'{% " + kw + " %}' without a matching opening statement");
      else
        fail(p.line, "unsupported statement '{% " + kw +
                         " %}' (lowbit's chat-template interpreter knows for, if, set, macro, break, continue, raw)");
    }
    if (!stop.empty()) fail(pieces_.empty() ? 1 : pieces_.back().line, "missing '{% " + stop.back() + " %}'");
    return out;
  }

  // Re-enter the statement tag at idx_ (a stop keyword) and consume its keyword.
  std::string enter_stop() {
    const Piece& p = pieces_[idx_++];
    toks_ = &p.toks;
    t_ = 0;
    return next().text;
  }

  Node parse_for(int line) {
    Node n{Node::kFor, line, {}, {}, {}, {}, {}, {}, {}, {}, {}};
    n.targets.push_back(expect_name());
    while (is_op(",")) {
      next();
      n.targets.push_back(expect_name());
    }
    if (!is_name("in")) fail(line, "expected 'in' in a for statement");
    next();
    n.expr = parse_or_cond(/*allow_cond=*/false);
    if (is_name("if")) {
      next();
      n.cond = parse_or_cond(false);
    }
    if (is_name("recursive")) fail(line, "recursive for loops are not supported");
    expect_end();
    ++loop_depth_;
    n.body = parse_block({"endfor", "else"});
    --loop_depth_;
    std::string kw = enter_stop();
    if (kw == "else") {
      expect_end();
      n.else_body = parse_block({"endfor"});
      enter_stop();
    }
    expect_end();
    return n;
  }

  Node parse_if(int line) {
    Node n{Node::kIf, line, {}, {}, {}, {}, {}, {}, {}, {}, {}};
    ExprP cond = parse_expr();
    expect_end();
    for (;;) {
      std::vector<Node> body = parse_block({"elif", "else", "endif"});
      n.branches.emplace_back(cond, std::move(body));
      const std::string kw = enter_stop();
      if (kw == "elif") {
        cond = parse_expr();
        expect_end();
        continue;
      }
      if (kw == "else") {
        expect_end();
        n.else_body = parse_block({"endif"});
        enter_stop();
      }
      expect_end();
      return n;
    }
  }

  // {% macro name(a, b=default, ...) %}body{% endmacro %}: targets = {name, a, b, ...}.
  Node parse_macro(int line) {
    Node n{Node::kMacro, line, {}, {}, {}, {}, {}, {}, {}, {}, {}};
    n.targets.push_back(expect_name());
    expect_op("(");
    while (!is_op(")")) {
      n.targets.push_back(expect_name());
      if (is_op("=")) {
        next();
        n.defaults.push_back(parse_expr());
      } else {
        if (!n.defaults.empty() && n.defaults.back())
          fail(line, "macro '" + n.targets[0] + "': a parameter without a default after one with a default");
        n.defaults.push_back(nullptr);
      }
      if (!is_op(",")) break;
      next();
    }
    expect_op(")");
    expect_end();
    const int saved = loop_depth_;
    loop_depth_ = 0;  // a loop around the definition is not a loop around the body
    n.body = parse_block({"endmacro"});
    loop_depth_ = saved;
    enter_stop();
    expect_end();
    return n;
  }

  Node parse_set(int line) {
    Node n{Node::kSet, line, {}, {}, {}, {}, {}, {}, {}, {}, {}};
    n.targets.push_back(expect_name());
    if (is_op(".")) {
      next();
      n.attr = expect_name();
    } else {
      while (is_op(",")) {
        next();
        n.targets.push_back(expect_name());
      }
    }
    if (peek().kind == Tok::kEnd) {  // {% set x %}...{% endset %}
      if (!n.attr.empty() || n.targets.size() != 1) fail(line, "a block set assigns one plain name");
      n.kind = Node::kSetBlock;
      n.body = parse_block({"endset"});
      enter_stop();
      expect_end();
      return n;
    }
    if (is_op("|")) fail(line, "filtered block set ({% set x | filter %}) is not supported");
    expect_op("=");
    n.expr = parse_expr();
    expect_end();
    return n;
  }

  // ---- expressions (jinja2 precedence) -------------------------------------------------------
  ExprP make(Expr::Kind k, int line) {
    auto e = std::make_shared<Expr>();
    e->kind = k;
    e->line = line;
    return e;
  }

  ExprP parse_expr() { return parse_or_cond(true); }

  // A tuple without parentheses is allowed at the top of for iterables / set values.
  ExprP parse_or_cond(bool allow_cond) {
    DepthGuard guard(*this, peek().line);
    ExprP e = parse_or();
    while (allow_cond && is_name("if")) {
      const int line = next().line;
      ExprP c = make(Expr::kCond, line);
      ExprP cond = parse_or();
      ExprP other;
      if (is_name("else")) {
        next();
        other = parse_or_cond(true);
      }
      c->a = {cond, e, other};  // other may be null: undefined
      e = c;
    }
    return e;
  }
  ExprP parse_or() {
    ExprP e = parse_and();
    while (is_name("or")) {
      ExprP o = make(Expr::kOr, next().line);
      o->a = {e, parse_and()};
      e = o;
    }
    return e;
  }
  ExprP parse_and() {
    ExprP e = parse_not();
    while (is_name("and")) {
      ExprP o = make(Expr::kAnd, next().line);
      o->a = {e, parse_not()};
      e = o;
    }
    return e;
  }
  ExprP parse_not() {
    DepthGuard guard(*this, peek().line);
    if (is_name("not")) {
      ExprP o = make(Expr::kNot, next().line);
      o->a = {parse_not()};
      return o;
    }
    return parse_compare();
  }
  ExprP parse_compare() {
    ExprP e = parse_math1();
    for (;;) {
      std::string op;
      if (peek().kind == Tok::kOp && (peek().text == "==" || peek().text == "!=" || peek().text == "<" ||
                                      peek().text == ">" || peek().text == "<=" || peek().text == ">=")) {
        op = next().text;
      } else if (is_name("in")) {
        next();
        op = "in";
      } else if (is_name("not") && is_name("in", 1)) {
        next();
        next();
        op = "not in";
      } else {
        return e;
      }
      ExprP b = make(Expr::kBin, peek().line);
      b->s = op;
      b->a = {e, parse_math1()};
      e = b;
    }
  }
  ExprP parse_math1() {
    ExprP e = parse_concat();
    while (is_op("+") || is_op("-")) {
      ExprP b = make(Expr::kBin, peek().line);
      b->s = next().text;
      b->a = {e, parse_concat()};
      e = b;
    }
    return e;
  }
  ExprP parse_concat() {
    ExprP e = parse_math2();
    while (is_op("~")) {
      ExprP b = make(Expr::kBin, next().line);
      b->s = "~";
      b->a = {e, parse_math2()};
      e = b;
    }
    return e;
  }
  ExprP parse_math2() {
    ExprP e = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      ExprP b = make(Expr::kBin, peek().line);
      b->s = next().text;
      b->a = {e, parse_pow()};
      e = b;
    }
    return e;
  }
  ExprP parse_pow() {
    ExprP e = parse_unary(true);
    while (is_op("**")) {
      ExprP b = make(Expr::kBin, next().line);
      b->s = "**";
      b->a = {e, parse_unary(true)};
      e = b;
    }
    return e;
  }
  ExprP parse_unary(bool with_filter) {
    DepthGuard guard(*this, peek().line);
    ExprP e;
    if (is_op("-") || is_op("+")) {
      const bool neg = peek().text == "-";
      e = make(neg ? Expr::kNeg : Expr::kPos, next().line);
      e->a = {parse_unary(false)};
    } else {
      e = parse_primary();
    }
    e = parse_postfix(e);
    if (with_filter) e = parse_filter_expr(e);
    return e;
  }
  ExprP parse_primary() {
    const Tok& t = peek();
    const int line = t.line;
    if (t.kind == Tok::kString) {
      std::string s;
      while (peek().kind == Tok::kString) s += next().text;  // adjacent literals concatenate
      ExprP e = make(Expr::kLit, line);
      e->lit = Value::string(s);
      return e;
    }
    if (t.kind == Tok::kInt || t.kind == Tok::kFloat) {
      ExprP e = make(Expr::kLit, line);
      const std::string txt = next().text;
      if (t.kind == Tok::kInt) {
        errno = 0;
        const long long v = std::strtoll(txt.c_str(), nullptr, 10);
        if (errno == ERANGE) fail(line, "integer literal " + txt + " is too large");
        e->lit = Value::integer(v);
      } else {
        e->lit = Value::number(std::strtod(txt.c_str(), nullptr));
      }
      return e;
    }
    if (t.kind == Tok::kName) {
      const std::string n = next().text;
      ExprP e = make(Expr::kLit, line);
      if (n == "true" || n == "True") e->lit = Value::boolean(true);
      else if (n == "false" || n == "False") e->lit = Value::boolean(false);
      else if (n == "none" || n == "None") e->lit = Value::none();
      else {
        e->kind = Expr::kName;
        e->s = n;
      }
      return e;
    }
    if (is_op("(")) {
      next();
      if (is_op(")")) {
        next();
        return make(Expr::kTuple, line);
      }
      ExprP first = parse_expr();
      if (is_op(")")) {
        next();
        return first;
      }
      ExprP tup = make(Expr::kTuple, line);
      tup->a.push_back(first);
      while (is_op(",")) {
        next();
        if (is_op(")")) break;
        tup->a.push_back(parse_expr());
      }
      expect_op(")");
      return tup;
    }
    if (is_op("[")) {
      next();
      ExprP l = make(Expr::kList, line);
      while (!is_op("]")) {
        l->a.push_back(parse_expr());
        if (!is_op(",")) break;
        next();
      }
      expect_op("]");
      return l;
    }
    if (is_op("{")) {
      next();
      ExprP d = make(Expr::kDict, line);
      while (!is_op("}")) {
        ExprP k = parse_expr();
        expect_op(":");
        d->a.push_back(k);
        d->a.push_back(parse_expr());
        if (!is_op(",")) break;
        next();
      }
      expect_op("}");
      return d;
    }
    fail(line, "unexpected '" + describe(t) + "' in an expression");
  }
  ExprP parse_postfix(ExprP e) {
    for (;;) {
      if (is_op(".")) {
        const int line = next().line;
        ExprP a = make(Expr::kAttr, line);
        if (peek().kind == Tok::kInt) {  // x.0 is x[0] in jinja
          a->kind = Expr::kItem;
          ExprP idx = make(Expr::kLit, line);
          idx->lit = Value::integer(std::strtoll(next().text.c_str(), nullptr, 10));
          a->a = {e, idx};
        } else {
          a->s = expect_name();
          a->a = {e};
        }
        e = a;
      } else if (is_op("[")) {
        const int line = next().line;
        ExprP start, stop, step;
        bool slice = false;
        if (!is_op(":")) start = parse_expr();
        if (is_op(":")) {
          slice = true;
          next();
          if (!is_op("]") && !is_op(":")) stop = parse_expr();
          if (is_op(":")) {
            next();
            if (!is_op("]")) step = parse_expr();
          }
        }
        expect_op("]");
        ExprP s = make(slice ? Expr::kSlice : Expr::kItem, line);
        s->a = slice ? std::vector<ExprP>{e, start, stop, step} : std::vector<ExprP>{e, start};
        e = s;
      } else if (is_op("(")) {
        e = parse_call(e);
      } else {
        return e;
      }
    }
  }
  // Arguments after '(' into e->a (from index `first`) and e->kw.
  void parse_args(ExprP& e) {
    expect_op("(");
    while (!is_op(")")) {
      if (peek().kind == Tok::kName && is_op("=", 1)) {
        const std::string k = next().text;
        next();
        e->kw.emplace_back(k, parse_expr());
      } else {
        if (!e->kw.empty()) fail(peek().line, "positional argument after a keyword argument");
        e->a.push_back(parse_expr());
      }
      if (!is_op(",")) break;
      next();
    }
    expect_op(")");
  }
  ExprP parse_call(ExprP callee) {
    ExprP c = make(Expr::kCall, peek().line);
    c->a.push_back(callee);
    parse_args(c);
    return c;
  }
  ExprP parse_filter_expr(ExprP e) {
    for (;;) {
      if (is_op("|")) {
        const int line = next().line;
        ExprP f = make(Expr::kFilter, line);
        f->s = expect_name();
        f->a.push_back(e);
        if (is_op("(")) parse_args(f);
        e = f;
      } else if (is_name("is")) {
        const int line = next().line;
        ExprP t = make(Expr::kTest, line);
        if (is_name("not")) {
          next();
          t->negate = true;
        }
        t->s = expect_name();
        t->a.push_back(e);
        if (is_op("(")) {
          parse_args(t);
        } else if (peek().kind == Tok::kString || peek().kind == Tok::kInt || peek().kind == Tok::kFloat ||
                   (peek().kind == Tok::kName && !is_name("and") && !is_name("or") && !is_name("else") &&
                    !is_name("if") && !is_name("in") && !is_name("not") && !is_name("is"))) {
          t->a.push_back(parse_primary());  // `x is divisibleby 3`, `x is sameas none`
        }
        e = t;
      } else if (is_op("(")) {
        e = parse_call(e);
      } else {
        return e;
      }
    }
  }
};

// ============================================================================== evaluation

class Renderer {
 public:
  Renderer(const std::string& name) : name_(name) {}

  std::string render(const std::vector<Node>& nodes, std::map<std::string, Value> globals) {
    scopes_.clear();
    scopes_.push_back(std::move(globals));
    std::string out;
    exec(nodes, out);
    return out;
  }

 private:
  const std::string& name_;
  std::vector<std::map<std::string, Value>> scopes_;
  enum class Flow { kNormal, kBreak, kContinue };
  Flow flow_ = Flow::kNormal;  // set by {% break %} / {% continue %} until their loop sees it
  int macro_depth_ = 0;
  // A template comes from a model file, which may lie: every statement and loop iteration costs a
  // step, and no value or prompt grows past kMaxOutput, so no template hangs or exhausts memory.
  static constexpr int64_t kMaxSteps = 1'000'000;
  static constexpr size_t kMaxOutput = size_t(64) << 20;  // a prompt, not a denial of service
  static constexpr size_t kMaxList = size_t(1) << 20;
  int64_t steps_ = 0;

  void step(int line) {
    if (++steps_ > kMaxSteps) fail(line, "the template takes more than 1,000,000 steps (a loop that does not end?)");
  }
  // Throws when a string or list value is beyond the limits; returns it otherwise.
  Value bounded(Value v, int line) const {
    if (v.kind == Value::kString && v.s.size() > kMaxOutput) fail(line, "a string longer than 64 MiB");
    if (v.kind == Value::kList && v.list->size() > kMaxList) fail(line, "a list longer than 1,048,576 items");
    return v;
  }
  // What {% set %} stores is at most 100 lists / dicts / namespaces deep, so that nesting cannot grow
  // without bound from one set to the next (printing, comparing or freeing such a value recurses)
  // and a namespace cannot hold itself. Each node walked costs a step.
  static constexpr int kMaxNesting = 100;
  // `into`: the namespace that will hold the value (it must not be inside it: a cycle).
  Value shallow_enough(Value v, int line, const Object* into = nullptr) {
    walk_nesting(v, into ? 1 : 0, line, into);
    return v;
  }
  void walk_nesting(const Value& v, int depth, int line, const Object* into) {
    if (v.kind != Value::kList && v.kind != Value::kObject) return;
    if (into && v.kind == Value::kObject && v.obj.get() == into) fail(line, "a namespace cannot contain itself");
    if (depth >= kMaxNesting) fail(line, "a value nested more than 100 lists / dicts / namespaces deep");
    step(line);
    if (v.kind == Value::kList)
      for (const Value& x : *v.list) walk_nesting(x, depth + 1, line, into);
    else
      for (const auto& [k, x] : v.obj->items) walk_nesting(x, depth + 1, line, into);
  }
  // Python integers do not overflow; lowbit's are 64-bit, so an overflow is an error, not a wrap.
  int64_t checked(char op, int64_t a, int64_t b, int line) const {
    int64_t r = 0;
    const bool overflow = op == '+' ? __builtin_add_overflow(a, b, &r)
                        : op == '-' ? __builtin_sub_overflow(a, b, &r)
                                    : __builtin_mul_overflow(a, b, &r);
    if (overflow) fail(line, std::string("integer overflow in '") + (op == '*' ? "*' or '**" : std::string(1, op)) + "' (beyond 64 bits)");
    return r;
  }

  [[noreturn]] void fail(int line, const std::string& what) const { throw_error(name_, ": line ", line, ": ", what); }

  Value lookup(const std::string& n) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      auto f = it->find(n);
      if (f != it->end()) return f->second;
    }
    return Value::undefined(n);
  }

  void exec(const std::vector<Node>& nodes, std::string& out) {
    for (const Node& n : nodes) {
      exec(n, out);
      if (flow_ != Flow::kNormal) return;  // a break/continue unwinds to its loop
    }
  }

  // A macro call: its parameters bound in a new scope on top of the caller's, its body rendered.
  Value call_macro(const Node& m, Args& a) {
    const std::string& name = m.targets[0];
    if (macro_depth_ >= 64) fail(m.line, "macro '" + name + "': calls nested more than 64 deep");
    const size_t np = m.targets.size() - 1;
    if (a.pos.size() > np)
      fail(m.line, "macro '" + name + "' takes not more than " + std::to_string(np) + " argument(s)");
    std::map<std::string, Value> scope;
    std::vector<bool> bound(np, false);
    for (size_t k = 0; k < a.pos.size(); ++k) {
      scope[m.targets[k + 1]] = a.pos[k];
      bound[k] = true;
    }
    for (const auto& [key, val] : a.kw) {
      size_t k = 0;
      while (k < np && m.targets[k + 1] != key) ++k;
      if (k == np) fail(m.line, "macro '" + name + "' takes no keyword argument '" + key + "'");
      if (bound[k]) fail(m.line, "macro '" + name + "' got multiple values for argument '" + key + "'");
      scope[key] = val;
      bound[k] = true;
    }
    ++macro_depth_;
    scopes_.push_back(std::move(scope));
    for (size_t k = 0; k < np; ++k)
      if (!bound[k])
        scopes_.back()[m.targets[k + 1]] = m.defaults[k] ? eval(*m.defaults[k]) : Value::undefined(m.targets[k + 1]);
    std::string out;
    const Flow saved = flow_;
    flow_ = Flow::kNormal;
    exec(m.body, out);
    flow_ = saved;
    scopes_.pop_back();
    --macro_depth_;
    return Value::string(out);
  }

  std::vector<Value> iterate(const Value& v, int line) {
    switch (v.kind) {
      case Value::kUndefined: return {};
      case Value::kList: return *v.list;
      case Value::kString: {
        std::vector<Value> o;
        for (auto& c : chars_of(v.s)) o.push_back(Value::string(c));
        return o;
      }
      case Value::kObject: {
        if (v.obj->is_namespace) fail(line, "a namespace is not iterable");
        std::vector<Value> o;
        for (const auto& kv : v.obj->items) o.push_back(Value::string(kv.first));
        return o;
      }
      default: fail(line, std::string("'") + type_name(v) + "' object is not iterable");
    }
  }

  void assign(const std::vector<std::string>& targets, const Value& v, int line) {
    if (targets.size() == 1) {
      scopes_.back()[targets[0]] = v;
      return;
    }
    std::vector<Value> items = iterate(v, line);
    if (items.size() != targets.size())
      fail(line, "cannot unpack " + std::to_string(items.size()) + " values into " + std::to_string(targets.size()) + " names");
    for (size_t k = 0; k < targets.size(); ++k) scopes_.back()[targets[k]] = items[k];
  }

  void exec(const Node& n, std::string& out) {
    step(n.line);
    if (out.size() > kMaxOutput) fail(n.line, "the rendered prompt exceeds 64 MiB");
    switch (n.kind) {
      case Node::kText: out += n.text; return;
      case Node::kOutput: out += str(eval(*n.expr)); return;
      case Node::kIf:
        for (const auto& [cond, body] : n.branches)
          if (truthy(eval(*cond))) return exec(body, out);
        exec(n.else_body, out);
        return;
      case Node::kSet:
        if (!n.attr.empty()) {
          Value ns = lookup(n.targets[0]);
          if (ns.kind != Value::kObject || !ns.obj->is_namespace)
            fail(n.line, "cannot assign attribute '" + n.attr + "' of '" + n.targets[0] + "' (not a namespace())");
          ns.obj->set(n.attr, shallow_enough(eval(*n.expr), n.line, ns.obj.get()));
          return;
        }
        assign(n.targets, shallow_enough(eval(*n.expr), n.line), n.line);
        return;
      case Node::kBreak: flow_ = Flow::kBreak; return;
      case Node::kContinue: flow_ = Flow::kContinue; return;
      case Node::kMacro: {
        const Node* def = &n;
        scopes_.back()[n.targets[0]] = Value::function([this, def](Args& a) { return call_macro(*def, a); });
        return;
      }
      case Node::kSetBlock: {
        std::string captured;
        exec(n.body, captured);
        scopes_.back()[n.targets[0]] = Value::string(captured);
        return;
      }
      case Node::kFor: {
        std::vector<Value> items = iterate(eval(*n.expr), n.line);
        if (n.cond) {  // the filter sees each item bound to the targets
          std::vector<Value> kept;
          for (const Value& it : items) {
            step(n.line);
            scopes_.emplace_back();
            assign(n.targets, it, n.line);
            const bool keep = truthy(eval(*n.cond));
            scopes_.pop_back();
            if (keep) kept.push_back(it);
          }
          items = std::move(kept);
        }
        if (items.empty()) return exec(n.else_body, out);
        const int64_t len = int64_t(items.size());
        for (int64_t k = 0; k < len; ++k) {
          step(n.line);
          scopes_.emplace_back();  // a fresh scope each iteration: sets do not survive it
          Value loop = Value::make_object();
          Object& o = *loop.obj;
          o.set("index", Value::integer(k + 1));
          o.set("index0", Value::integer(k));
          o.set("revindex", Value::integer(len - k));
          o.set("revindex0", Value::integer(len - k - 1));
          o.set("first", Value::boolean(k == 0));
          o.set("last", Value::boolean(k == len - 1));
          o.set("length", Value::integer(len));
          o.set("previtem", k > 0 ? items[size_t(k - 1)] : Value::undefined("loop.previtem"));
          o.set("nextitem", k + 1 < len ? items[size_t(k + 1)] : Value::undefined("loop.nextitem"));
          o.set("cycle", Value::function([k](Args& a) {
            if (a.pos.empty()) return Value::none();
            return a.pos[size_t(k) % a.pos.size()];
          }));
          scopes_.back()["loop"] = loop;
          assign(n.targets, items[size_t(k)], n.line);
          exec(n.body, out);
          scopes_.pop_back();
          const Flow f = flow_;
          flow_ = Flow::kNormal;
          if (f == Flow::kBreak) break;
        }
        return;
      }
    }
  }

  // ---- expressions ---------------------------------------------------------------------------
  Value get_attr(const Value& obj, const std::string& attr, int line) {
    if (obj.kind == Value::kUndefined)
      fail(line, "'" + obj.undefined_name + "' is undefined (reading its attribute '" + attr + "')");
    if (obj.kind == Value::kObject) {
      if (!obj.obj->is_namespace) {
        if (Value m = method(obj, attr, line); m.kind == Value::kFunction) return m;
      }
      if (const Value* v = obj.obj->find(attr)) return *v;
      return Value::undefined(attr);
    }
    if (obj.kind == Value::kString || obj.kind == Value::kList) {
      Value m = method(obj, attr, line);
      if (m.kind == Value::kFunction) return m;
    }
    return Value::undefined(attr);
  }

  Value get_item(const Value& obj, const Value& key, int line) {
    if (obj.kind == Value::kUndefined)
      fail(line, "'" + obj.undefined_name + "' is undefined (reading an item of it)");
    if (obj.kind == Value::kObject && !obj.obj->is_namespace) {
      if (key.kind == Value::kString) {
        if (const Value* v = obj.obj->find(key.s)) return *v;
        if (Value m = method(obj, key.s, line); m.kind == Value::kFunction) return m;
      }
      return Value::undefined(str(key));
    }
    if ((obj.kind == Value::kList || obj.kind == Value::kString) && (key.kind == Value::kInt || key.kind == Value::kBool)) {
      const int64_t idx = key.kind == Value::kInt ? key.i : int64_t(key.b);
      if (obj.kind == Value::kList) {
        const int64_t n = int64_t(obj.list->size());
        const int64_t k = idx < 0 ? idx + n : idx;
        if (k < 0 || k >= n) return Value::undefined("[" + std::to_string(idx) + "]");
        return (*obj.list)[size_t(k)];
      }
      const auto cs = chars_of(obj.s);
      const int64_t n = int64_t(cs.size());
      const int64_t k = idx < 0 ? idx + n : idx;
      if (k < 0 || k >= n) return Value::undefined("[" + std::to_string(idx) + "]");
      return Value::string(cs[size_t(k)]);
    }
    if (key.kind == Value::kString) return get_attr(obj, key.s, line);
    return Value::undefined(str(key));
  }

  static int64_t to_index(const Value& v, int64_t def, const char* what, int line, const Renderer& r) {
    if (v.kind == Value::kNone || v.kind == Value::kUndefined) return def;
    if (v.kind != Value::kInt) r.fail(line, std::string("slice ") + what + " must be an integer");
    return v.i;
  }

  Value slice(const Value& obj, const Value& a, const Value& b, const Value& c, int line) {
    const int64_t step = to_index(c, 1, "step", line, *this);
    if (step == 0) fail(line, "slice step cannot be zero");
    std::vector<Value> items;
    std::vector<std::string> cs;
    int64_t n;
    if (obj.kind == Value::kList) n = int64_t(obj.list->size());
    else if (obj.kind == Value::kString) n = int64_t((cs = chars_of(obj.s)).size());
    else fail(line, std::string("cannot slice a value of type ") + type_name(obj));
    auto clamp = [&](int64_t x, bool is_start) {
      if (x < 0) x += n;
      if (step > 0) return std::clamp<int64_t>(x, 0, n);
      (void)is_start;
      return std::clamp<int64_t>(x, -1, n - 1);
    };
    int64_t start = a.kind == Value::kNone || a.kind == Value::kUndefined ? (step > 0 ? 0 : n - 1) : clamp(to_index(a, 0, "start", line, *this), true);
    int64_t stop = b.kind == Value::kNone || b.kind == Value::kUndefined ? (step > 0 ? n : -1) : clamp(to_index(b, 0, "stop", line, *this), false);
    std::vector<size_t> picked;
    for (int64_t k = start; step > 0 ? k < stop : k > stop; k += step) picked.push_back(size_t(k));
    if (obj.kind == Value::kList) {
      Value r = Value::make_list();
      for (size_t k : picked) r.list->push_back((*obj.list)[k]);
      return r;
    }
    std::string s;
    for (size_t k : picked) s += cs[k];
    return Value::string(s);
  }

  Value eval(const Expr& e) { return bounded(eval_unbounded(e), e.line); }

  Value eval_unbounded(const Expr& e) {
    switch (e.kind) {
      case Expr::kLit: return e.lit;
      case Expr::kName: return lookup(e.s);
      case Expr::kAttr: return get_attr(eval(*e.a[0]), e.s, e.line);
      case Expr::kItem: return get_item(eval(*e.a[0]), eval(*e.a[1]), e.line);
      case Expr::kSlice: {
        auto opt = [&](const ExprP& p) { return p ? eval(*p) : Value::none(); };
        return slice(eval(*e.a[0]), opt(e.a[1]), opt(e.a[2]), opt(e.a[3]), e.line);
      }
      case Expr::kCall: {
        Value f = eval(*e.a[0]);
        if (f.kind != Value::kFunction) {
          const std::string what = e.a[0]->kind == Expr::kName ? e.a[0]->s : e.a[0]->kind == Expr::kAttr ? e.a[0]->s : "expression";
          fail(e.line, "'" + what + "' is " + (f.kind == Value::kUndefined ? "undefined" : std::string("not callable (") + type_name(f) + ")") +
                           ": lowbit's chat-template interpreter does not support it");
        }
        Args args;
        for (size_t k = 1; k < e.a.size(); ++k) args.pos.push_back(eval(*e.a[k]));
        for (const auto& [k, v] : e.kw) args.kw.emplace_back(k, eval(*v));
        return (*f.fn)(args);
      }
      case Expr::kNot: return Value::boolean(!truthy(eval(*e.a[0])));
      case Expr::kNeg:
      case Expr::kPos: {
        Value v = eval(*e.a[0]);
        if (!v.is_number()) fail(e.line, std::string("bad operand type for unary ") + (e.kind == Expr::kNeg ? "-" : "+") + ": " + type_name(v));
        if (e.kind == Expr::kPos) return v.kind == Value::kBool ? Value::integer(v.b) : v;
        if (v.kind == Value::kFloat) return Value::number(-v.f);
        const int64_t x = v.kind == Value::kInt ? v.i : int64_t(v.b);
        if (x == INT64_MIN) fail(e.line, "integer overflow in unary '-' (beyond 64 bits)");
        return Value::integer(-x);
      }
      case Expr::kAnd: {
        Value a = eval(*e.a[0]);
        return truthy(a) ? eval(*e.a[1]) : a;
      }
      case Expr::kOr: {
        Value a = eval(*e.a[0]);
        return truthy(a) ? a : eval(*e.a[1]);
      }
      case Expr::kCond:
        if (truthy(eval(*e.a[0]))) return eval(*e.a[1]);
        return e.a[2] ? eval(*e.a[2]) : Value::undefined("else");
      case Expr::kBin: return binary(e.s, eval(*e.a[0]), eval(*e.a[1]), e.line);
      case Expr::kList: {
        Value l = Value::make_list();
        for (const auto& x : e.a) l.list->push_back(eval(*x));
        return l;
      }
      case Expr::kTuple: {
        Value l = Value::make_list();
        l.tuple = true;
        for (const auto& x : e.a) l.list->push_back(eval(*x));
        return l;
      }
      case Expr::kDict: {
        Value d = Value::make_object();
        for (size_t k = 0; k + 1 < e.a.size(); k += 2) {
          Value key = eval(*e.a[k]);
          if (key.kind != Value::kString) fail(e.line, "lowbit supports dict literals with string keys only");
          d.obj->set(key.s, eval(*e.a[k + 1]));
        }
        return d;
      }
      case Expr::kFilter: {
        Args args;
        for (size_t k = 1; k < e.a.size(); ++k) args.pos.push_back(eval(*e.a[k]));
        for (const auto& [k, v] : e.kw) args.kw.emplace_back(k, eval(*v));
        return filter(e.s, eval(*e.a[0]), args, e.line);
      }
      case Expr::kTest: {
        Args args;
        for (size_t k = 1; k < e.a.size(); ++k) args.pos.push_back(eval(*e.a[k]));
        const bool r = test(e.s, eval(*e.a[0]), args, e.line);
        return Value::boolean(e.negate ? !r : r);
      }
    }
    fail(e.line, "unknown expression");
  }

  int compare(const Value& a, const Value& b, const std::string& op, int line) const {
    if (a.is_number() && b.is_number()) {
      const double x = a.as_double(), y = b.as_double();
      return x < y ? -1 : x > y ? 1 : 0;
    }
    if (a.kind == Value::kString && b.kind == Value::kString) return a.s < b.s ? -1 : a.s > b.s ? 1 : 0;
    fail(line, std::string("'") + op + "' not supported between '" + type_name(a) + "' and '" + type_name(b) + "'");
  }

  bool contains(const Value& container, const Value& item, int line) const {
    switch (container.kind) {
      case Value::kString:
        if (item.kind != Value::kString) fail(line, "'in <string>' requires a string on the left");
        return container.s.find(item.s) != std::string::npos;
      case Value::kList:
        return std::any_of(container.list->begin(), container.list->end(), [&](const Value& x) { return equal(x, item); });
      case Value::kObject:
        return item.kind == Value::kString && container.obj->find(item.s) != nullptr;
      case Value::kUndefined: return false;
      default: fail(line, std::string("argument of type '") + type_name(container) + "' is not iterable");
    }
  }

  Value binary(const std::string& op, const Value& a, const Value& b, int line) {
    return bounded(binary_unbounded(op, a, b, line), line);
  }

  Value binary_unbounded(const std::string& op, const Value& a, const Value& b, int line) {
    if (op == "==") return Value::boolean(equal(a, b));
    if (op == "!=") return Value::boolean(!equal(a, b));
    if (op == "<") return Value::boolean(compare(a, b, op, line) < 0);
    if (op == ">") return Value::boolean(compare(a, b, op, line) > 0);
    if (op == "<=") return Value::boolean(compare(a, b, op, line) <= 0);
    if (op == ">=") return Value::boolean(compare(a, b, op, line) >= 0);
    if (op == "in") return Value::boolean(contains(b, a, line));
    if (op == "not in") return Value::boolean(!contains(b, a, line));
    if (op == "~") {
      std::string l = str(a), r = str(b);
      if (l.size() + r.size() > kMaxOutput) fail(line, "a string longer than 64 MiB");
      return Value::string(l + r);
    }
    auto bad = [&]() -> Value {
      fail(line, "unsupported operand types for " + op + ": '" + type_name(a) + "' and '" + type_name(b) + "'");
    };
    const bool ints = (a.kind == Value::kInt || a.kind == Value::kBool) && (b.kind == Value::kInt || b.kind == Value::kBool);
    const int64_t ai = a.kind == Value::kInt ? a.i : int64_t(a.b), bi = b.kind == Value::kInt ? b.i : int64_t(b.b);
    if (op == "+") {
      if (a.kind == Value::kString && b.kind == Value::kString) {
        if (a.s.size() + b.s.size() > kMaxOutput) fail(line, "a string longer than 64 MiB");
        return Value::string(a.s + b.s);
      }
      if (a.kind == Value::kList && b.kind == Value::kList) {
        if (a.list->size() + b.list->size() > kMaxList) fail(line, "a list longer than 1,048,576 items");
        Value r = Value::make_list(*a.list);
        r.list->insert(r.list->end(), b.list->begin(), b.list->end());
        return r;
      }
      if (ints) return Value::integer(checked('+', ai, bi, line));
      if (a.is_number() && b.is_number()) return Value::number(a.as_double() + b.as_double());
      return bad();
    }
    if (op == "-") {
      if (ints) return Value::integer(checked('-', ai, bi, line));
      if (a.is_number() && b.is_number()) return Value::number(a.as_double() - b.as_double());
      return bad();
    }
    if (op == "*") {
      if (ints) return Value::integer(checked('*', ai, bi, line));
      if (a.is_number() && b.is_number()) return Value::number(a.as_double() * b.as_double());
      const Value* s = a.kind == Value::kString ? &a : b.kind == Value::kString ? &b : nullptr;
      const Value* k = s == &a ? &b : &a;
      if (s && (k->kind == Value::kInt || k->kind == Value::kBool)) {
        std::string r;
        const int64_t times = k->kind == Value::kInt ? k->i : int64_t(k->b);
        if (times > (1 << 20) || (times > 0 && s->s.size() * size_t(times) > kMaxOutput))
          fail(line, "string repetition too large");
        for (int64_t t = 0; t < times; ++t) r += s->s;
        return Value::string(r);
      }
      return bad();
    }
    if (op == "/") {
      if (!(a.is_number() && b.is_number())) return bad();
      if (b.as_double() == 0) fail(line, "division by zero");
      return Value::number(a.as_double() / b.as_double());
    }
    if (op == "//" || op == "%") {
      if (a.kind == Value::kString && op == "%") {
        // A tuple supplies the arguments; anything else is the single argument (Python).
        const std::vector<Value> args = b.kind == Value::kList && b.tuple ? *b.list : std::vector<Value>{b};
        return Value::string(printf_format(a.s, args, name_ + ": line " + std::to_string(line)));
      }
      if (!(a.is_number() && b.is_number())) return bad();
      if (b.as_double() == 0) fail(line, op == "%" ? "modulo by zero" : "division by zero");
      if (ints) {
        if (ai == INT64_MIN && bi == -1) fail(line, "integer overflow in '" + op + "' (beyond 64 bits)");
        int64_t q = ai / bi, r = ai % bi;
        if (r != 0 && ((r < 0) != (bi < 0))) {
          --q;
          r += bi;
        }
        return Value::integer(op == "//" ? q : r);
      }
      const double x = a.as_double(), y = b.as_double();
      const double q = std::floor(x / y);
      return Value::number(op == "//" ? q : x - q * y);
    }
    if (op == "**") {
      if (ints && bi >= 0) {
        // 0, 1 and -1 never overflow; any other base overflows within 64 multiplications.
        if (ai == 0 || ai == 1) return Value::integer(bi == 0 ? 1 : ai);
        if (ai == -1) return Value::integer(bi % 2 ? -1 : 1);
        int64_t r = 1;
        for (int64_t t = 0; t < bi; ++t) r = checked('*', r, ai, line);
        return Value::integer(r);
      }
      if (a.is_number() && b.is_number()) return Value::number(std::pow(a.as_double(), b.as_double()));
      return bad();
    }
    fail(line, "unknown operator " + op);
  }

  // ---- methods of str / dict / list ------------------------------------------------------------
  Value method(const Value& self, const std::string& m, int line) {
    const std::string where = name_ + ": line " + std::to_string(line);
    if (self.kind == Value::kString) {
      const std::string s = self.s;
      auto strip_chars = [](const Args& a) -> std::string {
        const Value* c = a.get(0, "chars");
        return c && c->kind == Value::kString ? c->s : std::string(" \t\n\r\f\v");
      };
      if (m == "strip" || m == "lstrip" || m == "rstrip")
        return Value::function([s, m, strip_chars](Args& a) {
          const std::string cs = strip_chars(a);
          size_t b = 0, e = s.size();
          if (m != "rstrip") while (b < e && cs.find(s[b]) != std::string::npos) ++b;
          if (m != "lstrip") while (e > b && cs.find(s[e - 1]) != std::string::npos) --e;
          return Value::string(s.substr(b, e - b));
        });
      if (m == "startswith" || m == "endswith")
        return Value::function([s, m, where](Args& a) {
          const Value* p = a.get(0, "prefix");
          if (!p) throw_error(where, ": ", m, "() needs an argument");
          auto one = [&](const std::string& x) {
            return m == "startswith" ? s.compare(0, x.size(), x) == 0 : (s.size() >= x.size() && s.compare(s.size() - x.size(), x.size(), x) == 0);
          };
          if (p->kind == Value::kString) return Value::boolean(one(p->s));
          if (p->kind == Value::kList) {
            for (const Value& x : *p->list)
              if (x.kind == Value::kString && one(x.s)) return Value::boolean(true);
            return Value::boolean(false);
          }
          throw_error(where, ": ", m, "() takes a string or a tuple of strings");
        });
      if (m == "split")
        return Value::function([s, where](Args& a) {
          const Value* sep = a.get(0, "sep");
          const Value* mx = a.get(1, "maxsplit");
          int64_t maxsplit = mx && mx->kind == Value::kInt ? mx->i : -1;
          Value r = Value::make_list();
          if (!sep || sep->kind == Value::kNone) {  // runs of whitespace, no empty strings
            size_t i = 0;
            while (i < s.size()) {
              while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
              if (i >= s.size()) break;
              if (maxsplit == 0) {
                size_t e = s.size();
                while (e > i && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
                r.list->push_back(Value::string(s.substr(i, e - i)));
                break;
              }
              size_t j = i;
              while (j < s.size() && !std::isspace(static_cast<unsigned char>(s[j]))) ++j;
              r.list->push_back(Value::string(s.substr(i, j - i)));
              if (maxsplit > 0) --maxsplit;
              i = j;
            }
            return r;
          }
          if (sep->kind != Value::kString || sep->s.empty()) throw_error(where, ": split() separator must be a non-empty string");
          size_t from = 0;
          for (size_t hit; maxsplit != 0 && (hit = s.find(sep->s, from)) != std::string::npos; from = hit + sep->s.size()) {
            r.list->push_back(Value::string(s.substr(from, hit - from)));
            if (maxsplit > 0) --maxsplit;
          }
          r.list->push_back(Value::string(s.substr(from)));
          return r;
        });
      if (m == "upper" || m == "lower")
        return Value::function([s, m](Args&) {
          std::string r = s;
          for (char& c : r) c = m == "upper" ? char(std::toupper(static_cast<unsigned char>(c))) : char(std::tolower(static_cast<unsigned char>(c)));
          return Value::string(r);
        });
      if (m == "title" || m == "capitalize")
        return Value::function([this, s, m, line](Args& a) { return filter(m, Value::string(s), a, line); });
      if (m == "replace")
        return Value::function([this, s, line](Args& a) { return filter("replace", Value::string(s), a, line); });
      if (m == "find" || m == "count")
        return Value::function([s, m, where](Args& a) {
          const Value* x = a.get(0, "sub");
          if (!x || x->kind != Value::kString) throw_error(where, ": ", m, "() needs a string");
          if (m == "find") {
            const size_t p = s.find(x->s);
            return Value::integer(p == std::string::npos ? -1 : int64_t(chars_of(s.substr(0, p)).size()));
          }
          if (x->s.empty()) return Value::integer(int64_t(chars_of(s).size()) + 1);
          int64_t c = 0;
          for (size_t p = s.find(x->s); p != std::string::npos; p = s.find(x->s, p + x->s.size())) ++c;
          return Value::integer(c);
        });
      return Value::undefined(m);
    }
    if (self.kind == Value::kObject) {
      auto obj = self.obj;
      if (m == "get")
        return Value::function([obj](Args& a) {
          const Value* k = a.get(0, "key");
          if (k && k->kind == Value::kString)
            if (const Value* v = obj->find(k->s)) return *v;
          const Value* d = a.get(1, "default");
          return d ? *d : Value::none();
        });
      if (m == "items" || m == "keys" || m == "values")
        return Value::function([obj, m](Args&) {
          Value r = Value::make_list();
          for (const auto& [k, v] : obj->items) {
            if (m == "keys") r.list->push_back(Value::string(k));
            else if (m == "values") r.list->push_back(v);
            else {
              r.list->push_back(Value::make_list({Value::string(k), v}));
              r.list->back().tuple = true;
            }
          }
          return r;
        });
      return Value::undefined(m);
    }
    return Value::undefined(m);
  }

  // ---- tests ---------------------------------------------------------------------------------
  bool test(const std::string& t, const Value& v, const Args& a, int line) {
    auto arg = [&](size_t k) -> const Value& {
      if (k >= a.pos.size()) fail(line, "test '" + t + "' needs an argument");
      return a.pos[k];
    };
    if (t == "defined") return v.kind != Value::kUndefined;
    if (t == "undefined") return v.kind == Value::kUndefined;
    if (t == "none") return v.kind == Value::kNone;
    if (t == "string") return v.kind == Value::kString;
    if (t == "number") return v.kind == Value::kInt || v.kind == Value::kFloat;
    if (t == "integer") return v.kind == Value::kInt;
    if (t == "float") return v.kind == Value::kFloat;
    if (t == "boolean") return v.kind == Value::kBool;
    if (t == "true") return v.kind == Value::kBool && v.b;
    if (t == "false") return v.kind == Value::kBool && !v.b;
    if (t == "mapping") return v.kind == Value::kObject && !v.obj->is_namespace;
    if (t == "iterable") return v.kind == Value::kList || v.kind == Value::kString || (v.kind == Value::kObject && !v.obj->is_namespace);
    if (t == "sequence") return v.kind == Value::kList || v.kind == Value::kString || (v.kind == Value::kObject && !v.obj->is_namespace);
    if (t == "callable") return v.kind == Value::kFunction;
    if (t == "odd" || t == "even") {
      if (v.kind != Value::kInt) fail(line, "test '" + t + "' needs an integer");
      return ((v.i % 2) != 0) == (t == "odd");
    }
    if (t == "divisibleby") {
      const Value& d = arg(0);
      if (v.kind != Value::kInt || d.kind != Value::kInt || d.i == 0) fail(line, "test 'divisibleby' needs non-zero integers");
      return v.i % d.i == 0;
    }
    if (t == "eq" || t == "equalto" || t == "==") return equal(v, arg(0));
    if (t == "ne" || t == "!=") return !equal(v, arg(0));
    if (t == "in") return contains(arg(0), v, line);
    if (t == "sameas") return equal(v, arg(0)) && v.kind == arg(0).kind;
    if (t == "lower" && v.kind == Value::kString) return std::none_of(v.s.begin(), v.s.end(), [](char c) { return std::isupper(static_cast<unsigned char>(c)); });
    if (t == "upper" && v.kind == Value::kString) return std::none_of(v.s.begin(), v.s.end(), [](char c) { return std::islower(static_cast<unsigned char>(c)); });
    fail(line, "unsupported test 'is " + t + "'");
  }

  // ---- filters -------------------------------------------------------------------------------
  Value filter(const std::string& f, const Value& v, const Args& a, int line) {
    auto need_string = [&]() -> const std::string& {
      if (v.kind != Value::kString) fail(line, "filter '" + f + "' expects a string, got " + type_name(v));
      return v.s;
    };
    if (f == "trim") {
      if (v.kind == Value::kUndefined) return Value::string("");
      const std::string s = v.kind == Value::kString ? v.s : str(v);
      const Value* chars = a.get(0, "chars");
      const std::string cs = chars && chars->kind == Value::kString ? chars->s : std::string(" \t\n\r\f\v");
      size_t b = 0, e = s.size();
      while (b < e && cs.find(s[b]) != std::string::npos) ++b;
      while (e > b && cs.find(s[e - 1]) != std::string::npos) --e;
      return Value::string(s.substr(b, e - b));
    }
    if (f == "length" || f == "count") {
      switch (v.kind) {
        case Value::kString: return Value::integer(int64_t(chars_of(v.s).size()));
        case Value::kList: return Value::integer(int64_t(v.list->size()));
        case Value::kObject: return Value::integer(int64_t(v.obj->items.size()));
        case Value::kUndefined: return Value::integer(0);
        default: fail(line, std::string("object of type '") + type_name(v) + "' has no len()");
      }
    }
    if (f == "tojson") {
      const Value* ind = a.get(0, "indent");
      int indent = -1;
      if (ind && ind->kind == Value::kInt) {
        if (ind->i < 0 || ind->i > 64) fail(line, "tojson(indent=" + std::to_string(ind->i) + "): indent must be 0..64");
        indent = int(ind->i);
      }
      std::string o;
      to_json(v, o, indent, 0, name_ + ": line " + std::to_string(line));
      return Value::string(o);
    }
    if (f == "format") {
      if (!a.kw.empty()) fail(line, "filter 'format' with keyword arguments is not supported");
      return Value::string(printf_format(need_string(), a.pos, name_ + ": line " + std::to_string(line)));
    }
    if (f == "string") return Value::string(str(v));
    if (f == "safe") return v;
    if (f == "e" || f == "escape") {
      const std::string s = str(v);
      std::string o;
      for (char c : s) {
        switch (c) {
          case '&': o += "&amp;"; break;
          case '<': o += "&lt;"; break;
          case '>': o += "&gt;"; break;
          case '"': o += "&#34;"; break;
          case '\'': o += "&#39;"; break;
          default: o += c;
        }
      }
      return Value::string(o);
    }
    if (f == "lower" || f == "upper") {
      std::string r = str(v);
      for (char& c : r) c = f == "upper" ? char(std::toupper(static_cast<unsigned char>(c))) : char(std::tolower(static_cast<unsigned char>(c)));
      return Value::string(r);
    }
    if (f == "capitalize" || f == "title") {
      const std::string s = str(v);
      std::string r;
      bool start = true;
      for (size_t k = 0; k < s.size(); ++k) {
        const unsigned char c = static_cast<unsigned char>(s[k]);
        if (f == "capitalize") r += k == 0 ? char(std::toupper(c)) : char(std::tolower(c));
        else {
          r += start ? char(std::toupper(c)) : char(std::tolower(c));
          start = !std::isalnum(c);
        }
      }
      return Value::string(r);
    }
    if (f == "first" || f == "last") {
      const auto items = iterate(v, line);
      if (items.empty()) return Value::undefined(f);
      return f == "first" ? items.front() : items.back();
    }
    if (f == "join") {
      const Value* sep = a.get(0, "d");
      const Value* attr = a.get(1, "attribute");
      std::string o;
      bool first = true;
      for (const Value& x : iterate(v, line)) {
        if (!first) o += sep ? str(*sep) : "";
        first = false;
        o += str(attr ? get_attr(x, str(*attr), line) : x);
        if (o.size() > kMaxOutput) fail(line, "join(): a string longer than 64 MiB");
      }
      return Value::string(o);
    }
    if (f == "default" || f == "d") {
      const Value* def = a.get(0, "default_value");
      const Value* boolean = a.get(1, "boolean");
      const bool use = v.kind == Value::kUndefined || (boolean && truthy(*boolean) && !truthy(v));
      return use ? (def ? *def : Value::string("")) : v;
    }
    if (f == "list") return Value::make_list(iterate(v, line));
    if (f == "reverse") {
      if (v.kind == Value::kString) {
        auto cs = chars_of(v.s);
        std::string r;
        for (auto it = cs.rbegin(); it != cs.rend(); ++it) r += *it;
        return Value::string(r);
      }
      auto items = iterate(v, line);
      std::reverse(items.begin(), items.end());
      return Value::make_list(items);
    }
    if (f == "unique") {
      Value r = Value::make_list();
      for (const Value& x : iterate(v, line))
        if (std::none_of(r.list->begin(), r.list->end(), [&](const Value& y) { return equal(x, y); })) r.list->push_back(x);
      return r;
    }
    if (f == "items") {
      if (v.kind == Value::kUndefined) return Value::make_list();
      if (v.kind != Value::kObject) fail(line, "filter 'items' expects a mapping");
      Value m = method(v, "items", line);
      Args none;
      return (*m.fn)(none);
    }
    if (f == "int") {
      if (v.kind == Value::kInt) return v;
      if (v.kind == Value::kBool) return Value::integer(v.b);
      if (v.kind == Value::kFloat) return Value::integer(int64_t(v.f));
      if (v.kind == Value::kString) {
        char* end = nullptr;
        const long long x = std::strtoll(v.s.c_str(), &end, 10);
        if (end && *end == 0 && !v.s.empty()) return Value::integer(x);
        const double d = std::strtod(v.s.c_str(), &end);
        if (end && *end == 0 && !v.s.empty()) return Value::integer(int64_t(d));
      }
      const Value* def = a.get(0, "default");
      return def ? *def : Value::integer(0);
    }
    if (f == "float") {
      if (v.is_number()) return Value::number(v.as_double());
      if (v.kind == Value::kString) {
        char* end = nullptr;
        const double d = std::strtod(v.s.c_str(), &end);
        if (end && *end == 0 && !v.s.empty()) return Value::number(d);
      }
      const Value* def = a.get(0, "default");
      return def ? *def : Value::number(0.0);
    }
    if (f == "abs") {
      if (v.kind == Value::kInt) return Value::integer(v.i < 0 ? -v.i : v.i);
      if (v.kind == Value::kFloat) return Value::number(std::fabs(v.f));
      fail(line, "filter 'abs' expects a number");
    }
    if (f == "round") {
      if (!v.is_number()) fail(line, "filter 'round' expects a number");
      const Value* p = a.get(0, "precision");
      const Value* m = a.get(1, "method");
      const int prec = p && p->kind == Value::kInt ? int(p->i) : 0;
      const std::string meth = m && m->kind == Value::kString ? m->s : "common";
      const double scale = std::pow(10.0, prec);
      const double x = v.as_double() * scale;
      double r = meth == "ceil" ? std::ceil(x) : meth == "floor" ? std::floor(x) : std::round(x);
      return Value::number(r / scale);
    }
    if (f == "replace") {
      const std::string& s = need_string();
      const Value* from = a.get(0, "old");
      const Value* to = a.get(1, "new");
      if (!from || !to || from->kind != Value::kString || to->kind != Value::kString) fail(line, "replace() needs two strings");
      const Value* cnt = a.get(2, "count");
      int64_t left = cnt && cnt->kind == Value::kInt ? cnt->i : -1;
      if (from->s.empty()) fail(line, "replace() with an empty pattern is not supported");
      std::string o;
      size_t pos = 0;
      for (size_t hit; left != 0 && (hit = s.find(from->s, pos)) != std::string::npos; pos = hit + from->s.size()) {
        o.append(s, pos, hit - pos);
        o += to->s;
        if (o.size() > kMaxOutput) fail(line, "replace(): a string longer than 64 MiB");
        if (left > 0) --left;
      }
      o.append(s, pos);
      return Value::string(o);
    }
    if (f == "wordcount") {
      int64_t c = 0;
      bool in = false;
      for (char ch : str(v)) {
        const bool w = std::isalnum(static_cast<unsigned char>(ch)) || ch == '_';
        if (w && !in) ++c;
        in = w;
      }
      return Value::integer(c);
    }
    if (f == "center") {
      const std::string s = str(v);
      const Value* w = a.get(0, "width");
      const int64_t width = w && w->kind == Value::kInt ? w->i : 80;
      const int64_t n = int64_t(chars_of(s).size());
      if (width <= n) return Value::string(s);
      if (width > int64_t(kMaxOutput)) fail(line, "center(): width beyond 64 MiB");
      const int64_t pad = width - n, left = pad / 2 + (pad & width & 1);
      return Value::string(std::string(size_t(left), ' ') + s + std::string(size_t(pad - left), ' '));
    }
    if (f == "selectattr" || f == "rejectattr" || f == "select" || f == "reject" || f == "map") {
      const bool attr_mode = f == "selectattr" || f == "rejectattr";
      Value r = Value::make_list();
      if (f == "map") {
        const Value* attr = nullptr;
        for (const auto& [k, x] : a.kw)
          if (k == "attribute") attr = &x;
        if (attr) {
          const Value* def = nullptr;
          for (const auto& [k, x] : a.kw)
            if (k == "default") def = &x;
          for (const Value& x : iterate(v, line)) {
            Value y = get_item(x, *attr, line);
            r.list->push_back(y.kind == Value::kUndefined && def ? *def : y);
          }
          return r;
        }
        if (a.pos.empty()) fail(line, "map() needs a filter name or attribute=");
        Args rest;
        rest.pos.assign(a.pos.begin() + 1, a.pos.end());
        rest.kw = a.kw;
        for (const Value& x : iterate(v, line)) r.list->push_back(filter(str(a.pos[0]), x, rest, line));
        return r;
      }
      size_t k0 = 0;
      std::string attr;
      if (attr_mode) {
        if (a.pos.empty()) fail(line, f + "() needs an attribute name");
        attr = str(a.pos[0]);
        k0 = 1;
      }
      for (const Value& x : iterate(v, line)) {
        const Value item = attr_mode ? get_item(x, Value::string(attr), line) : x;
        bool ok;
        if (a.pos.size() > k0) {
          Args targs;
          targs.pos.assign(a.pos.begin() + std::ptrdiff_t(k0) + 1, a.pos.end());
          ok = test(str(a.pos[k0]), item, targs, line);
        } else {
          ok = truthy(item);
        }
        if (ok == (f == "selectattr" || f == "select")) r.list->push_back(x);
      }
      return r;
    }
    fail(line, "unsupported filter '" + f + "'");
  }
};

}  // namespace

std::string render_chat_template(const std::string& source_in, const ChatTemplateInputs& in, const std::string& name) {
  // jinja2 (keep_trailing_newline=False) drops one trailing newline of the template.
  std::string source = source_in;
  if (source.size() >= 2 && source.compare(source.size() - 2, 2, "\r\n") == 0) source.resize(source.size() - 2);
  else if (!source.empty() && source.back() == '\n') source.pop_back();
  std::vector<Node> nodes = Parser(Lexer(source, name).run(), name).parse_all();
  std::map<std::string, Value> g;
  if (in.extra.is_object())
    for (const auto& [k, v] : in.extra.items()) g[k] = from_json(v);
  g["messages"] = from_json(in.messages);
  g["add_generation_prompt"] = Value::boolean(in.add_generation_prompt);
  g["bos_token"] = Value::string(in.bos_token);
  g["eos_token"] = Value::string(in.eos_token);
  g["raise_exception"] = Value::function([name](Args& a) -> Value {
    throw_error(name, ": the template raised an error: ", a.pos.empty() ? std::string() : str(a.pos[0]));
  });
  g["namespace"] = Value::function([](Args& a) {
    Value ns = Value::make_object(true);
    for (const Value& p : a.pos)
      if (p.kind == Value::kObject)
        for (const auto& [k, v] : p.obj->items) ns.obj->set(k, v);
    for (const auto& [k, v] : a.kw) ns.obj->set(k, v);
    return ns;
  });
  g["dict"] = Value::function([](Args& a) {
    Value d = Value::make_object();
    for (const auto& [k, v] : a.kw) d.obj->set(k, v);
    return d;
  });
  g["range"] = Value::function([name](Args& a) {
    int64_t start = 0, stop = 0, step = 1;
    auto num = [&](size_t k) {
      if (a.pos[k].kind != Value::kInt) throw_error(name, ": range() takes integers");
      return a.pos[k].i;
    };
    if (a.pos.size() == 1) stop = num(0);
    else if (a.pos.size() >= 2) start = num(0), stop = num(1);
    if (a.pos.size() >= 3) step = num(2);
    if (step == 0) throw_error(name, ": range() step must not be zero");
    Value r = Value::make_list();
    for (int64_t k = start; step > 0 ? k < stop : k > stop; k += step) {
      r.list->push_back(Value::integer(k));
      if (r.list->size() > 1000000) throw_error(name, ": range() too long");
    }
    return r;
  });
  return Renderer(name).render(nodes, std::move(g));
}

}  // namespace lowbit

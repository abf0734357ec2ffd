// Chat templates: the Jinja2 subset that Hugging Face chat templates use, rendered exactly as
// transformers' apply_chat_template renders them with Python's jinja2 (an environment with
// trim_blocks and lstrip_blocks, a raise_exception() global, and a tojson filter that calls
// json.dumps(x, ensure_ascii=False)).
//
// Supported (anything else is a lowbit::Error naming the construct and its line, never a
// silently different prompt):
//   statements   for/else/endfor (one or several targets, loop.index, index0, revindex,
//                revindex0, first, last, length, previtem, nextitem), if/elif/else/endif,
//                set (name, name.attr with namespace(), several names from a sequence,
//                {% set x %}...{% endset %}), raw, comments, whitespace control {%- -%} {{- -}}
//   expressions  literals (strings, ints, floats, true/false/none, lists, dicts, tuples),
//                a.b, a[b], slices a[i:j:k], calls, + - * / // % ** ~, comparisons,
//                in / not in, and / or / not, x if c else y, tests (is [not] defined,
//                undefined, none, string, number, integer, float, boolean, mapping,
//                iterable, sequence, true, false, even, odd, divisibleby, eq, ne, in)
//   filters      trim, length/count, tojson(indent=), string, lower, upper, title,
//                capitalize, first, last, join, default/d, list, int, float, abs, replace,
//                reverse, items, unique, round, safe, e/escape, wordcount, center,
//                selectattr/rejectattr/map (attribute=) with the tests above
//   methods      str: strip lstrip rstrip startswith endswith split upper lower title
//                capitalize replace find count; dict: get items keys values
//   globals      range, namespace, raise_exception, dict
#pragma once
#include <nlohmann/json.hpp>
#include <string>

namespace lowbit {

struct ChatTemplateInputs {
  nlohmann::ordered_json messages = nlohmann::ordered_json::array();  // [{"role":..., "content":...}, ...]
  bool add_generation_prompt = false;
  std::string bos_token, eos_token;
  // Further variables (e.g. "tools": null, as transformers passes it); object keys become names.
  nlohmann::ordered_json extra = nlohmann::ordered_json::object();
};

// Renders `source` (a chat template) with the inputs. `name` (a file or "tokenizer.chat_template")
// prefixes errors, which name the line of the template.
std::string render_chat_template(const std::string& source, const ChatTemplateInputs& inputs,
                                 const std::string& name = "chat template");

}  // namespace lowbit

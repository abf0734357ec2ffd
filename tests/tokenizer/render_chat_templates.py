#!/usr/bin/env python3
"""Renders every tests/tokenizer/chat_templates/*.jinja with every case of cases.json, with
add_generation_prompt false and true, the way transformers' apply_chat_template does (jinja2
ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, raise_exception, HF's tojson), and prints
one JSON list: {"template", "case", "add_generation_prompt", "out" | "error"}.

The C++ test (test_chat_template.cpp) compares lowbit's interpreter with this. Exit status 3 when
jinja2 is missing (the test then skips).
"""
import json
import os
import sys

try:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment
except ImportError:
    sys.exit(3)


class TemplateError(Exception):
    pass


def raise_exception(message):
    raise TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def main():
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat_templates")
    # transformers enables jinja2.ext.loopcontrols ({% break %} / {% continue %}).
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    cases = json.load(open(os.path.join(here, "cases.json"), encoding="utf-8"))
    out = []
    for name in sorted(os.listdir(here)):
        if not name.endswith(".jinja"):
            continue
        src = open(os.path.join(here, name), encoding="utf-8").read()
        tmpl = env.from_string(src)
        for case in cases:
            for agp in (False, True):
                row = {"template": name, "case": case["name"], "add_generation_prompt": agp}
                try:
                    row["out"] = tmpl.render(messages=case["messages"], tools=case.get("tools"), documents=None,
                                             add_generation_prompt=agp, bos_token="<s>", eos_token="</s>")
                except TemplateError as e:
                    row["error"] = str(e)
                out.append(row)
    json.dump(out, sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()

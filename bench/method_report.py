#!/usr/bin/env python3
"""Tables from bench/method_runs.sh results (results.jsonl): mean ± sd over calibration seeds, the
SAPR paper's metric, and hyper-parameters chosen on the validation text only.

  bench/method_report.py OUT/results.jsonl [--zero-shot arc_easy,arc_challenge,piqa,winogrande,hellaswag_small]

Job names are CONFIG-sSEED (or CONFIG alone for single runs); CONFIG ends in the format
(e.g. sapr-l30-int2g64). For each config: test perplexity, validation perplexity, zero-shot
average accuracy (the tasks given that were run), bits per weight, quantize seconds.

The paper's metric (arXiv 2504.13932; its README: "reduction of ApiQ's accuracy loss"): for a
config X with the ApiQ baseline A of the same format and LoRA rank, per seed,
  perplexity:  (ppl_A - ppl_X) / (ppl_A - ppl_FP)      accuracy: (acc_X - acc_A) / (acc_FP - acc_A)
positive = X removes that fraction of ApiQ's degradation; reported as mean ± sd over the seeds that
both ran. Selection: among the SAPR configs of a format (same rank), the one with the lowest mean
validation perplexity; its test numbers are the "chosen" row (the test text plays no part in it).
"""
import argparse
import json
import math
import re
import statistics as st
from collections import defaultdict


def mean_sd(v):
    v = [x for x in v if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return None, None, 0
    return st.mean(v), (st.stdev(v) if len(v) > 1 else 0.0), len(v)


def fmt_ms(v, digits=3, pct=False):
    m, s, n = mean_sd(v)
    if m is None:
        return "—"
    if pct:
        return f"{100 * m:+.1f} % ± {100 * s:.1f}" if n > 1 else f"{100 * m:+.1f} %"
    if abs(m) >= 1000:
        return f"{m:,.0f} ± {s:,.0f}" if n > 1 else f"{m:,.0f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if n > 1 else f"{m:.{digits}f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results")
    ap.add_argument("--zero-shot", default="arc_easy,arc_challenge,piqa,winogrande,hellaswag_small")
    a = ap.parse_args()
    zs = a.zero_shot.split(",")
    runs = defaultdict(dict)  # config -> seed -> row
    errors = []
    for line in open(a.results):
        j = json.loads(line)
        if "error" in j:
            errors.append(j)
            continue
        m = re.match(r"^(.*)-s(\d+)$", j["name"])
        cfg, seed = (m.group(1), int(m.group(2))) if m else (j["name"], j.get("seed", 0))
        row = {"ppl": (j.get("ppl") or {}).get("ppl"), "valid": (j.get("valid") or {}).get("ppl"),
               "bits": j.get("bits_per_weight"), "secs": j.get("quantize_seconds"), "method": j["method"],
               "format": j["format"], "extra": j.get("extra", "")}
        tasks = {r["task"]: r for r in ((j.get("tasks") or {}).get("results") or [])}
        used = [t for t in zs if t in tasks and tasks[t].get("rows", 0) >= 10]
        row["zs"] = st.mean(tasks[t]["acc"] for t in used) if used else None
        row["zs_tasks"] = used
        runs[cfg][seed] = row
    fp = runs.get("fp", {}).get(0)
    print("| config | method | format | bits/weight | seeds | test ppl | validation ppl | zero-shot avg acc | quantize s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for cfg, seeds in runs.items():
        r0 = next(iter(seeds.values()))
        v = list(seeds.values())
        zsv = [x["zs"] * 100 if x["zs"] is not None else None for x in v]
        print(f"| {cfg} | {r0['method']} {r0['extra']} | {r0['format']} | {fmt_ms([x['bits'] for x in v], 2)} | {len(v)} | "
              f"{fmt_ms([x['ppl'] for x in v])} | {fmt_ms([x['valid'] for x in v])} | {fmt_ms(zsv, 1)} | "
              f"{fmt_ms([x['secs'] for x in v], 0)} |")
    if fp:
        print("\nReduction of ApiQ's degradation (the paper's metric; + = closer to FP), paired by seed:\n")
        print("| config | baseline | perplexity | zero-shot avg |\n|---|---|---:|---:|")
        for cfg, seeds in runs.items():
            if not cfg.startswith("sapr"):
                continue
            m = re.match(r"^sapr(.*?)(-r\d+)?-([a-z0-9_]+)$", cfg)
            base = f"apiq{m.group(2) or ''}-{m.group(3)}" if m else None
            if base not in runs:
                continue
            red_p, red_a = [], []
            for s, x in seeds.items():
                b = runs[base].get(s)
                if not b or x["ppl"] is None or b["ppl"] is None:
                    continue
                d = b["ppl"] - fp["ppl"]
                red_p.append((b["ppl"] - x["ppl"]) / d if d else None)
                if x["zs"] is not None and b["zs"] is not None and fp["zs"] is not None and fp["zs"] != b["zs"]:
                    red_a.append((x["zs"] - b["zs"]) / (fp["zs"] - b["zs"]))
            print(f"| {cfg} | {base} | {fmt_ms(red_p, pct=True)} | {fmt_ms(red_a, pct=True)} |")
        print("\nChosen on the validation text (lowest mean validation perplexity among the SAPR configs of a "
              "format and rank, over the seeds every one of them ran):\n")
        print("| format/rank | chosen | seeds compared | validation ppl | test ppl | ApiQ test ppl |\n|---|---|---|---:|---:|---:|")
        groups = defaultdict(list)
        for cfg, seeds in runs.items():
            m = re.match(r"^sapr(.*?)(-r\d+)?-([a-z0-9_]+)$", cfg)
            if m:
                groups[(m.group(3), m.group(2) or "")].append(cfg)
        for (fmt, rk), cfgs in sorted(groups.items()):
            # Configs run with different seed sets are compared on the seeds they share (a config of
            # one seed against the mean of three would mix the seed spread into the choice).
            common = set.intersection(*(set(runs[c]) for c in cfgs))
            def val(c):
                v = [x["valid"] for sd, x in runs[c].items() if not common or sd in common]
                return mean_sd(v)[0] or float("inf")
            best = min(cfgs, key=val)
            base = runs.get(f"apiq{rk}-{fmt}", {})
            seeds_txt = ",".join(str(x) for x in sorted(common)) if common else "all (none shared)"
            print(f"| {fmt}{rk} | {best} | {seeds_txt} | {fmt_ms([x['valid'] for x in runs[best].values()])} | "
                  f"{fmt_ms([x['ppl'] for x in runs[best].values()])} | {fmt_ms([x['ppl'] for x in base.values()])} |")
    if errors:
        print("\nFailed jobs:", ", ".join(f"{e['name']} ({e['error']})" for e in errors))


if __name__ == "__main__":
    main()

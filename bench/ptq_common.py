"""Shared helpers of the perplexity-table scripts (bench/ptq_table.py: stories260K,
bench/ptq_table_trained.py: the stories15M-shaped model from `lowbit train`).

Only the Python standard library; every number comes from the `lowbit` CLI (quantize, eval ppl).
"""
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASELINE_FORMATS = ["int4g128", "int4g64", "int3g128", "int3g64", "int2g128", "int2g64"]
APIQ_FORMATS = ["int2g64", "int3g128"]
ROW_NAMES = [("rtn", "RTN"), ("gptq", "GPTQ"), ("awq", "AWQ"), ("apiq-r0", "ApiQ-bw, rank 0 (clipping only)"),
             ("apiq-layer", "ApiQ-lw"), ("apiq", "ApiQ-bw"), ("sapr", "SAPR (ApiQ-bw + saliency)")]


def run(cmd, env):
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.stderr.write(" ".join(cmd) + "\n" + r.stdout + r.stderr)
        raise SystemExit(f"command failed ({r.returncode}): {cmd[1]} {cmd[2]}")
    return r.stdout


def single_thread_env():
    return dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")


def add_common_args(ap, epochs, rank, rank_help):
    ap.add_argument("--lowbit", default=os.environ.get("LOWBIT", os.path.join(ROOT, "build", "lowbit")))
    ap.add_argument("--shared", default=os.environ.get("LOWBIT_SHARED", os.path.join(os.path.dirname(ROOT), "shared")))
    ap.add_argument("--jobs", type=int, default=2, help="quantization runs in parallel (each single-threaded)")
    ap.add_argument("--epochs", type=int, default=epochs, help="ApiQ/SAPR epochs per block (paper: 20)")
    ap.add_argument("--rank", type=int, default=rank, help=rank_help)
    ap.add_argument("--lam", type=float, default=3.0, help="SAPR lambda")
    ap.add_argument("--workdir", default=None,
                    help="keep outputs here (default: a temporary directory); a rerun with the same workdir and "
                         "the same settings reuses the finished runs")


class Bench:
    """Quantizes one model with many (method, format) settings and evaluates every result.

    evalsets: list of (name, eval-ppl arguments selecting the data, e.g. ["--tokens", F, "--ctx", "256"]).
    calib: quantize arguments selecting the calibration data (--calib-tokens F --nsamples N --seqlen L).
    Each result is {"ppl": {evalset name: ppl}, "bpw": bits per weight, "seconds": quantization wall time}.
    """

    def __init__(self, lowbit, model, work, evalsets, calib, env=None, calib_ready=None):
        self.lowbit, self.model, self.work, self.evalsets, self.calib = lowbit, model, work, evalsets, calib
        self.env = env or single_thread_env()
        self.calib_ready = calib_ready  # threading.Event set once the calibration file exists (None: exists now)
        self.lock = threading.Lock()
        self.t0 = time.time()

    def log(self, msg):
        with self.lock:
            sys.stderr.write(f"[{(time.time() - self.t0) / 60:5.1f} min] {msg}\n")
            sys.stderr.flush()

    def ppl(self, path):
        out = {}
        for name, args in self.evalsets:
            out[name] = json.loads(run([self.lowbit, "eval", "ppl", "-m", path, *args, "--json"], self.env))["ppl"]
        return out

    def fp(self):
        p = self.ppl(self.model)
        self.log("FP ppl " + "  ".join(f"{k} {v:.3f}" for k, v in p.items()))
        return p

    def quantize(self, method, fmt, extra=(), tag="", calib=None):
        """calib overrides self.calib for this run ([] = no calibration data, e.g. RTN)."""
        out = os.path.join(self.work, f"{method}{tag}-{fmt}")
        cmd = [self.lowbit, "quantize", "-m", self.model, "--method", method, "--format", fmt,
               *(self.calib if calib is None else calib), "-o", out, "--json", *extra]
        key = {"cmd": cmd, "evalsets": self.evalsets}
        done = os.path.join(out, "ptq_result.json")
        if os.path.exists(done):
            saved = json.load(open(done))
            if saved.get("key") == key:
                self.log(f"{method + tag:11s} {fmt:9s} reused from {done}")
                return saved["result"]
        if self.calib_ready is not None and (calib is None or calib):
            self.calib_ready.wait()
        t0 = time.time()
        run(cmd, self.env)
        secs = time.time() - t0
        rep = json.load(open(os.path.join(out, "quantize_report.json")))
        p = self.ppl(out)
        self.log(f"{method + tag:11s} {fmt:9s} " + "  ".join(f"ppl[{k}] {v:9.3f}" for k, v in p.items()) +
                 f"  bpw {rep['bits_per_weight']:.3f}  quantize {secs:6.1f}s")
        res = {"ppl": p, "bpw": rep["bits_per_weight"], "seconds": secs}
        json.dump({"key": key, "result": res}, open(done, "w"))
        return res

    def run_all(self, jobs, n_workers):
        """jobs: list of (result key, [quantize kwargs, ...]); a job's runs go one after another (SAPR's second
        run reuses the saliency file the first one wrote), jobs run n_workers at a time, in the given order."""
        results = {}

        def chain(steps):  # a step is quantize's keyword arguments, or a function (e.g. the FP evaluation)
            return [s() if callable(s) else self.quantize(**s) for s in steps]

        with cf.ThreadPoolExecutor(max_workers=max(1, n_workers)) as ex:
            futs = {ex.submit(chain, steps): keys for keys, steps in jobs}
            for fu in cf.as_completed(futs):
                for k, r in zip(futs[fu], fu.result()):
                    results[k] = r
        return results


def table_columns(results):
    return sorted({f for _, f in results}, key=lambda f: (-int(f[3]), -int(f[5:])))


def print_ppl_table(results, fp, evalset, fp_label="FP (f32)"):
    cols = table_columns(results)
    print("| method | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    print(f"| {fp_label} | " + " | ".join(f"{fp[evalset]:.3f}" for _ in cols) + " |")
    for key, label in ROW_NAMES:
        cells = []
        for c in cols:
            r = results.get((key, c))
            cells.append(f"{r['ppl'][evalset]:.3f} ({r['bpw']:.2f})" if r else "—")
        if any(c != "—" for c in cells):
            print(f"| {label} | " + " | ".join(cells) + " |")
    print()


def print_sapr_metric(results, fp, evalsets, formats=APIQ_FORMATS):
    print("Reduction of ApiQ's degradation by SAPR (the paper's metric; positive = SAPR closer to FP):\n")
    multi = len(evalsets) > 1
    print("| format |" + (" eval set |" if multi else "") + " ppl ApiQ-bw − FP | ppl SAPR − FP | reduction |")
    print("|---|" + ("---|" if multi else "") + "---|---|---|")
    for f in formats:
        for e in evalsets:
            if ("apiq", f) not in results or ("sapr", f) not in results:
                continue
            da = results[("apiq", f)]["ppl"][e] - fp[e]
            ds = results[("sapr", f)]["ppl"][e] - fp[e]
            print(f"| {f} |" + (f" {e} |" if multi else "") + f" {da:.3f} | {ds:.3f} | {100 * (da - ds) / da:+.2f} % |")
    print()


def print_times(results, jobs, prefixes=("apiq", "sapr")):
    print(f"Time per quantization run (s, single-threaded, {jobs} runs in parallel): " +
          ", ".join(f"{k[0]} {k[1]} {v['seconds']:.0f}" for k, v in sorted(results.items()) if k[0].startswith(prefixes)))


#!/usr/bin/env python3
"""Load generator for OpenAI-compatible servers (lowbit serve, llama.cpp's llama-server): for each
client count N, N concurrent clients each send --requests streaming /v1/completions requests
(greedy, --max-tokens tokens, ignore_eos so every answer has the same length) and the script reports

  throughput   completion tokens of all clients / wall time of the round (tokens/s)
  TTFT         time to first token: request sent -> first non-empty text chunk (mean, p50, p90)
  ITL          inter-token latency: time between successive text chunks of one answer, pooled
               over all answers of the round (mean, p50, p90, max); a long prompt read while
               others decode shows up here as a stall
  per client   tokens/s of one request after its first token (median)

--long-clients K makes the first K clients send a long prompt (--long-words words of running
text) instead of the short ones, to see what a long prefill does to the others' latencies.

Same script for both servers; only the URL differs. Standard library only.

  python3 bench/serve_clients.py --url http://127.0.0.1:8080 --clients 1,4,8,16 --label lowbit
"""
import argparse
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse

PROMPTS = [
    "Once upon a time, in a small village by the sea,",
    "The history of the printing press begins",
    "Here is a recipe for a simple tomato soup:",
    "The three most important ideas in physics are",
    "Dear diary, today I learned that",
    "In the year 2050, cities will",
    "The quick brown fox",
    "A good way to learn a new language is",
]


def one_request(url, prompt, max_tokens, timeout):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "ignore_eos": True, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    first, chunks, usage, last, gaps = None, 0, None, None, []
    buf = b""
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            break
        j = json.loads(data)
        if j.get("usage"):
            usage = j["usage"]
        for c in j.get("choices", []):
            if c.get("text"):
                chunks += 1
                t = time.perf_counter()
                if first is None:
                    first = t
                else:
                    gaps.append(t - last)
                last = t
    t1 = time.perf_counter()
    conn.close()
    tokens = usage["completion_tokens"] if usage else chunks
    return {"ttft": (first or t1) - t0, "total": t1 - t0, "tokens": tokens, "gaps": gaps,
            "decode_tps": (tokens - 1) / (t1 - first) if first and t1 > first and tokens > 1 else 0.0}


def pct(sorted_values, p):
    """p-th percentile (nearest rank below) of a sorted list; None when empty."""
    return sorted_values[int(p / 100 * (len(sorted_values) - 1))] if sorted_values else None


def long_prompt(words):
    text = ("The village by the sea had a small harbour, a bakery, a school and a church, and every "
            "morning the fishermen went out before the sun rose while the children walked to school. ").split()
    return " ".join(text[i % len(text)] for i in range(words))


def round_of(url, n_clients, requests, max_tokens, timeout, long_clients=0, long_words=400):
    results, errors = [], []
    lock = threading.Lock()

    def client(i):
        for r in range(requests):
            try:
                long = i < long_clients
                prompt = long_prompt(long_words) if long else PROMPTS[(i + r) % len(PROMPTS)]
                res = one_request(url, prompt, max_tokens, timeout)
                res["long"] = long
                with lock:
                    results.append(res)
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append(str(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        print(f"  {len(errors)} errors, first: {errors[0]}", file=sys.stderr)
    short = [r for r in results if not r["long"]]  # latencies of the short-prompt clients
    ttfts = sorted(r["ttft"] for r in short)
    gaps = sorted(g for r in short for g in r["gaps"])
    tokens = sum(r["tokens"] for r in results)
    out = {"clients": n_clients, "long_clients": long_clients, "requests": len(results), "errors": len(errors),
           "tokens": tokens, "wall_s": wall, "throughput_tps": tokens / wall if wall > 0 else 0,
           "ttft_mean_s": statistics.fmean(ttfts) if ttfts else None,
           "ttft_median_s": pct(ttfts, 50), "ttft_p90_s": pct(ttfts, 90),
           "itl_mean_ms": 1e3 * statistics.fmean(gaps) if gaps else None,
           "itl_p50_ms": 1e3 * pct(gaps, 50) if gaps else None, "itl_p90_ms": 1e3 * pct(gaps, 90) if gaps else None,
           "itl_max_ms": 1e3 * gaps[-1] if gaps else None,
           "client_tps_median": statistics.median(r["decode_tps"] for r in short) if short else None}
    if long_clients:
        lt = sorted(r["ttft"] for r in results if r["long"])
        out["long_ttft_mean_s"] = statistics.fmean(lt) if lt else None
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--requests", type=int, default=2, help="requests per client per round")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--label", default="server")
    ap.add_argument("--warmup", type=int, default=1, help="requests sent alone before measuring")
    ap.add_argument("--long-clients", type=int, default=0, help="clients (of each round) that send a long prompt")
    ap.add_argument("--long-words", type=int, default=400, help="words of the long prompt")
    a = ap.parse_args()
    for _ in range(a.warmup):
        one_request(a.url, PROMPTS[0], 8, a.timeout)
    rows = []
    for n in [int(x) for x in a.clients.split(",")]:
        r = round_of(a.url, n, a.requests, a.max_tokens, a.timeout, min(a.long_clients, n), a.long_words)
        r["label"] = a.label
        rows.append(r)
        print(json.dumps(r), flush=True)
    base = rows[0]["throughput_tps"] if rows else 0

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    print(f"\n| {a.label} | clients | throughput tok/s | x 1st row | TTFT mean / p50 / p90 s | ITL mean / p50 / p90 / max ms "
          f"| tok/s per client |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {a.label} | {r['clients']} | {r['throughput_tps']:.1f} | {r['throughput_tps'] / base:.2f} | "
              f"{f(r['ttft_mean_s'], '.3f')} / {f(r['ttft_median_s'], '.3f')} / {f(r['ttft_p90_s'], '.3f')} | "
              f"{f(r['itl_mean_ms'], '.1f')} / {f(r['itl_p50_ms'], '.1f')} / {f(r['itl_p90_ms'], '.1f')} / "
              f"{f(r['itl_max_ms'], '.0f')} | {f(r['client_tps_median'], '.1f')} |")


if __name__ == "__main__":
    main()

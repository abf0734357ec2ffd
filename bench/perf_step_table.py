#!/usr/bin/env python3
"""Where a decode step's CPU time goes, from a perf profile of `lowbit bench -b N`.

    perf record -F 1999 -D 1500 -o step.data -- lowbit -q bench -m MODEL.gguf -p 0 -n 64 -d 10 -r 8 \\
        --threads 1 -b 8 --json                      # note tg_cpu_ms_per_step
    perf script -i step.data -F tid,ip,sym | bench/perf_step_table.py MS_PER_STEP [TID]

Prints, per component (the packed kernels by format and phase, attention, activation
quantization, norms, the thread pool, allocation), its share of the samples and that share times
MS_PER_STEP (the bench's CPU ms per step: all threads, or one thread's with TID). -D skips model
loading. At one activation row the products are inlined into panel_kernel, so the "weight
decode" rows then hold the whole kernel. With the panel layout (LOWBIT_PANEL_LAYOUT, the default) the
ggml linears run panel_rows_direct: decode and products in one row each.
"""
import collections
import re
import sys

CATEGORIES = [
    # the panel layout (LOWBIT_PANEL_LAYOUT, default on): 16-row products read the ggml blocks directly
    ("q4_1 linears: panel layout, decode + products (panel_rows_direct)", r"panel_rows_direct<.*PanelFmt\)1,"),
    ("q8_0 tied head: panel layout, decode + products (panel_rows_direct)", r"panel_rows_direct<.*PanelFmt\)2,"),
    ("q4_1 linears: weight decode (panel_kernel)", r"panel_kernel<.*PanelFmt\)1>"),
    ("q4_1 linears: int8 products (panel_rows)", r"panel_rows<.*PanelFmt\)1,"),
    ("q8_0 tied head 49152x576: weight decode", r"panel_kernel<.*PanelFmt\)2>"),
    ("q8_0 tied head: int8 products", r"panel_rows<.*PanelFmt\)2,"),
    ("activation quantization + panel copy", r"quantize"),
    ("other packed kernels", r"qmm::"),
    ("attention: f16 KV cache widening", r"f16_rows_to_f32|f16_to_f32_avx512"),
    # the fused one-row attention over an f16 cache (kv_decode_attention_f16, LOWBIT_KV_DIRECT)
    ("attention: fused f16 decode rows (scores, weighted values)", r"f16_scores|f16_score<|f16_weighted|decode_heads_f16"),
    ("attention: sgemm, softmax, RoPE, KV store",
     r"sgemm|exp_shift_sum|softmax|rope|kv_store|f32_to_f16|kv_attention|gemm|vec::.*max|vec::.*scale"),
    ("RMSNorm, SwiGLU, residual adds", r"rmsnorm|swiglu|binary|add"),
    ("thread pool: waiting, hand-offs", r"run_on_pool|Pool::Pool|sched_yield|schedule|syscall|parallel_for_impl|parallel_each"),
    ("allocation, tensor bookkeeping",
     r"malloc|free|_int_|unlink_chunk|Tensor|check_tensor|expect|memmove|memset|memcpy|page_fault|Sp_counted|operator new|operator delete|clear_page"),
]


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    total = float(sys.argv[1])
    want = sys.argv[2] if len(sys.argv) > 2 else None
    counts: collections.Counter = collections.Counter()
    n = 0
    for line in sys.stdin:
        parts = line.split(None, 2)  # tid, ip, symbol
        if len(parts) < 3 or (want and parts[0] != want):
            continue
        n += 1
        for name, rx in CATEGORIES:
            if re.search(rx, parts[2]):
                counts[name] += 1
                break
        else:
            counts["other"] += 1
    if n == 0:
        print("no samples (perf script -F tid,ip,sym expected on stdin)", file=sys.stderr)
        return 1
    print("| component | CPU ms per step | share |\n|---|---:|---:|")
    for name, _ in CATEGORIES + [("other", "")]:
        print(f"| {name} | {total * counts[name] / n:.2f} | {100.0 * counts[name] / n:.1f} % |")
    print(f"| **total** ({n} samples) | {total:.2f} | 100 % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
# Paired per-window comparison of two llama-perplexity --kl-divergence logs on the same windows
# (bench/ggml_imatrix_smollm2.sh writes them as FILE.TEXT.nN.kld.log). llama-perplexity prints
# running means after each window; every window has the same number of scored tokens, so window k's
# own value is k m_k - (k - 1) m_{k-1}. Prints, for ln(PPL(Q)/PPL(base)) and KLD, the mean of
# A - B over the windows, its standard error (windows as samples) and in how many windows A is worse.
#   bench/ggml_paired_windows.py A.kld.log B.kld.log
import statistics as st, sys

def windows(path, col):
    m, inside = [], False
    for line in open(path):
        if line.startswith('chunk'):
            inside = True
            continue
        if inside:
            p = line.split()
            if not p or not p[0].isdigit():
                break
            m.append(float(p[col]))  # chunk, PPL, ±, err, ln-ratio, ±, err, KLD, ...
    return [(k + 1) * m[k] - k * m[k - 1] if k else m[0] for k in range(len(m))]

a, b = sys.argv[1], sys.argv[2]
for col, name in ((4, 'ln(PPL(Q)/PPL(base))'), (7, 'KLD')):
    d = [x - y for x, y in zip(windows(a, col), windows(b, col))]
    print(f'{name}: A - B = {st.mean(d):+.4f} +- {st.stdev(d) / len(d) ** 0.5:.4f} (windows: {len(d)}, A worse in {sum(x > 0 for x in d)})')

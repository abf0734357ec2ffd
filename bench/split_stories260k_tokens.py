#!/usr/bin/env python3
"""Splits stories260K's sample-tokens.i32 (64 sequences of 257 ids) into the calibration (24),
validation (8) and test (32) token files that the stories260K studies share.
Usage: split_stories260k_tokens.py SAMPLE_TOKENS OUT_DIR  (writes OUT_DIR/{calib,valid,test}.i32)"""
import array
import sys

a = array.array("i")
a.frombytes(open(sys.argv[1], "rb").read())
assert len(a) == 64 * 257, "sample-tokens.i32: expected 64 x 257 ids"
for name, lo, hi in (("calib", 0, 24), ("valid", 24, 32), ("test", 32, 64)):
    open(f"{sys.argv[2]}/{name}.i32", "wb").write(a[lo * 257:hi * 257].tobytes())

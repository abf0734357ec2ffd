#!/usr/bin/env python3
"""Recomputes the oracle for the SmolLM2 whole-file tokenization test (tests/io/test_vocab_tokenizer.cpp):
the ids Python `tokenizers` gives for the whole of data/wikitext-2-raw/wiki.test.raw with
models/smollm2-135m-instruct/tokenizer-llamacpp-smollm.json (no special tokens), as a count and an
FNV-1a 64 hash over the ids as little-endian int32 bytes.

Usage: python3 tests/tokenizer/smollm_wikitext_hash.py [SHARED_DIR]   (default: ../shared)
"""
import os
import struct
import sys

from tokenizers import Tokenizer


def fnv1a64(data: bytes) -> int:
    h = 0xcbf29ce484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    shared = sys.argv[1] if len(sys.argv) > 1 else os.environ.get(
        "LOWBIT_SHARED", os.path.join(here, "..", "..", "..", "shared"))
    tok = Tokenizer.from_file(os.path.join(shared, "models/smollm2-135m-instruct/tokenizer-llamacpp-smollm.json"))
    with open(os.path.join(shared, "data/wikitext-2-raw/wiki.test.raw"), "rb") as f:
        text = f.read().decode("utf-8")  # bytes as they are (no newline translation)
    ids = tok.encode(text, add_special_tokens=False).ids
    data = struct.pack("<%di" % len(ids), *ids)
    print("tokens %d fnv1a64 %016x" % (len(ids), fnv1a64(data)))


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# The main job on the default model: builds lowbit, then evaluates and runs stories260K
# (../shared/models/stories260K) — perplexity on held-out sampled tokens and greedy generation.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)" --target lowbit_cli
shared=${LOWBIT_SHARED:-../shared}
m=$shared/models/stories260K
./build/lowbit eval ppl --model "$m/stories260K.bin" --tokens "$m/sample-tokens.i32" --ctx 257
./build/lowbit generate --model "$m/stories260K.bin" --tokenizer "$m/tok512.bin" --temperature 0 --steps 200

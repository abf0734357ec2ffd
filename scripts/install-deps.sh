#!/usr/bin/env bash
# Installs the Debian packages lowbit builds against. Idempotent; needs root (or sudo).
set -euo pipefail
pkgs=(build-essential cmake ninja-build ccache pkg-config
      libopenblas-dev nlohmann-json3-dev libcli11-dev libsentencepiece-dev
      libgtest-dev libgmock-dev libbenchmark-dev libcpp-httplib-dev curl)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
# Python oracles of the tests (gguf-py's quantizers and dequantizers, chat templates against jinja2,
# RoPE llama3 scaling against numpy, GGUF llama vocabularies against sentencepiece, the GPTQ/AWQ
# export unpacker with safetensors, tokenizer.json files against tokenizers; the openai client drives
# lowbit serve in tests/serve; those tests skip when a module is missing).
python3 -m pip install --quiet gguf numpy jinja2 sentencepiece safetensors tokenizers openai

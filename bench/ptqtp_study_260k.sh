#!/usr/bin/env bash
# PTQTP (tp2g128) next to RTN int4g128 / int3g128 / int2g64 / ternary and GPTQ on stories260K.
#   bench/ptqtp_study_260k.sh [OUT_DIR] [PARALLEL]      (default /tmp/ptqtp-260k, 1)
# Data split and settings: bench/study_260k.sh; results: docs/results/ptqtp.md.
here=$(cd "$(dirname "$0")" && pwd)
exec "$here/study_260k.sh" "$here/plans/ptqtp-stories260k.txt" "${1:-/tmp/ptqtp-260k}" "${2:-1}"

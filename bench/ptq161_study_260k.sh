#!/usr/bin/env bash
# PTQ1.61 (ptq161) next to RTN int2g64 / ternary / tp2g128, PTQTP and plain binarization on stories260K.
#   bench/ptq161_study_260k.sh [OUT_DIR] [PARALLEL]      (default /tmp/ptq161-260k, 1)
# Data split and settings: bench/study_260k.sh; results: docs/results/ptq161.md.
here=$(cd "$(dirname "$0")" && pwd)
exec "$here/study_260k.sh" "$here/plans/ptq161-stories260k.txt" "${1:-/tmp/ptq161-260k}" "${2:-1}"

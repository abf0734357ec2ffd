#!/usr/bin/env bash
# The issue 17 methods (norm-tweak, rsq, comq, cle, adaround, adaquant) next to FP/RTN/GPTQ/AWQ on stories260K.
#   bench/ptq17_study_260k.sh [OUT_DIR] [PARALLEL]      (default /tmp/ptq17-260k, 2)
# Data split and settings: bench/study_260k.sh; results: docs/results/ptq17-stories260k.md.
here=$(cd "$(dirname "$0")" && pwd)
exec "$here/study_260k.sh" "$here/plans/ptq17-stories260k.txt" "${1:-/tmp/ptq17-260k}" "${2:-2}"

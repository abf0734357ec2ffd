#!/usr/bin/env bash
# guided (GuidedQuant) next to FP/GPTQ/RSQ on stories260K, 3 calibration seeds.
#   bench/guided_study_260k.sh [OUT_DIR] [PARALLEL]      (default /tmp/guided-260k, 2)
# Data split and settings: bench/study_260k.sh; results: docs/results/guided.md.
here=$(cd "$(dirname "$0")" && pwd)
exec "$here/study_260k.sh" "$here/plans/guided-stories260k.txt" "${1:-/tmp/guided-260k}" "${2:-2}"

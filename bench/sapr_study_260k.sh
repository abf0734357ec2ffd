#!/usr/bin/env bash
# SAPR vs ApiQ on stories260K (issue 22): seeds, validation split, variants and controls.
#   bench/sapr_study_260k.sh [OUT_DIR] [PARALLEL]      (default /tmp/sapr-260k, 2)
# Data split and settings: bench/study_260k.sh; results: docs/results/sapr-study.md.
here=$(cd "$(dirname "$0")" && pwd)
exec "$here/study_260k.sh" "$here/plans/sapr-stories260k.txt" "${1:-/tmp/sapr-260k}" "${2:-2}"

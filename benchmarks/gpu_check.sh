#!/usr/bin/env bash
# The GPU check in one command: benchmarks/gpu_check.sh [--device cpu --quick] [--out DIR] ...
# Runs benchmarks/gpu_check.py with $PYTHON (default: python3) from the repository root; every
# argument is passed on (see `benchmarks/gpu_check.sh --help`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"

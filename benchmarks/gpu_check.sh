#!/usr/bin/env bash
# The GPU check (see benchmarks/gpu_check.py); arguments pass through, e.g. --dry or --out DIR.
exec python "$(dirname "$0")/gpu_check.py" "$@"

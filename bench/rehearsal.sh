#!/usr/bin/env bash
# Issue 17's dress rehearsal: bench/rehearsal.sh ROOT [--size paper|tiny] [--stages a,b,...] [other rehearsal.py flags]
# Runs from the repository root with the workbench's Python (.venv/bin/python if there, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bench/rehearsal.sh ROOT [--size paper|tiny] [--stages ...]" >&2; exit 2; }
ROOT=$1; shift
PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python
exec "$PY" bench/rehearsal.py --root "$ROOT" "$@"

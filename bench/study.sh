#!/usr/bin/env bash
# The controlled study of issue 13 (nbs/study.ipynb -> sara.study), stage by stage, on the machine it runs on.
#   bench/study.sh ROOT [STAGES (all)] [extra sara-study flags, e.g. --size micro, --carry DIR, --set train_steps=500]
# Each stage is skipped when it has finished (ROOT/<stage>/done.json); a half-written one is redone. The table,
# figures and stage wall times end up in ROOT/report/ (table.md, grid_*.png, *.html, done.json).
# On the lent H200 (no diffusers, no av there): carry their wheels and put them first on PYTHONPATH, e.g.
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site WHEELS/*.whl && export PYTHONPATH=/tmp/site:$PWD
# The MiniLM text table (stage `text`) is built where sara.text.MiniLMEncoder loads and carried with --carry.
set -euo pipefail
ROOT=${1:?usage: bench/study.sh ROOT [STAGES] [flags]}; STAGES=${2:-all}; shift $(( $# < 2 ? $# : 2 ))
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-$(command -v python3)}
"$PY" -m sara.study --root "$ROOT" --stage "$STAGES" "$@"

#!/usr/bin/env bash
# Issue 17 on one H200, in one device call of at most 8 minutes. From the repository root, with carry
# [".h13/whl", ".h13/whl17"] (diffusers, av, fastcore, importlib_metadata; plotly for the notebooks' result cells):
#   bash bench/rehearsal_device.sh
# Installs the wheels into /tmp/site, runs every stage of bench/rehearsal.py --size paper under one timeout (the
# stages are resumable: a second call with the same root skips the finished ones), prints the table even when it
# stops early, and copies run.log, table.md, rehearsal.json and logs.tgz to $OUT.
set -o pipefail
T0=$(date +%s)
BUDGET=${REH_SECONDS:-465}            # the whole script, install included
R=${REH_ROOT:-/tmp/reh}
OUT=${OUT:-/tmp/reh-out}; mkdir -p "$OUT"
[ -n "${REH_NO_INSTALL:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .h13/whl/*.whl .h13/whl17/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{ date -u; df -h / /tmp /dev/shm "$R" 2>/dev/null; free -g; nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
  python3 -c "import torch, diffusers, transformers, av; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/run.log"
LEFT=$(( BUDGET - 15 - ($(date +%s) - T0) ))
timeout -k 10 "$LEFT" python3 bench/rehearsal.py --size "${REH_SIZE:-paper}" --root "$R" "$@" 2>&1 | grep --line-buffered -v 'it/s\]\|s/it\]' | tee -a "$OUT/run.log"
rc=$?
echo "rehearsal exit status $rc after $(( $(date +%s) - T0 )) s" | tee -a "$OUT/run.log"
python3 bench/rehearsal.py --table --root "$R" 2>&1 | tee -a "$OUT/run.log"
cp "$R/table.md" "$R/rehearsal.json" "$OUT/" 2>/dev/null
(cd "$R" && tar czf "$OUT/logs.tgz" logs done runs/*/metrics.jsonl runs/*/config.json runs/*/checkpoints/*/MANIFEST.json runs/*/*.json 2>/dev/null)
df -h "$R" /dev/shm 2>/dev/null | tee -a "$OUT/run.log"
exit $rc

#!/usr/bin/env bash
# Stage 1 on the toy world (issue 4): held-out saliency IoU / AUROC and text-to-clip retrieval of the Semantic
# Aligner against the two baselines that need no learning (uniform saliency, caption-agnostic mean mask), and
# the motion head's end-point error against zero flow. CPU, tiny random V-JEPA 2; a few minutes on 2 cores.
#   bench/stage1_toy.sh [n_clips (192)] [steps (300)] [work folder (/tmp/sara-stage1)]
set -euo pipefail
N=${1:-192}; STEPS=${2:-300}; WORK=${3:-/tmp/sara-stage1}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"; BIN="$ROOT/.venv/bin"
export HF_HUB_OFFLINE=1
mkdir -p "$WORK"
[ -f "$WORK/data/manifest.jsonl" ] || "$BIN/python" -c "from sara.toy import make_toy_world; make_toy_world('$WORK/data', n_clips=$N, with_flow=True)"
CACHE=$("$BIN/python" -c "
from sara.precompute import precompute
print(precompute(dict(data_root='$WORK/data', cache_dir='$WORK/cache', progress=False)))" | tail -1)
for head in aligner motion; do
  "$BIN/papermill" -k sara --cwd "$ROOT/nbs" --log-level ERROR "$ROOT/nbs/aligner.ipynb" "$WORK/$head.ipynb" \
    -p head $head -p run_name $head -p cache "$CACHE" -p runs_dir "$WORK/runs" -p steps "$STEPS" -p export False -p overwrite True
done
"$BIN/python" - "$WORK/runs/stage1" <<'PY'
import json, sys
from pathlib import Path
r = Path(sys.argv[1])
a, m = (json.loads((r / h / "baselines.json").read_text()) for h in ("aligner", "motion"))
print("held-out saliency (merged w) | IoU@0.5  AUROC")
for name, d in (("aligner", a["aligner"]["merged"]), ("uniform", a["uniform"]["merged"]), ("mean mask", a["mean_mask"]["merged"])):
    print(f"{name:28s} | {d['iou']:7.3f} {d['auroc']:6.3f}" + (f"   (best-threshold IoU {d['iou_best']:.3f})" if "iou_best" in d else ""))
print(f"text-to-clip retrieval top-1: {a['aligner']['retrieval_top1']:.3f} (chance {a['aligner']['chance']:.3f})")
print("motion head:", {k: round(v, 4) for k, v in m["motion"].items() if isinstance(v, float)})
PY

#!/usr/bin/env bash
# Several-GPU check of Stage 2 through accelerate (run on a machine with >= 2 CUDA GPUs, from the repo root):
#   tests/gpu/multi_gpu.sh <cache folder>
# 1. DDP, 2 processes, 6 steps with checkpoints every 3 (the reference run);
# 2. DDP, 2 processes, 3 steps, then the same run resumed with resume=latest up to step 6: metrics must equal run 1;
# 3. FSDP2 (configs/accelerate/fsdp.yaml, bf16), 2 processes, 4 steps with a checkpoint, then resumed to 6 steps;
# 4. data parallelism: 1 process with batch 4 sees, step by step, the clips of run 1 (2 processes x batch 2: each
#    process its half of the global batch), and its first step's fm (same weights, same draws) within 1e-4 (sara's routed TRD is
#    normalised per process, so its mean over processes is not the batch-4 value).
set -euo pipefail
CACHE=${1:?usage: tests/gpu/multi_gpu.sh <cache folder>}
RUNS=${RUNS:-/tmp/sara-multi-gpu}
rm -rf "$RUNS"
common=(--cache "$CACHE" --runs_dir "$RUNS" --device cuda --batch_size 2 --mixed_precision no)
launch() { python3 -m accelerate.commands.launch --num_processes 2 "$@"; }
launch --multi_gpu -m sara.train "${common[@]}" --run_name ddp_full --steps 6 --checkpoint_every 3
launch --multi_gpu -m sara.train "${common[@]}" --run_name ddp_part --steps 3 --checkpoint_every 3
launch --multi_gpu -m sara.train "${common[@]}" --run_name ddp_part --steps 6 --checkpoint_every 3 --resume latest
launch --config_file configs/accelerate/fsdp.yaml -m sara.train --cache "$CACHE" --runs_dir "$RUNS" --device cuda \
       --batch_size 2 --mixed_precision bf16 --run_name fsdp --steps 4 --checkpoint_every 2
launch --config_file configs/accelerate/fsdp.yaml -m sara.train --cache "$CACHE" --runs_dir "$RUNS" --device cuda \
       --batch_size 2 --mixed_precision bf16 --run_name fsdp --steps 6 --checkpoint_every 2 --resume latest
python3 -m sara.train --cache "$CACHE" --runs_dir "$RUNS" --device cuda --batch_size 4 --mixed_precision no \
        --run_name one_gpu --steps 6 --checkpoint_every 0
python3 - "$RUNS" <<'PY'
import json, sys
from pathlib import Path
runs = Path(sys.argv[1])
rows = lambda n: [json.loads(l) for l in (runs / n / "metrics.jsonl").read_text().splitlines()]
keys = ("step", "fm", "trd", "loss", "clips")
a, b = [{k: r[k] for k in keys} for r in rows("ddp_full")], [{k: r[k] for k in keys} for r in rows("ddp_part")]
print("ddp full :", [(r["step"], round(r["fm"], 6), round(r["trd"], 6)) for r in a])
print("ddp part+resume:", [(r["step"], round(r["fm"], 6), round(r["trd"], 6)) for r in b])
diff = max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in ("fm", "trd", "loss"))
print("DDP resume: same steps and clips:", [(r["step"], r["clips"]) for r in a] == [(r["step"], r["clips"]) for r in b],
      f"max |difference| of fm/trd/loss {diff:.2e} (bitwise equal: {a == b}; CUDA kernels are not bitwise deterministic)")
f = rows("fsdp")
print("fsdp (bf16):", [(r["step"], round(r["fm"], 4), round(r["trd"], 4), round(r["gpu_mem_gib"], 3)) for r in f])
for n in ("ddp_full", "ddp_part", "fsdp"):
    print(n, "exports:", sorted(p.name for p in (runs / n / "checkpoint").iterdir()),
          "checkpoints:", sorted(p.name for p in (runs / n / "checkpoints").iterdir()))
assert [(r["step"], r["clips"]) for r in a] == [(r["step"], r["clips"]) for r in b] and diff < 1e-5, "DDP resume differs"
assert [r["step"] for r in f] == list(range(1, 7)) and all(r["fm"] == r["fm"] for r in f)
o = rows("one_gpu")
print("1 GPU batch 4:", [(r["step"], round(r["fm"], 6), round(r["trd"], 6)) for r in o])
assert all(len(r["clips"]) == 4 for r in a + f), "the logged clips are the global batch: 2 processes x batch_size 2"
assert [r["clips"] for r in o] == [r["clips"] for r in a], "2 x batch 2 must see the clips of 1 x batch 4"
assert abs(o[0]["fm"] - a[0]["fm"]) <= 1e-4 * max(1.0, abs(o[0]["fm"])), "step 1's fm differs"   # routed trd: per-process normalised
print("MULTI-GPU CHECK PASSED")
PY

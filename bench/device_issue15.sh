#!/usr/bin/env bash
# Issue 15 on the device (throughput and scale). From the repository root, with the py3.12 wheels carried:
#   run(kind="nvidia-h200",    command="bash bench/device_issue15.sh single", carry=[".h13/whl"])                  # <= 380 s
#   run(kind="nvidia-h200-x2", command="bash bench/device_issue15.sh multi",  carry=[".h13/whl", ".h13/cache15"])  # <= 570 s
#   run(kind="nvidia-h200-x2", command="bash bench/device_issue15.sh scale",  carry=[".h13/whl"])                  # <= 7 min
# single: bench/bench_levers.py (TI2V-5B 480x832x81, sft and sara, full 30 blocks), in this order, until LIMIT (380 s):
#         compile regional + checkpointing off, compile regional + blocks:K (K: resolve_levers' choice for 80 GiB), the GPU
#         default at 704x1280x121, then today's step, each lever alone and their best combination
#         -> $OUT/levers.json (rewritten after every row), $OUT/single.log
# multi:  cheap checks first, until LIMIT (570 s): (a) context parallelism agrees with one GPU
#         (tests/gpu/test_context_parallel.sh, with the workbench's own sara.train through accelerate FSDP2 on the toy
#         cache), (b) a DCP checkpoint saved by the GPUs resumed on 1 (4 blocks), (c) the A14B expert under FSDP2 over the
#         GPUs: step time and memory per GPU, DCP save of the full state and resume on the same GPUs (last: the save
#         alone took 106 s; without ~340 s left, the step only). SKIP_AB=1 runs (c) alone (its save and resume fit then)
# scale:  LoRA (rank 64, peft) on the A14B expert on one GPU at 480x832x81; context parallelism at full depth in bf16
#         (bench_fsdp.agreement: loss 2e-2, global and median gradient relative error 1e-2; every tensor's error saved);
#         longest A14B clip at 720x1280 with and without context parallelism (2 blocks measured, 40 extrapolated)
# DRY=1 runs the same commands on the CPU at smoke size (gloo, a narrow DiT), to check this script without a GPU.
set -o pipefail
PART=${1:?usage: bench/device_issue15.sh single|multi|scale}
DRYF=(); DRYL=(); NATIVE=(--native); CKNEED=100
if [ "${DRY:-0}" = 1 ]; then
  DRYF=(--device cpu --dit small --frames 9 --height 64 --width 64); DRYL=(--layers 2 --steps 1 --warmup 1 --blocks 1); NATIVE=(--native --native-size 17x64x96); CKNEED=1
fi
OUT=${OUT:-/tmp/out15}; mkdir -p "$OUT"
case $PART in single) D=380 ;; multi) D=570 ;; *) D=415 ;; esac
T0=$(date +%s); LIMIT=${LIMIT:-$D}   # seconds this part may use (a call's limit is 600)
if [ "${DRY:-0}" = 1 ]; then export PYTHONPATH=$PWD
elif [ -n "${SKIP_INSTALL:-}" ]; then export PYTHONPATH=/tmp/site:$PWD   # installed already (another job on this machine imports from /tmp/site)
else python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .h13/whl/*.whl || exit 1
     export PYTHONPATH=/tmp/site:$PWD; fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # the image's setting, kept in child processes
F="should be kept in float32\|experimental feature\|all_gather_tensor\|FutureWarning\|return funcol\|split will not be applied"
left() { local l=$(( LIMIT - ($(date +%s) - T0) )); [ $l -gt 5 ] && echo $l || echo 5; }
log() { grep --line-buffered -v "$F" | tee -a "$OUT/$PART.log"; }
step() { echo "== $(( $(date +%s) - T0 )) s: $*" | tee -a "$OUT/$PART.log"; }
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())'); [ "${DRY:-0}" = 1 ] && NGPU=2
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader | log
python3 -c 'import torch, diffusers, accelerate, peft; print("torch", torch.__version__, "diffusers", diffusers.__version__, "accelerate", accelerate.__version__, "peft", peft.__version__)' 2>&1 | log
TR() { timeout "$(left)" python3 -m torch.distributed.run --nproc-per-node "$1" bench/bench_fsdp.py "${@:2}" "${DRYF[@]}"; }
ckdir() {   # a folder with room for an A14B expert's DCP checkpoint (bf16 weights + 2 AdamW states: ~86 GB)
  for d in /dev/shm /tmp "$PWD"; do
    free=$(df -BG --output=avail "$d" 2>/dev/null | tail -1 | tr -dc 0-9)
    if [ -n "$free" ] && [ "$free" -ge "${1:-100}" ]; then echo "$d/ck15"; return; fi
  done
}
case $PART in
single)
  # one process, rows in order of need (new rows, 704x1280x121, then the older ones); the budget leaves ~40 s for the
  # row under way, and levers.json is rewritten after every row, so the timeout loses at most that row
  step "lever table (bench/bench_levers.py, new rows first, budget $(( $(left) - 40 )) s)"
  timeout "$(left)" python3 bench/bench_levers.py "${NATIVE[@]}" --budget $(( $(left) - 40 )) --out "$OUT/levers.json" "${DRYF[@]}" "${DRYL[@]}" 2>&1 | log
  ;;
multi)
  [ "$NGPU" -ge 2 ] || { echo "multi needs >= 2 GPUs, found $NGPU" | log; exit 2; }
  step "(a) toy cache for sara.train (the carried .h13/cache15; built here only without it)"
  CACHE=$(ls -d .h13/cache15/*/ 2>/dev/null | head -1)
  if [ -z "$CACHE" ] && [ "${DRY:-0}" != 1 ]; then
    if timeout 60 python3 -m sara.train --device cuda --steps 1 --run_name cachebuild --runs_dir /tmp/r15 --cache_dir /tmp/c15 \
         --checkpoint_every 0 > "$OUT/cachebuild.log" 2>&1; then CACHE=$(ls -d /tmp/c15/*/ | head -1)
    else tail -2 "$OUT/cachebuild.log" | log; fi
  fi
  [ "${DRY:-0}" = 1 ] && CACHE=""   # sara.train through accelerate's FSDP needs CUDA
  if [ -z "${SKIP_AB:-}" ]; then
    step "(a) context parallelism: agreement, sara.train under accelerate FSDP2 with context_parallel=$NGPU (tests/gpu/test_context_parallel.sh ${CACHE:-without a cache})"
    NGPU=$NGPU OUT=$OUT/cp EXTRA="${DRYF[*]}" timeout "$(left)" bash tests/gpu/test_context_parallel.sh $CACHE 2>&1 | log
    CK4=/tmp/ck15_4
    step "(b) resharding: saved by $NGPU GPUs, resumed on 1 (4 blocks)"
    rm -rf "$CK4"; TR "$NGPU" --layers 4 --steps 1 --warmup 0 --check-steps 2 --save "$CK4" 2>&1 | log
    TR 1 --layers 4 --load "$CK4" --check --out "$OUT/fsdp_reshard_1gpu.json" 2>&1 | log; rm -rf "$CK4"
  else step "(a), (b) skipped (SKIP_AB)"; fi
  CK=$(ckdir $CKNEED); NEED=${A14B_SAVE_S:-340}   # step + DCP save + resume of the A14B state: ~210 s + ~120 s on 2 x H200
  [ "${DRY:-0}" = 1 ] && NEED=10
  if [ -n "$CK" ] && [ "$(left)" -lt "$NEED" ]; then
    echo "(c) $(left) s left < $NEED s: the A14B step without the DCP save and resume" | log; CK=""; fi
  step "(c) A14B expert, FSDP2 over $NGPU GPUs, 480x832x81: step, memory, DCP save to ${CK:-nowhere}"
  TR "$NGPU" --steps 2 --warmup 1 --check-steps 1 ${CK:+--save "$CK"} --out "$OUT/fsdp_a14b.json" 2>&1 | log
  if [ -n "$CK" ] && [ -f "$CK/after.json" ]; then
    step "(c) resume the A14B checkpoint on $NGPU GPUs"
    TR "$NGPU" --load "$CK" --check --out "$OUT/fsdp_a14b_resume.json" 2>&1 | log
    du -sh "$CK" | log
  fi
  [ -n "$CK" ] && rm -rf "$CK"
  ;;
scale)
  [ "$NGPU" -ge 2 ] || { echo "scale needs >= 2 GPUs, found $NGPU" | log; exit 2; }
  step "LoRA rank 64 on the A14B expert, one GPU, 480x832x81"
  LIMIT=$(( LIMIT - 250 )) TR 1 --lora 64 --steps 2 --warmup 1 --out "$OUT/lora_a14b.json" 2>&1 | log
  step "context parallelism at full depth in bf16 (40 blocks, 480x832, 33 frames, sft)"
  LIMIT=$(( LIMIT - 150 )) TR "$NGPU" --agree --frames 33 --method sft --out "$OUT/cp_agree_bf16.json" 2>&1 | log
  step "longest A14B clip at 720x1280 (2 blocks measured, 40 extrapolated), context parallel 1 and $NGPU"
  TR "$NGPU" --longest --layers 2 --height 720 --width 1280 --frames-list 81,121,161,201,241 \
      --out "$OUT/longest_720p.json" 2>&1 | log
  ;;
*) echo "unknown part $PART (single | multi | scale)"; exit 2 ;;
esac
step "done"
ls -la "$OUT" | tee -a "$OUT/$PART.log"

#!/usr/bin/env bash
# Issue 13, part 6: the study's VAE to the issue's 30 dB. Part 5's VAE (base width 24, 2500 steps of batch 8) reached
# 29.24 dB with its loss still falling; at its 0.29 s/step the same width needs about 4500 steps (extrapolated), more
# than the loops fit beside Stage 2 in one session. Two wider VAEs race instead, one per GPU of a 2 x H200 machine, each
# for the same wall time: the steps of each are fixed before training from its measured step time
# (bench/vae_step_time.py), VAE_S seconds of loop in all; the loops pause at each call's budget and resume in the next
# (StudySize.budget_s). The rule, fixed before the run: the study's VAE is the finished one with the higher held-out PSNR
# (both are reported). Every other field is part 5's (LIKE); the target encoder is part 5's, carried into Stage 2 later.
#   bench/study_vae_race.sh call1   wheels, world (from WORLD), step-time probe, vae_steps fixed (written to $RACE/set_<base>
#                                   and $OUT), both loops with this call's budget
#   bench/study_vae_race.sh call2   both loops resume (same warm machine: /tmp is kept); run it again until both finish;
#                                   then the pick, and each finished VAE's folder returned in $OUT (vae_b<base>.tgz.*)
# Env: BASES (the widths, "32 48"), VAE_S (loop seconds of each, 1100), LIMIT (seconds this call may use, 560), REST
#      (seconds kept after the loops in call2: final save, latent statistics, held-out PSNR; 100), LIKE, and
#      study_env.sh's WHL, CARRY, WORLD, OUT, PY. Chain the calls at once on the same kind (the machine stays warm 30 s).
set -o pipefail
PART=${1:?usage: bench/study_vae_race.sh call1|call2}
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
LIMIT=${LIMIT:-560}; REST=${REST:-100}; BASES=${BASES:-"32 48"}; VAE_S=${VAE_S:-1100}; RACE=${RACE:-/tmp/race}
LIKE=${LIKE:-bench/study_2026-11-30c/study.json}
. "$(dirname "$0")/study_env.sh"   # WHL, CARRY, OUT, PY; installs the wheels, unpacks the carried world
mkdir -p $RACE; LOG=$OUT/race.log
VB=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['size']['vae_batch'])" $LIKE) || exit 1   # the VAE's batch (LIKE's)
say() { echo "t=$(el) $*" | tee -a $LOG; }
study() {   # $1: the width; the rest: sara-study flags
  local b=$1; shift
  timeout ${TMO:-0} $PY -m sara.study --root $RACE/b$b --like $LIKE --set $(cat $RACE/set_$b) "$@" 2>&1 | grep --line-buffered -v "$F"
  return ${PIPESTATUS[0]}
}
done_() { [ -f $RACE/b$1/vae/done.json ]; }
loops() {   # every unfinished width on its own GPU with budget $1 (at least 5 s: 0 would mean none)
  local i=0 b bud=$(( $1 > 5 ? $1 : 5 ))
  for b in $BASES; do
    if done_ $b; then say "b$b done"; else
      ( CUDA_VISIBLE_DEVICES=$i TMO=$(( LIMIT - $(el) - 15 )) study $b --stage vae --budget $bud > $OUT/vae_b$b.log 2>&1
        say "b$b exit $? ($(grep "\[study\]" $OUT/vae_b$b.log | tail -1 | cut -c1-200))" ) &
    fi
    i=$(( i + 1 ))
  done
  wait
}
case $PART in
  call1)
    i=0
    for b in $BASES; do   # the step time of each width, side by side, one per GPU
      CUDA_VISIBLE_DEVICES=$i $PY bench/vae_step_time.py --like $LIKE --bases $b --batches $VB --short 5 --long 25 --repeat 1 \
        --json $RACE/step_$b.json > $OUT/step_b$b.log 2>&1 &
      i=$(( i + 1 ))
    done
    wait; cat $OUT/step_b*.log | tee -a $LOG
    for b in $BASES; do   # vae_steps from the measured step time: VAE_S seconds of loop, in whole fifties
      st=$($PY -c "import json,sys; d=json.load(open(sys.argv[1])); print(max(100, int($VAE_S / d['${b}x$VB'] // 50 * 50)))" $RACE/step_$b.json) || exit 1
      echo "vae_base_dim=$b vae_steps=$st" > $RACE/set_$b; cp $RACE/set_$b $RACE/step_$b.json $OUT/; say "b$b: $(cat $RACE/set_$b)"
    done
    first=${BASES%% *}
    study $first --stage world $CARRY_ARG | tail -2 | tee -a $LOG
    rm -rf /tmp/wcar && mkdir -p /tmp/wcar && cp -r $RACE/b$first/world /tmp/wcar/
    for b in $BASES; do [ $b = $first ] || study $b --stage world --carry /tmp/wcar | tail -1 | tee -a $LOG; done
    say "world"
    loops $(( LIMIT - $(el) - 90 ))   # the loops' setup (rendering 2048 clips) and the state's save come on top
    ;;
  call2)
    for b in $BASES; do [ -f $RACE/set_$b ] || { say "no $RACE/set_$b: run call1 on this machine first"; exit 1; }; done
    loops $(( LIMIT - $(el) - REST ))
    all=1; for b in $BASES; do done_ $b || all=0; done
    if [ $all = 0 ]; then say "a loop paused: run call2 again"; exit 3; fi
    $PY - $RACE $BASES <<'EOF' | tee -a $LOG
import json, sys
from pathlib import Path
race, bases = Path(sys.argv[1]), sys.argv[2:]
rec = {b: json.loads((race / f"b{b}" / "vae" / "done.json").read_text()) for b in bases}
rows = {b: dict(set=(race / f"set_{b}").read_text().split(), psnr_heldout=r["result"]["psnr_heldout"], psnr_min=r["result"]["psnr_min"],
                params=r["result"]["params"], loop_s=r["result"].get("loop_s"), final_mse=r["result"]["final_mse"]) for b, r in rec.items()}
best = max(rows, key=lambda b: rows[b]["psnr_heldout"])   # the rule fixed before the run
out = dict(rows=rows, chosen=best, rule="the finished width with the higher held-out PSNR")
from sara.study import write_json
write_json(race / "chosen.json", out); print(json.dumps(out, indent=1))
EOF
    cp $RACE/chosen.json $OUT/
    for b in $BASES; do
      tar czf - -C $RACE/b$b study.json vae/done.json vae/history.json vae/vae | split -b 15m - $OUT/vae_b$b.tgz.
    done
    ;;
  *) echo "unknown part $PART (call1|call2)"; exit 2 ;;
esac
ls -la $OUT

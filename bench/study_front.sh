#!/usr/bin/env bash
# Issue 13: the front of the study (world .. stage1) over two device calls, the VAE (and the encoder, if it must) paused
# at a time budget and resumed (StudySize.budget_s, `sara-study --budget`; nbs/study.ipynb "Training across calls").
#   bench/study_front.sh call1   world, text; vae --budget on GPU 0 beside encoder --budget on GPU 1; returns in $OUT the
#                                VAE's state (vae_state.tar.aa, .ab: 21 MiB, cut under the 16 MiB per returned file),
#                                the finished encoder (encoder.tgz) and the logs
#   bench/study_front.sh call2   the paused loops resume (the study folder of call 1 on the same, still warm machine;
#                                on a fresh one, call 1's files from BACK), then wan, cache, stage1 in what is left
# A paused stage exits 3 and has no done.json; run the same part again (call2) until vae and encoder are done.
# Run call2 at once after call1 with the same kind: the machine stays warm 30 s after a call and keeps /tmp (R, the
# installed wheels, the unpacked world), so call2 carries nothing (carry=[]). A fresh machine cannot take call 1's files
# beside the wheels and the text table: WHL
# 41.4 MB + CARRY 13.9 MB + the tracked tree 10.6 MB = 65.9 MB of the 64 MiB (67.1 MB) a call carries, and BACK is
# another 31 MB (VAE state 22 MB, encoder 9.5 MB).
# Env: WHL (wheels the image lacks), CARRY (world/scenes.json.gz, text/table.safetensors), BACK (call 1's files),
#      SET (StudySize fields, the same in every call, e.g. "vae_steps=3000"), LIMIT (seconds this call may use),
#      REST (seconds kept for wan, cache and stage1 in call2), BUDGET (the loops' seconds instead of what LIMIT leaves),
#      R (the study folder; stage2 of bench/study_device.sh continues from it with the same R).
set -o pipefail
PART=${1:?usage: bench/study_front.sh call1|call2}
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
BACK=${BACK:-}; SET=${SET:-}; LIMIT=${LIMIT:-570}; REST=${REST:-170}
. "$(dirname "$0")/study_env.sh"   # WHL, CARRY, OUT, R, PY, SIZE; installs the wheels, unpacks the carried world
LOG=$OUT/$PART.log
study() { timeout ${TMO:-0} $PY -m sara.study --size $SIZE --root $R "$@" ${SET:+--set $SET} 2>&1 | grep --line-buffered -v "$F"; return ${PIPESTATUS[0]}; }
done_() { [ -f $R/$1/done.json ]; }
say() { echo "t=$(el) $*" | tee -a $LOG; }
train() {   # $1: the stage, $2: its GPU, $3: the budget of its loop (a paused stage exits 3); killed 20 s before the call's limit
  if done_ $1; then say "$1 done"; return; fi
  ( CUDA_VISIBLE_DEVICES=$2 TMO=$(( LIMIT - $(el) - 20 )) study --stage $1 --budget $3 > $OUT/$1.log 2>&1
    say "$1 exit $? ($(grep "\[study\]" $OUT/$1.log | tail -1 | cut -c1-200))" ) &
}
pack() {   # what the next call needs if it lands on a fresh machine, and the records
  rm -f $OUT/vae_state.tar.*
  [ -f $R/vae/train_state.pt ] && tar cf - -C $R vae/train_state.pt | split -b 15m - $OUT/vae_state.tar.
  done_ encoder && tar czf $OUT/encoder.tgz -C $R encoder
  done_ vae && tar czf $OUT/vae.tgz -C $R vae/done.json vae/history.json vae/vae
  $PY -c "import json; from pathlib import Path; print({p.parent.name: json.loads(p.read_text())['wall_s'] for p in sorted(Path('$R').glob('*/done.json'))})" | tee -a $LOG
  ls -la $OUT
}
case $PART in
  call1)
    study --stage world,text $CARRY_ARG | tee -a $LOG; say "world, text"
    B=${BUDGET:-$(( LIMIT - $(el) - 90 ))}   # the loops' budget: their setup (rendering 2048 clips) and the saves come on top
    train vae 0 $B; train encoder ${ENC_GPU:-1} $B; wait
    pack ;;
  call2)
    if ! done_ vae && [ ! -f $R/vae/train_state.pt ]; then   # a fresh machine: call 1's files
      [ -n "$BACK" ] && ls $BACK/vae_state.tar.* > /dev/null || { say "no VAE state here and none in BACK=$BACK"; exit 1; }
      mkdir -p $R && cat $BACK/vae_state.tar.* | tar xf - -C $R && say "VAE state from $BACK"
      [ -f $BACK/encoder.tgz ] && ! done_ encoder && tar xzf $BACK/encoder.tgz -C $R
    fi
    study --stage world,text $CARRY_ARG | tee -a $LOG; say "world, text"
    B=${BUDGET:-$(( LIMIT - $(el) - REST ))}
    train vae 0 $B; train encoder ${ENC_GPU:-1} $B; wait
    if done_ vae && done_ encoder; then
      TMO=$(( LIMIT - $(el) - 10 )) study --stage wan,cache,stage1 | tee -a $LOG
    else say "vae or encoder paused: run call2 again"; fi
    pack ;;
  *) echo "unknown part $PART (call1|call2)"; exit 2 ;;
esac

#!/usr/bin/env bash
# Issue 13 on the device machine (2 x H200 kind, or one GPU: then both parts use GPU 0), from the repository root.
#   bench/study_device.sh sweep    recipe sweep (bench/study_sweep.py: VAE and encoder recipes spread over the GPUs),
#                                  then the study's world, text, vae, encoder, wan, cache and stage1 with the chosen recipes
#   bench/study_device.sh stage2   Stage 2 (every method and seed, 6 runs per GPU) and sampling; packs the records and
#                                  samples into $OUT (scoring and the report run on any CPU: sara-study --unpack). Stopped
#                                  at TRAIN_S (timeout kills the stage's run processes too), run stage2 again on the warm
#                                  machine: finished runs are kept, the others resume from their last checkpoint
#                                  (StudySize.train_ckpt_every, 200 steps), exactly.
# CARRY: finished world/ (scenes.json) and text/ (the MiniLM table, built where MiniLM is installed).
# WHL: wheels of what the device image lacks (diffusers, av, importlib_metadata, fastcore for its python).
# GPUS: the sweep's round-robin list (e.g. 0,1,1,1: the first recipe, the VAE, alone on GPU 0).
# On a machine without the study's front (a fresh one, or R gone), stage2 builds it from carried finished stages:
# FRONT: a folder of finished stage folders (vae/ and encoder/ of a recorded study, e.g. part 5's: the costly and
#        non-deterministic stages; world, wan, cache and Stage 1 are rebuilt from them and CARRY's world and text; or
#        a whole study folder on this warm machine, e.g. FRONT=/tmp/study R=/tmp/more SET='seeds=[3,4,5]': its
#        text/, vae/ and encoder/ are taken, nothing else),
# LIKE:  the study.json whose fields to take, SET: fields to replace after it (e.g. SET='seeds=[3,4,5]': more seeds
#        of the same front, merged here with `sara-study --merge`);
# BACK:  or the sweep part's returned files (chosen.json, chosen.tgz): its chosen recipes are the front.
set -o pipefail
PART=${1:?usage: bench/study_device.sh sweep|stage2}
BACK=${BACK:-.h13/back4}; S=${S:-/tmp/sweep}
. "$(dirname "$0")/study_env.sh"   # WHL, CARRY, OUT, R, PY, SIZE; installs the wheels, unpacks the carried world
NG=$($PY -c "import torch; print(torch.cuda.device_count())"); W=$(( NG > 0 ? 6 * NG : 1 ))
chosen_set() { $PY -c "import json,sys; print(' '.join(json.load(open(sys.argv[1]))['set']))" "$1"; }
front() {   # world .. stage1 of the study from the finished stages in $1 (skipped), in $2 s; the rest: sara-study flags
  local from=$1 limit=$2; shift 2
  timeout $limit $PY -m sara.study --size $SIZE --stage world,text,vae,encoder,wan,cache,stage1 --root $R --carry "$from" "$@" \
    2>&1 | grep -v "$F" | tee -a $OUT/$PART.log
}
case $PART in
  sweep)
    timeout ${SWEEP_S:-450} $PY bench/study_sweep.py --size $SIZE --root $S ${SWEEP_ARGS---vae vfull_b8 --enc mae90_wide,mae90_wide_b128,jepa90_wide_b128} $CARRY_ARG --gpus ${GPUS:-$($PY -c "print(','.join(map(str, range(max(1, $NG)))))")} --timeout ${RECIPE_S:-440} \
      2>&1 | grep -v "$F" | tee $OUT/sweep.log || { echo "sweep failed: nothing chosen"; exit 1; }
    cp $S/chosen.json $OUT/
    tar czf $OUT/chosen.tgz -C $S/chosen world vae encoder
    front $S/chosen 150 --set $(chosen_set $S/chosen.json)
    $PY -c "import json; from pathlib import Path; print({p.parent.name: json.loads(p.read_text())['wall_s'] for p in sorted(Path('$R').glob('*/done.json'))})" | tee -a $OUT/sweep.log
    ;;
  stage2)
    if [ ! -f $R/stage1/done.json ] && [ -n "$FRONT" ]; then   # the front from carried finished stages, the world and text from CARRY
      [ -d "$FRONT/vae" ] && [ -n "$LIKE" ] || { echo "FRONT=$FRONT has no vae/ or LIKE is empty"; exit 1; }
      rm -rf /tmp/front && mkdir -p /tmp/front && { [ -z "$CARRY" ] || cp -r $CARRY/. /tmp/front/; } || exit 1
      for st in text vae encoder; do   # of a whole study folder as FRONT (e.g. /tmp/study for more seeds) only what does
        [ ! -d "$FRONT/$st" ] || { rm -rf /tmp/front/$st && cp -r "$FRONT/$st" /tmp/front/; } || exit 1   # not name its folder:
      done   # world's manifest, wan, cache and stage1 record their paths (a cache made elsewhere refuses this wan_model), and
             # its finished train/ and sample/ would skip the new seeds; they are rebuilt here
      front /tmp/front ${FRONT_S:-200} --like $LIKE ${SET:+--set $SET}
    elif [ ! -f $R/stage1/done.json ]; then   # the front from the sweep's files
      mkdir -p /tmp/back && tar xzf $BACK/chosen.tgz -C /tmp/back && cp -r $CARRY/text /tmp/back/chosen/
      front /tmp/back/chosen 200 --set $(chosen_set $BACK/chosen.json)
    fi
    [ -f $R/stage1/done.json ] || { echo "the study's front did not finish in $R"; exit 1; }
    timeout ${TRAIN_S:-390} $PY -m sara.study --size $SIZE --stage train --root $R --like $R/study.json --set workers=$W 2>&1 | grep -v "$F" | tail -5 | tee -a $OUT/stage2.log
    timeout ${SAMPLE_S:-140} $PY -m sara.study --size $SIZE --stage sample --root $R --like $R/study.json --set workers=$W 2>&1 | grep -v "$F" | tail -5 | tee -a $OUT/stage2.log
    $PY -c "from sara.study import pack_results as p; print(p('$R', '$OUT', runs=[]))" 2>&1 | tail -2 | tee -a $OUT/stage2.log
    ;;
  *) echo "unknown part $PART (sweep|stage2)"; exit 2 ;;
esac
ls -la $OUT

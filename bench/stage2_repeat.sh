#!/usr/bin/env bash
# Does the study's Stage 2 repeat bitwise on this machine? Two studies from one front (the text/, vae/ and encoder/ of
# FRONT), world .. Stage 2 rebuilt in each, then every run compared step by step (bench/compare_runs.py).
#   FRONT=<a study folder with text/ vae/ encoder/> LIKE=<its study.json> SIZE=micro TAG=det bash bench/stage2_repeat.sh
# SET: fields after LIKE's (e.g. SET='deterministic=false'); EACH_S: seconds each study may take; WHL, OUT, PY as in
# bench/study_env.sh (CARRY is not used).
set -o pipefail
: "${FRONT:?FRONT: a study folder holding text/, vae/ and encoder/}" "${LIKE:?LIKE: the study.json to take the fields from}"
CARRY=; TAG=${TAG:-det}
. "$(dirname "$0")/study_env.sh"
rm -rf /tmp/front && mkdir -p /tmp/front && for st in text vae encoder; do cp -r "$FRONT/$st" /tmp/front/ || exit 1; done
for k in a b; do
  rm -rf /tmp/rep_${TAG}_$k
  timeout ${EACH_S:-150} $PY -m sara.study --size $SIZE --root /tmp/rep_${TAG}_$k --stage world,text,vae,encoder,wan,cache,stage1,train \
    --carry /tmp/front --like $LIKE ${SET:+--set $SET} 2>&1 | grep -v "$F" | tail -2 || { echo "study $k did not finish"; exit 1; }
done
$PY bench/compare_runs.py /tmp/rep_${TAG}_a/train/runs /tmp/rep_${TAG}_b/train/runs | tee $OUT/repeat_$TAG.md

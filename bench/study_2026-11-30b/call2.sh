#!/usr/bin/env bash
# part 4, call 1 (2 x H200): world+text (carried), then VAE on GPU 0 || encoder then the issue-15 lever rows on GPU 1; then wan, cache, stage1
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p $OUT/i15; R=/tmp/study; T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .h13/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p /tmp/carry/world && cp -r .h13/carry4/text /tmp/carry/ && gunzip -c .h13/carry4/world/scenes.json.gz > /tmp/carry/world/scenes.json
SET="enc_batch=128 enc_steps=2000 train_steps=600"
F="Loading weights\|Writing model\|float32: \[\]\|LOAD REPORT\|UNEXPECTED\|^Key \|^---\|^Notes\|can be ignored\|^$"
el() { echo $(( $(date +%s) - T0 )); }
python3 -m sara.study --stage world,text --root $R --carry /tmp/carry --set $SET 2>&1 | grep -v "$F" | tee $OUT/front.log
echo "t=$(el) world done" | tee -a $OUT/front.log
( CUDA_VISIBLE_DEVICES=0 OMP_NUM_THREADS=12 timeout 440 python3 -m sara.study --stage vae --root $R --set $SET 2>&1 | grep -v "$F" > $OUT/vae.log; echo "t=$(el) vae exit $?" >> $OUT/front.log ) &
VP=$!
( CUDA_VISIBLE_DEVICES=1 OMP_NUM_THREADS=8 timeout 330 python3 -m sara.study --stage encoder --root $R --set $SET 2>&1 | grep -v "$F" > $OUT/enc.log; echo "t=$(el) encoder exit $?" >> $OUT/front.log
  L=$(( 545 - $(el) )); echo "t=$(el) levers LIMIT=$L" >> $OUT/front.log
  [ $L -gt 90 ] && CUDA_VISIBLE_DEVICES=1 SKIP_INSTALL=1 LIMIT=$L OUT=$OUT/i15 bash bench/device_issue15.sh single > $OUT/i15/stdout.txt 2>&1 ) &
EP=$!
wait $VP
tar czf $OUT/front.tgz -C $R study.json vae encoder 2>/dev/null
L=$(( 580 - $(el) )); echo "t=$(el) front wan,cache,stage1 timeout $L" | tee -a $OUT/front.log
timeout $L python3 -m sara.study --stage wan,cache,stage1 --root $R --set $SET 2>&1 | grep -v "$F" | tee -a $OUT/front.log
wait $EP
python3 -c "import json; from pathlib import Path; print({p.parent.name: json.loads(p.read_text())['wall_s'] for p in sorted(Path('$R').glob('*/done.json'))})" | tee -a $OUT/front.log
python3 -c "import json; r=json.load(open('$R/encoder/done.json'))['result']; print(r['probe'])" | tee -a $OUT/front.log
python3 -c "import json; r=json.load(open('$R/vae/done.json'))['result']; print(r['psnr_heldout'], r['psnr_min'])" | tee -a $OUT/front.log
tail -25 $OUT/i15/single.log

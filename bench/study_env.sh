# Sourced by bench/study_device.sh and bench/study_front.sh: the study's environment on the device machine.
# WHL: wheels the image lacks (empty: none; installed once per machine into /tmp/site); CARRY: world/scenes.json.gz
# and text/table.safetensors (carried compressed for the 64 MiB limit; unpacked into /tmp/carry) or a plain folder
# with world/ and text/ (empty: none; not carried in this call but unpacked by an earlier one on this warm machine: that
# one); R: the study folder, in /tmp: a warm machine keeps /tmp between calls, but not the repository's ignored folders
# (measured 2026-11-30: carrying .h13/whl replaced the whole .h13, and a study folder under it was gone in the next call);
# WORLD: a world/scenes.json.gz kept in the repository (e.g. bench/study_2026-11-30b/scenes.json.gz), used instead of one
# in CARRY, so that CARRY need hold only the text table (0.7 MB less to carry: the tracked tree, the wheels and the table
# are 66.6 of the 67.1 MB a call carries); OUT, PY, SIZE as in the callers. Sets CARRY_ARG (`--carry <folder>` or nothing)
# and F (log lines dropped).
WHL=${WHL-.h13/whl}; CARRY=${CARRY-.h13/carry4}; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
R=${R:-/tmp/study}; PY=${PY:-python3}; SIZE=${SIZE:-default}
if [ -n "$WHL" ] && [ ! -f /tmp/site/.installed ]; then   # a warm machine has them from the last call
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $WHL/*.whl && touch /tmp/site/.installed || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
F="Loading weights\|Writing model\|float32: \[\]\|LOAD REPORT\|UNEXPECTED\|^Key \|^---\|^Notes\|can be ignored\|^$"
WORLD=${WORLD:-$CARRY/world/scenes.json.gz}
if [ -n "$CARRY" ] && [ -f "$WORLD" ] && [ -d "$CARRY/text" ]; then   # the world simulated once and the MiniLM table (built where MiniLM is installed)
  mkdir -p /tmp/carry/world && cp -r "$CARRY/text" /tmp/carry/ && gunzip -c "$WORLD" > /tmp/carry/world/scenes.json || exit 1
  CARRY=/tmp/carry
elif [ -n "$CARRY" ] && [ ! -e "$CARRY" ] && [ -f /tmp/carry/world/scenes.json ]; then CARRY=/tmp/carry   # a warm machine: unpacked by the last call
fi
CARRY_ARG=${CARRY:+--carry $CARRY}

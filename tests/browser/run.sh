#!/usr/bin/env bash
# Browser test of the sara.viz explorers: JupyterLab on localhost, headless Debian Chromium driven by
# Playwright (npm `playwright-core`, executablePath), the explorer notebook run, sliders moved, a token
# clicked, screenshots saved under test-artifacts/browser/ and checked for heatmaps that changed.
#
# Needs: /usr/bin/chromium (Debian: `apt-get install -y chromium`), node >= 18 with npm, and the repo's
# .venv (jupyterlab, ipywidgets, anywidget). playwright-core is installed with npm into
# $SARA_BROWSER_DEPS (default ~/.cache/sara-browser-test) on first use; `npx playwright install` is not used.
# Exit status: 0 pass, 1 fail, 77 skipped (a prerequisite is missing; the reason is printed).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
ART="${SARA_ARTIFACTS:-$ROOT/test-artifacts/browser}"
DEPS="${SARA_BROWSER_DEPS:-$HOME/.cache/sara-browser-test}"
PY="$ROOT/.venv/bin/python"

skip() { echo "SKIP: $*"; exit 77; }
[ -x "$CHROMIUM" ] || skip "no Chromium at $CHROMIUM (Debian: apt-get install -y chromium)"
command -v node >/dev/null || skip "node is not installed (Debian: apt-get install -y nodejs npm)"
[ -x "$ROOT/.venv/bin/jupyter-lab" ] || skip "no JupyterLab in $ROOT/.venv (make setup)"
"$PY" -c "import anywidget, ipywidgets" 2>/dev/null || skip "the venv lacks anywidget/ipywidgets (pip install anywidget ipywidgets)"
if [ ! -d "$DEPS/node_modules/playwright-core" ]; then
  command -v npm >/dev/null || skip "npm is not installed and $DEPS has no playwright-core"
  mkdir -p "$DEPS"
  (cd "$DEPS" && npm install --no-audit --no-fund --silent playwright-core@1 >/dev/null 2>&1) \
    || skip "could not install playwright-core with npm into $DEPS"
fi

WORK="$(mktemp -d)"
JPID=""
cleanup() { if [ -n "$JPID" ]; then kill "$JPID" 2>/dev/null || true; wait "$JPID" 2>/dev/null || true; fi; rm -rf "$WORK"; }
trap cleanup EXIT
mkdir -p "$WORK/root" "$WORK/settings/@jupyterlab/apputils-extension" "$ART"
rm -f "$ART"/*.png "$ART"/result.json
cp "$HERE/explorers.ipynb" "$WORK/root/"
# no news / update toasts over the page
echo '{"fetchNews": "false", "checkForUpdates": false}' > "$WORK/settings/@jupyterlab/apputils-extension/notification.jupyterlab-settings"
ROOTOPT=""; [ "$(id -u)" = 0 ] && ROOTOPT="--allow-root"   # CI containers often run as root
PORT="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
TOKEN="$("$PY" -c 'import secrets; print(secrets.token_hex(16))')"
export JUPYTERLAB_SETTINGS_DIR="$WORK/settings" JUPYTERLAB_WORKSPACES_DIR="$WORK/ws" JUPYTER_RUNTIME_DIR="$WORK/rt" \
       JUPYTER_CONFIG_DIR="$WORK/cfg" HF_HUB_OFFLINE=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$ROOT/.venv/bin/jupyter-lab" --no-browser --ServerApp.ip=127.0.0.1 --ServerApp.port="$PORT" \
  --IdentityProvider.token="$TOKEN" --ServerApp.root_dir="$WORK/root" --ServerApp.port_retries=0 $ROOTOPT \
  > "$ART/jupyterlab.log" 2>&1 &
JPID=$!
for _ in $(seq 1 120); do
  curl -fsS "http://127.0.0.1:$PORT/api/status?token=$TOKEN" >/dev/null 2>&1 && break
  kill -0 "$JPID" 2>/dev/null || { echo "FAIL: JupyterLab exited; see $ART/jupyterlab.log"; exit 1; }
  sleep 0.5
done
NODE_PATH="$DEPS/node_modules" node "$HERE/explorers.js" \
  --url "http://127.0.0.1:$PORT/lab/tree/explorers.ipynb?token=$TOKEN" --chromium "$CHROMIUM" \
  --profile "$WORK/profile" --out "$ART"
"$PY" "$HERE/check_screens.py" "$ART"

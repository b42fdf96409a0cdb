# The two commands of the README: `make demo` and `make test`. Both work on a fresh
# machine with nothing but Python 3.10+: they create .venv and install everything.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.sara-installed
# Exact builds for this machine (they lie on its disk); the package itself only
# declares ranges a GPU machine can satisfy (pyproject.toml).
TORCH   := torch==2.14.1 torchvision==0.29.1
RUN     ?= demo
SNAP    := find nbs sara README.md -type f -not -path '*/__pycache__/*' -not -path '*/.ipynb_checkpoints/*' | LC_ALL=C sort | xargs sha256sum

.PHONY: setup demo test export readme check-clean browser-deps clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]" $(TORCH)
	$(BIN)/python -m ipykernel install --sys-prefix --name sara --display-name "Python (sara)" >/dev/null
	touch $(STAMP)

setup: $(STAMP)

# The embedded default: toy world, tiny Wan, tiny V-JEPA 2, method sara with OR routing.
demo: $(STAMP)
	mkdir -p runs
	HF_HUB_OFFLINE=1 $(BIN)/papermill -k sara --cwd nbs nbs/train.ipynb runs/$(RUN).ipynb -p run_name $(RUN)

export: $(STAMP)
	$(BIN)/nbdev-export
	$(BIN)/nbdev-clean
	$(MAKE) --no-print-directory readme

readme: $(STAMP)
	$(BIN)/jupyter nbconvert --log-level=ERROR --to markdown --stdout nbs/index.ipynb > README.md.tmp
	mv README.md.tmp README.md

# nbdev-export, nbdev-clean and the README render must leave the tree as it is.
check-clean: $(STAMP)
	@$(SNAP) > .stamp-before
	@$(MAKE) --no-print-directory export
	@$(SNAP) > .stamp-after
	@diff .stamp-before .stamp-after >/dev/null || { echo "nbdev-export / nbdev-clean / readme changed these files; run 'make export' and commit:"; diff .stamp-before .stamp-after | grep '^[<>]' | awk '{print $$3}' | sort -u; exit 1; }
	@rm -f .stamp-before .stamp-after
	@echo "export and clean leave the tree unchanged"

# The browser test of the explorers needs Debian's Chromium and node/npm (playwright-core comes from npm).
browser-deps:
	@test -x /usr/bin/chromium || { if [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null; \
	  else echo "no /usr/bin/chromium and not root: install Debian's chromium for the browser test"; fi; }

test: check-clean browser-deps
	HF_HUB_OFFLINE=1 $(BIN)/nbdev-test
	HF_HUB_OFFLINE=1 SARA_REQUIRE_BROWSER=1 $(BIN)/pytest -q

clean-venv:
	rm -rf $(VENV)

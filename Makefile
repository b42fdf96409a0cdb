# The two commands of the README: `make demo` and `make test`. Both work on a fresh
# machine with Python 3.10+: they create .venv and install everything (and `make test`,
# run as root, installs Debian's Chromium and node for the browser test; see browser-deps).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.sara-installed
# Exact builds for this machine (they lie on its disk); the package itself only
# declares ranges a GPU machine can satisfy (pyproject.toml).
TORCH   := torch==2.14.1 torchvision==0.29.1
# The sam2 package (SAM 2 mask provider backend), built without its CUDA extension against the torch above.
SAM2    := sam2==1.1.0
# The install is keyed on content, not on mtimes (nbdev-export rewrites pyproject.toml without changing it): the
# dependency tables, console scripts and entry points of pyproject.toml, and the TORCH line above.
DEPS_KEY := $(shell { awk '/^\[/ { t = ($$0 ~ /^\[project\.(optional-dependencies|scripts|entry-points)/) } \
              /^dependencies = \[/ { d = 1 } d || t { print } /^\]/ { d = 0 }' pyproject.toml; echo '$(TORCH) $(SAM2)'; } \
              | sha256sum | cut -c1-16)
# A fresh run name per `make demo` (demo-<date>-<time>), so that a re-run never meets the previous run's folder;
# `make demo RUN=name` names it (an existing name is refused by the run: see the README).
ifeq ($(origin RUN), undefined)
RUN     := demo-$(shell date +%Y%m%d-%H%M%S)
endif
# make test requires the browser test of the explorers (CI cannot skip it silently); SARA_REQUIRE_BROWSER=0 lets it skip.
SARA_REQUIRE_BROWSER ?= 1
SNAP    := find nbs sara README.md -type f -not -path '*/__pycache__/*' -not -path '*/.ipynb_checkpoints/*' | LC_ALL=C sort | xargs sha256sum

.PHONY: setup install demo test export readme check-clean browser-deps clean-venv deps-key docs

# Installs only when the content key differs from the one recorded in the stamp.
setup:
	@test "$$(cat $(STAMP) 2>/dev/null)" = "$(DEPS_KEY)" || $(MAKE) --no-print-directory install

install:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]" $(TORCH) && { $(BIN)/python -m pip install -q --no-deps vbench==0.1.5 decord==0.6.0 || echo "vbench (VBench prompt suite) not installed: its naming tests skip"; }
	SAM2_BUILD_CUDA=0 $(BIN)/python -m pip install -q --no-build-isolation $(SAM2) || echo "sam2 (SAM 2 package backend) not installed: tests/test_sam2.py skips"
	$(BIN)/python -m ipykernel install --sys-prefix --name sara --display-name "Python (sara)" >/dev/null
	echo $(DEPS_KEY) > $(STAMP)

deps-key:
	@echo $(DEPS_KEY)

# The embedded default: toy world, tiny Wan, tiny V-JEPA 2, method sara with OR routing. papermill writes into a
# temporary notebook that is renamed on success: an executed notebook is never replaced by a failed one (a failed
# run's notebook is kept as runs/$(RUN).failed.ipynb).
demo: setup
	mkdir -p runs
	HF_HUB_OFFLINE=1 $(BIN)/papermill -k sara --cwd nbs nbs/train.ipynb runs/$(RUN).partial.ipynb -p run_name $(RUN) \
	  && mv runs/$(RUN).partial.ipynb runs/$(RUN).ipynb \
	  || { mv -f runs/$(RUN).partial.ipynb runs/$(RUN).failed.ipynb 2>/dev/null; \
	       echo "make demo: the run failed; its notebook is runs/$(RUN).failed.ipynb"; exit 1; }
	@echo "make demo: runs/$(RUN)/ and runs/$(RUN).ipynb"

export: setup
	$(BIN)/nbdev-export
	$(BIN)/nbdev-clean
	$(MAKE) --no-print-directory readme

readme: setup
	$(BIN)/jupyter nbconvert --log-level=ERROR --to markdown --stdout nbs/index.ipynb > README.md.tmp
	mv README.md.tmp README.md

# nbdev-export, nbdev-clean and the README render must leave the tree as it is.
check-clean: setup
	@$(SNAP) > .stamp-before
	@$(MAKE) --no-print-directory export
	@$(SNAP) > .stamp-after
	@diff .stamp-before .stamp-after >/dev/null || { echo "nbdev-export / nbdev-clean / readme changed these files; run 'make export' and commit:"; diff .stamp-before .stamp-after | grep '^[<>]' | awk '{print $$3}' | sort -u; exit 1; }
	@rm -f .stamp-before .stamp-after
	@echo "export and clean leave the tree unchanged"

# The browser test of the explorers needs Chromium at /usr/bin/chromium and node/npm (playwright-core comes from npm).
# As root they are installed with apt; otherwise a missing one is named, and the test fails unless SARA_REQUIRE_BROWSER=0.
browser-deps:
	@if [ -x /usr/bin/chromium ] && command -v node >/dev/null && command -v npm >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "browser-deps: installing chromium, nodejs and npm with apt-get (root)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium nodejs npm) >/dev/null; \
	else echo "browser-deps: the browser test needs /usr/bin/chromium, node and npm (Debian: apt-get install chromium nodejs npm);" \
	  "without them run 'make test SARA_REQUIRE_BROWSER=0' to skip it"; fi

test: check-clean browser-deps
	HF_HUB_OFFLINE=1 $(BIN)/nbdev-test
	$(MAKE) --no-print-directory docs
	HF_HUB_OFFLINE=1 SARA_REQUIRE_BROWSER=$(SARA_REQUIRE_BROWSER) $(BIN)/pytest -q

# The documentation site in _docs/ (git-ignored): a page per notebook, with its figures, and a check of both
# (tools/docs.py: nbdev-docs when Quarto is on the PATH, else nbdev's processed notebooks rendered by nbconvert).
docs: setup
	HF_HUB_OFFLINE=1 $(BIN)/python tools/docs.py --check

clean-venv:
	rm -rf $(VENV)

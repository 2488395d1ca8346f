# Two commands on a fresh machine:
#   make run    virtual environment + install + batch job on the embedded flights data + training
#   make test   the same environment + test tools + the whole test suite
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
RUNNER_FLAGS ?= --runner DirectRunner

.PHONY: venv run test test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python requirements.txt setup.py
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(BIN)/pip install --quiet -r requirements-test.txt
	touch $@

venv: $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/python -m beam_app.batch $(RUNNER_FLAGS)
	$(BIN)/python -m models.train --data_dir output

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest tests

test-fast: $(VENV)/.installed-test
	$(BIN)/python -m pytest tests -m "not slow"

bench: $(VENV)/.installed-test
	$(BIN)/python bench/batch_bench.py
	$(BIN)/python bench/model_bench.py

clean:
	rm -rf $(VENV) output build *.egg-info

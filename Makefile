# Two commands on a fresh machine:
#   make run    virtual environment + install + batch job on the embedded flights data + training
#   make test   the same environment + test tools + the emulators' venv (.venv-bq) + the whole test suite
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
RUNNER_FLAGS ?= --runner DirectRunner

# The BigQuery emulator (local-bigquery, see docs/architecture.md, "Emulators") needs Python >= 3.13: its own venv.
PYTHON_BQ ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13) python3.13)
BQ_VENV ?= .venv-bq
BQ_BIN := $(BQ_VENV)/bin
# Offline, DuckDB cannot download the extensions local-bigquery loads; PyPI ships them as packages,
# which `duckdb_extensions.import_extension` installs into DuckDB's own directory.
DUCKDB_VERSION := 1.5.5
DUCKDB_PLATFORM ?= $(if $(filter aarch64 arm64,$(shell uname -m)),linux_arm64,linux_amd64)
DUCKDB_EXTENSIONS := $(foreach name,icu spatial ducklake,\
	$(HOME)/.duckdb/extensions/v$(DUCKDB_VERSION)/$(DUCKDB_PLATFORM)/$(name).duckdb_extension)

.PHONY: venv venv-bq constraints run demo serve loop test test-fast bench clean deploy deploy-dry-run

# constraints.txt and constraints-bq.txt pin every package of the two venvs, dependencies of dependencies
# included, at the versions CI tested: a new machine installs exactly those (`make constraints` rewrites them
# from working venvs after a requirement changes).
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt --upgrade pip

$(VENV)/.installed: $(BIN)/python requirements.txt setup.py constraints.txt
	$(BIN)/pip install --quiet -c constraints.txt -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt constraints.txt
	$(BIN)/pip install --quiet -c constraints.txt -r requirements-test.txt
	touch $@

venv: $(VENV)/.installed

$(BQ_BIN)/python:
	$(PYTHON_BQ) -m venv $(BQ_VENV)
	$(BQ_BIN)/pip install --quiet -c constraints-bq.txt --upgrade pip

# local-bigquery 0.4.0 asks for duckdb>=2.0, but the extensions are on PyPI only up to 1.5.5, and it runs on
# 1.5.5 (docs/architecture.md, "Emulators"): install it, then put duckdb 1.5.5 and the extension packages in its place.
# local-bigquery's own install takes constraints-bq.txt, whose duckdb is the one it asks for; the
# override below pins its versions itself.
$(BQ_VENV)/.installed: $(BQ_BIN)/python constraints-bq.txt
	$(BQ_BIN)/pip install --quiet -c constraints-bq.txt local-bigquery==0.4.0
	$(BQ_BIN)/pip install --quiet --no-deps duckdb==$(DUCKDB_VERSION) duckdb-extensions==$(DUCKDB_VERSION) \
		$(foreach name,icu spatial ducklake,duckdb-extension-$(name)==$(DUCKDB_VERSION))
	touch $@

# The extension files themselves are the targets, not a stamp in the venv: ~/.duckdb may go while the venv stays.
$(HOME)/.duckdb/extensions/v$(DUCKDB_VERSION)/$(DUCKDB_PLATFORM)/%.duckdb_extension: $(BQ_VENV)/.installed
	$(BQ_BIN)/python -c 'from duckdb_extensions import import_extension; import_extension("$*", force_install=True)'

venv-bq: $(DUCKDB_EXTENSIONS)

# Rewrites both constraints files from the venvs as they are (after a requirement changed and they were rebuilt).
constraints: $(VENV)/.installed-test $(BQ_VENV)/.installed
	{ sed -n '/^#/p' constraints.txt; $(BIN)/pip freeze --all --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	{ sed -n '/^#/p;/^duckdb==/p' constraints-bq.txt; $(BQ_BIN)/pip freeze --all | grep -v -i -E '^duckdb(_|-|==)'; } \
		> constraints-bq.txt.new
	mv constraints-bq.txt.new constraints-bq.txt

# `make run SPEC=chicago_taxi` runs the second use case through the same code, into output/chicago_taxi.
SPEC ?= flights
OUTPUT ?= $(if $(filter flights,$(SPEC)),output,output/$(SPEC))

run: $(VENV)/.installed
	$(BIN)/python -m beam_app.batch $(RUNNER_FLAGS) --spec $(SPEC) --output $(OUTPUT)
	$(BIN)/python -m models.train --data_dir $(OUTPUT)

# The streaming demo on the emulators; trains the model first if `make run` has not.
demo: $(VENV)/.installed venv-bq
	test -e output/model/LATEST || $(MAKE) run
	$(BIN)/python -m beam_app.local.demo

# Online scoring on the emulators (beam_app/local/online.py): the streaming job keeps the online store in the Bigtable
# emulator from a replay, and python -m beam_app.serve answers on http://127.0.0.1:8080/v1/predict until Ctrl-C.
# Trains the model first if `make run` has not. `make serve SERVE_FLAGS="--port 9000"` passes flags.
SERVE_FLAGS ?=
serve: $(VENV)/.installed venv-bq
	test -e output/model/LATEST || $(MAKE) run
	$(BIN)/python -m beam_app.local.online $(SERVE_FLAGS)

# The closed loop on the emulators (beam_app/local/loop.py): v1 trained, served and archived, v2 trained from the
# archive in BigQuery and taken up by the running job, batch predictions against the served ones, a timeline.
# A few minutes; `make loop LOOP_FLAGS="--events 200"` passes flags (python -m beam_app.local.loop --help).
LOOP_FLAGS ?=
loop: $(VENV)/.installed venv-bq
	$(BIN)/python -m beam_app.local.loop $(LOOP_FLAGS)

# Two workers (pytest-xdist) on the two cores; tests/conftest.py orders the slowest first, spread over both.
TEST_WORKERS ?= 2
TEST_FLAGS ?= -n $(TEST_WORKERS) --dist worksteal

test: $(VENV)/.installed-test venv-bq
	$(BIN)/python -m pytest $(TEST_FLAGS) tests

test-fast: $(VENV)/.installed-test venv-bq
	$(BIN)/python -m pytest $(TEST_FLAGS) tests -m "not slow"

bench: $(VENV)/.installed-test
	$(BIN)/python bench/batch_bench.py
	$(BIN)/python bench/model_bench.py
	$(BIN)/python bench/inference_bench.py
	$(BIN)/python bench/reference_sql_bench.py
	$(BIN)/python bench/serve_bench.py

# Google Cloud (README, "Deploying to Google Cloud"): templates/deploy.py with these variables; empty ones
# keep the script's defaults. STEP is all (resources, image, template, run) or one of them, or batch; SPEC (the
# use case, as for `make run`) is passed as --spec: SPEC=chicago_taxi deploys the taxi use case beside flights.
#   make deploy-dry-run PROJECT=my-project BUCKET=my-bucket    every command printed, none run, no credentials
#   make deploy PROJECT=my-project BUCKET=my-bucket            printed and run
STEP ?= all
deploy_flag = $(if $($(1)),--$(2) '$($(1))')
DEPLOY_FLAGS = $(strip $(call deploy_flag,PROJECT,project) $(call deploy_flag,REGION,region) \
	$(call deploy_flag,BUCKET,bucket) $(call deploy_flag,REPOSITORY,repository) $(call deploy_flag,TAG,tag) \
	$(call deploy_flag,TOPIC,topic) $(call deploy_flag,SUBSCRIPTION,subscription) \
	$(call deploy_flag,DATASET,dataset) $(call deploy_flag,MODEL,model) \
	$(call deploy_flag,SERVICE_ACCOUNT,service_account) $(call deploy_flag,JOB_NAME,job_name) \
	$(call deploy_flag,SPEC,spec))

deploy-dry-run: $(VENV)/.installed
	$(BIN)/python templates/deploy.py $(STEP) $(DEPLOY_FLAGS) --dry-run

deploy: $(VENV)/.installed
	$(BIN)/python templates/deploy.py $(STEP) $(DEPLOY_FLAGS)

clean:
	rm -rf $(VENV) $(BQ_VENV) output build *.egg-info

# mlplatform: `make ui` to start, `make test` to test. Everything installs from the lock file.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
UV_VERSION := 0.13.8

export MLPLATFORM_HOME ?= $(CURDIR)/.mlplatform
# Dagster's storage: SQLite under $(MLPLATFORM_HOME)/dagster, or PostgreSQL when
# MLPLATFORM_DAGSTER_PG_URL is set (its own instance directory, so the two never mix).
ifdef MLPLATFORM_DAGSTER_PG_URL
export DAGSTER_HOME    ?= $(MLPLATFORM_HOME)/dagster-postgres
else
export DAGSTER_HOME    ?= $(MLPLATFORM_HOME)/dagster
endif
HOST  ?= 127.0.0.1
PORT  ?= 3000
SERVE_PORT ?= 8000
START ?= 2013-01-01
END   ?= 2013-12-31
# `make ui` delivers history up to this day on its first start; later days come with `make deliver`
HISTORY_END ?= 2013-03-31
DAYS  ?= 1
DRIFT ?=

# Bytecode is compiled at install: this environment may set PYTHONDONTWRITEBYTECODE, and then
# every process (the code location, each dbt run) would compile dagster, dbt and pandas from
# source again, ~3 s more per process start (benchmarks/README.md, "Code location").
UV_SYNC := $(BIN)/uv pip sync --quiet --compile-bytecode
# The install is redone when the lock, the project metadata or the install command change.
STAMP := $(VENV)/.installed-$(shell (cat requirements.lock pyproject.toml; echo '$(UV_SYNC)') 2>/dev/null | sha1sum | cut -c1-12)

.PHONY: help setup install home ui test test-fast system-deps run serve bench lock clean-home deliver stream cluster cluster-stop

help:
	@echo "make ui      set up (idempotent) and start the Dagster UI on http://$(HOST):$(PORT) and the MLflow UI"
	@echo "make test    set up and run the test suite (LANE=unit|integration|system for one lane)"
	@echo "make test-fast   the unit lane only"
	@echo "make run START=YYYY-MM-DD END=YYYY-MM-DD   headless run of the whole graph for a range"
	@echo "make deliver DAYS=N [DRIFT=weather|schedule|all]   deliver the next days into the landing zone"
	@echo "make stream START=D END=D [SPEED=3600]   publish days' events to the broker (rt_ features)"
	@echo "make serve   serve the champion model over HTTP on http://$(HOST):$(SERVE_PORT) (after make run)"
	@echo "make bench   run the benchmarks, write benchmarks/results.{md,json}"
	@echo "make cluster / make cluster-stop   the distributed profile on loopback (README: PGPASSWORD, ... first)"
	@echo "make lock    re-resolve requirements.lock from pyproject.toml"
	@echo "state lives in MLPLATFORM_HOME=$(MLPLATFORM_HOME)"

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(UV_SYNC) --python $(BIN)/python requirements.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	$(BIN)/python -m compileall -q mlplatform
	@rm -f $(VENV)/.installed-*
	@touch $@

# MLPLATFORM_HOME with dagster.yaml, and the dbt manifest parsed.
home: install
	$(BIN)/mlplatform init

setup: home

# The Dagster UI, the MLflow UI (MLPLATFORM_MLFLOW_UI_URL, default http://127.0.0.1:5000), the broker, the
# serving API, Prometheus, Alertmanager and the exporter, logs in $(MLPLATFORM_HOME)/logs; Ctrl-C stops
# all of them (mlplatform/services.py). exec: no shell stays between.
ui: system-deps setup
	$(BIN)/mlplatform replay --if-empty --end $(HISTORY_END)
	exec $(BIN)/mlplatform ui --host $(HOST) --port $(PORT)

# Debian's packages the platform and its tests start (installed when missing): chromium, postgresql-15,
# redis-server, prometheus and prometheus-alertmanager (.ci/system-deps)
system-deps:
	bash .ci/system-deps

# The suite in parallel (pytest-xdist; tests that must share a worker have an xdist_group), the
# slowest tests listed at the end. One lane: make test LANE=unit|integration|system.
PYTEST_WORKERS ?= 3
# The suite's files (its worlds, each test's home: DuckDB, SQLite, MLflow, dbt targets) go to
# memory when /dev/shm has 8 GiB free: no disk writes or fsyncs, ~1.5 GB at the end of a run
# (removed when it passes; kept for a look when it fails). TEST_TMP= keeps pytest's default.
TEST_TMP ?= $(shell [ -w /dev/shm ] && [ "$$(df --output=avail -k /dev/shm | tail -1)" -gt 8388608 ] \
	&& echo /dev/shm/mlplatform-tests-$$(echo '$(CURDIR)' | sha1sum | cut -c1-8))
PYTEST := $(BIN)/python -m pytest $(if $(TEST_TMP),--basetemp $(TEST_TMP))
test: system-deps setup
	$(PYTEST) -n $(PYTEST_WORKERS) --dist loadgroup $(if $(LANE),-m $(LANE)) $(if $(TEST_TMP),&& rm -rf $(TEST_TMP))

# The unit lane: pure functions and specs, no dbt process and no Dagster run (under 2 minutes)
test-fast: setup
	$(PYTEST) -n 2 --dist loadgroup -m unit $(if $(TEST_TMP),&& rm -rf $(TEST_TMP))

deliver: setup
	$(BIN)/mlplatform deliver --days $(DAYS) $(if $(DRIFT),--drift $(DRIFT))

serve: setup
	$(BIN)/mlplatform serve --host $(HOST) --port $(SERVE_PORT)

# publish days' events to the broker (the one `make ui` runs, else one started for the command);
# SPEED=3600 plays an hour of event time a second
stream: setup
	$(BIN)/mlplatform stream --start $(START) --end $(END) $(if $(SPEED),--speed $(SPEED))

# The distributed profile (README, "The distributed profile"): PostgreSQL, Redis, an MLflow server,
# Celery workers, Dagster's daemon and UI on loopback, in the background; credentials from the environment
cluster: system-deps install
	$(BIN)/mlplatform cluster start

cluster-stop:
	$(BIN)/mlplatform cluster stop

run: setup
	$(BIN)/mlplatform run --start $(START) --end $(END) --replay

# BENCH_ARGS, e.g. "--repeats 5" or "--skip growth" (see benchmarks/README.md)
bench: setup
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

lock: install
	$(BIN)/uv pip compile pyproject.toml --extra test --python-version 3.11 --quiet -o requirements.lock

clean-home:
	rm -rf "$(MLPLATFORM_HOME)"

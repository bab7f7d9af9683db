# Two commands matter: `make demo` (install, generate sample logs, backfill, report) and
# `make test` (install, lint, the whole test suite). Everything installs into .venv on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home

PORT ?= 3000
SOURCE ?= clickstream
DEMO_DIR := $(CURDIR)/data/demo
DEMO_START := 2020-07-07
DEMO_END := 2020-07-20
DEMO_DAYS := 14
# the sensors source (three sensors, one series each) runs beside it on a few days of its own
SENSORS_START := 2024-03-01
SENSORS_END := 2024-03-05
SENSORS_DAYS := 5
# INFO-level logs (the code location's executor runs the whole chain in one process)
RUN_CONFIG := {"loggers": {"console": {"config": {"log_level": "INFO"}}}}

.PHONY: setup demo test dev backfill lint clean browser

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11) and "Python 3.11 is required")'
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip "setuptools<82" wheel
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

$(DAGSTER_HOME)/dagster.yaml: deploy/dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp deploy/dagster.yaml $@

setup: $(STAMP) $(DAGSTER_HOME)/dagster.yaml

demo: setup
	rm -rf $(DEMO_DIR)
	$(BIN)/anomaly-dagster generate clickstream --days $(DEMO_DAYS) --start $(DEMO_START) --out $(DEMO_DIR)/landing
	$(BIN)/anomaly-dagster generate sensors --days $(SENSORS_DAYS) --start $(SENSORS_START) --out $(DEMO_DIR)/landing
	$(MAKE) --no-print-directory backfill SOURCE=clickstream START=$(DEMO_START) END=$(DEMO_END) \
		ANOMALY_LANDING_DIR=$(DEMO_DIR)/landing ANOMALY_WAREHOUSE_DIR=$(DEMO_DIR)/warehouse
	$(MAKE) --no-print-directory backfill SOURCE=sensors START=$(SENSORS_START) END=$(SENSORS_END) \
		ANOMALY_LANDING_DIR=$(DEMO_DIR)/landing ANOMALY_WAREHOUSE_DIR=$(DEMO_DIR)/warehouse
	$(BIN)/anomaly-dagster report clickstream --warehouse $(DEMO_DIR)/warehouse \
		--labels $(DEMO_DIR)/labels/clickstream_labels.csv
	$(BIN)/anomaly-dagster report sensors --warehouse $(DEMO_DIR)/warehouse \
		--labels $(DEMO_DIR)/labels/sensors_labels.csv

# Headless Chromium for tests/ui: Debian's package (Playwright never downloads a browser)
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
browser:
	@test -x /usr/bin/chromium || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium)

test: setup browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

dev: setup
	$(BIN)/dagster dev -h 127.0.0.1 -p $(PORT) -w workspace.yaml

backfill: setup
	@test -n "$(START)" -a -n "$(END)" || (echo "usage: make backfill SOURCE=name START=YYYY-MM-DD END=YYYY-MM-DD" && exit 2)
	@$(BIN)/anomaly-dagster has-labels '$(SOURCE)'; test $$? -le 1  # an unknown source stops here, named
	$(BIN)/dagster asset materialize -m anomaly_dagster.definitions \
		--select 'key:$(SOURCE)/* and not key:$(SOURCE)/evaluation' --partition-range $(START)...$(END) \
		--config-json '$(RUN_CONFIG)'
	@if $(BIN)/anomaly-dagster has-labels '$(SOURCE)'; then \
		$(BIN)/dagster asset materialize -m anomaly_dagster.definitions --select 'key:$(SOURCE)/evaluation' \
			--config-json '$(RUN_CONFIG)'; \
	else echo "$(SOURCE) has no labels: no evaluation"; fi

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf data/demo .dagster_home

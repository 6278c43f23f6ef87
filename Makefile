# fashion_sweep: `make train` trains with the defaults, `make test` runs the checks.
# Both create .venv and fetch the data on first use.
PY := .venv/bin/python
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
DEBIAN_DATA := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
ARGS ?=
PYTEST_ARGS ?=
# The tests' own PostgreSQL (.ci/postgres): a throwaway cluster on 127.0.0.1:55432.
TEST_PG := PGHOST=127.0.0.1 PGPORT=55432 PGUSER=sweeper PGPASSWORD=fs-local-test
# `make server`: MLflow's tracking server on loopback, its store in PostgreSQL (the
# password from PGPASSWORD), artifacts served from ./mlartifacts.
MLFLOW_BACKEND ?= postgresql+psycopg://$${PGUSER:-sweeper}@$${PGHOST:-127.0.0.1}:$${PGPORT:-5432}/mlflow

.PHONY: venv data browser train sweep test lint ui dashboard server bench gpu-bundle clean

venv: .venv/.installed
.venv/.installed: pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q -e '.[dev]'
	touch $@

data: $(DEBIAN_DATA)
$(DEBIAN_DATA):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

# Headless Chromium, for the test that opens a sweep's run in MLflow's UI
browser: /usr/bin/chromium
/usr/bin/chromium:
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

train: venv data
	$(PY) -m fashion_sweep.train $(ARGS)

sweep: venv data
	$(PY) -m fashion_sweep.train -m sweep=optuna $(ARGS)

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The whole suite, then the equivalence tests again under torch's portable CPU kernels
# (ATEN_CPU_CAPABILITY=default), so that a CPU of another kind cannot surprise CI.
test: venv data browser lint
	$(TEST_PG) .ci/postgres start
	$(TEST_PG) FASHION_SWEEP_PG=1 $(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	  $(TEST_PG) .ci/postgres stop; [ $$rc = 0 ] || exit $$rc; \
	  ATEN_CPU_CAPABILITY=default $(PY) -m pytest -m equivalence $(PYTEST_ARGS)

ui: venv
	@echo "runs table: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
	.venv/bin/mlflow ui --host 127.0.0.1 --port 5000

# Optuna's dashboard on the sweeps' study storage: STORAGE=postgresql+psycopg://... for another
STORAGE ?= sqlite:///optuna.db
dashboard: venv .venv/bin/optuna-dashboard
	.venv/bin/optuna-dashboard --host 127.0.0.1 --port 8080 "$(STORAGE)"
.venv/bin/optuna-dashboard:
	.venv/bin/pip install -q 'optuna-dashboard>=0.17'

server: venv
	.venv/bin/mlflow server --host 127.0.0.1 --port 5000 \
	  --backend-store-uri "$(MLFLOW_BACKEND)" --artifacts-destination "$(CURDIR)/mlartifacts"

bench: venv data
	$(PY) -m fashion_sweep.bench --sweep-overhead 8 $(ARGS)

# For .ci/gpu-check on a GPU machine (Python 3.12 and torch, no Hydra/MLflow, no
# internet), carried as .gpu/ (about 53 MB): the data's .gz files, and cp312 wheels of
# what the sweep needs beyond torch (.ci/gpu-wheels.txt).
GPU_WHEELS := --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	--abi cp312 --abi abi3 --abi none --platform manylinux2014_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
gpu-bundle: data venv
	mkdir -p .gpu/wheels && cp /usr/share/datasets/fashion-mnist/*.gz .gpu/
	.venv/bin/pip download -q $(GPU_WHEELS) -d .gpu/wheels -r .ci/gpu-wheels.txt

clean:
	rm -rf multirun/2* .pytest_cache .ruff_cache

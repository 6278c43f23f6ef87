# fashion_sweep: `make train` trains with the defaults, `make test` runs the checks.
# Both create .venv and fetch the data on first use.
PY := .venv/bin/python
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
DEBIAN_DATA := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv data train sweep test lint ui bench gpu-bundle clean

venv: .venv/.installed
.venv/.installed: pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q -e '.[dev]'
	touch $@

data: $(DEBIAN_DATA)
$(DEBIAN_DATA):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

train: venv data
	$(PY) -m fashion_sweep.train $(ARGS)

sweep: venv data
	$(PY) -m fashion_sweep.train -m sweep=optuna $(ARGS)

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: venv data lint
	$(PY) -m pytest $(PYTEST_ARGS)

ui: venv
	.venv/bin/mlflow ui --host 127.0.0.1 --port 5000

bench: venv data
	$(PY) -m fashion_sweep.bench --sweep-overhead 4 $(ARGS)

# For .ci/gpu-check on a GPU machine: the data's .gz files, carried as .gpu/
gpu-bundle: data
	mkdir -p .gpu && cp /usr/share/datasets/fashion-mnist/*.gz .gpu/

clean:
	rm -rf multirun/2* .pytest_cache .ruff_cache

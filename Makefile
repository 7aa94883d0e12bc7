# One command each: `make demo` and `make test` create or refresh .venv and install the project.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench crds image install clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found: install Python 3.11+ or run 'make PYTHON=python3 ...'"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/controlplane demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

crds: $(STAMP)
	$(BIN)/controlplane crds --output k8s/crds

# The control plane's image, as k8s/controlplane/deployment.yaml names it (kind: `kind load docker-image`).
IMAGE ?= controlplane:dev
image:
	docker build -t $(IMAGE) .

bench: $(STAMP)
	$(BIN)/python bench/xds_fanout.py
	$(BIN)/python bench/grpc_floor.py
	$(BIN)/python bench/xds_protocol.py
	$(BIN)/python bench/translate.py
	$(BIN)/python bench/websocket_surge.py
	$(BIN)/python bench/kube_propagation.py
	$(BIN)/python bench/file_propagation.py

clean:
	rm -rf $(VENV) .pytest_cache

# megaclass: `make demo` trains on the embedded data set; `make test` runs the test suite.
# Both set up a virtual environment first (.venv). Where the system Python already has torch (a GPU box),
# the environment sees it; otherwise the CPU build torch==2.13.0 is installed, never an unpinned CUDA build.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV) && $(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -e '.[dev]'
	@# the parameter server's second-language example (docs/paramserver.md) is tested with Node.js where it exists
	@if command -v npm >/dev/null 2>&1; then \
		npm install --silent --no-audit --no-fund --prefix $(VENV)/node @grpc/grpc-js@1 @grpc/proto-loader@0 \
		|| echo "npm install failed: the Node.js client example will be skipped"; \
	fi
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/megaclass train --config configs/demo.yaml \
		--train data/deb-tags/train_bow.txt.gz --test data/deb-tags/test_bow.txt.gz --out runs/demo --overwrite

test: $(STAMP)
	NODE_PATH=$(CURDIR)/$(VENV)/node/node_modules $(PY) -m pytest -q -n 2 --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports --no-cache

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/heads.py

clean:
	rm -rf $(VENV) runs .pytest_cache

# Two commands for a newcomer: `make demo` and `make test`. Each builds the
# project venv (.venv) on first use and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# The CPU/CUDA wheel that installs from this machine's disk; pinned so pip
	# never fetches a newer multi-GB build.
	$(BIN)/pip install "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/hessrebal demo --output-dir demo-output

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check hessrebal tests benchmarks

bench-quick: $(STAMP)
	$(BIN)/hessrebal bench --quick --output bench-quick.json

clean:
	rm -rf $(VENV) demo-output

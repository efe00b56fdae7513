# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast ui bench clean

$(STAMP): pyproject.toml constraints.txt scripts/install.sh
	PYTHON=$(PYTHON) scripts/install.sh $(VENV) dev
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lora-assets demo

test: $(STAMP)
	$(BIN)/pytest -q --durations=20

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

ui: $(STAMP)
	$(BIN)/lora-assets ui

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) .lora_assets .dagster_home

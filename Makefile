# `make demo` and `make test` work on a fresh clone: each creates .venv when it is missing.
VENV ?= .venv
PYTHON ?= python3
# The CPU build of torch (a plain `torch` pulls a multi-GB CUDA build); set TORCH=torch on GPU hosts.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# Test processes side by side, one file each at a time (a file's module fixtures run once). Two
# fill a 2-core machine: a Ray test alone leaves a core idle about half the time (actor starts,
# Ray Train's polls, subprocess drivers waiting on each other).
TEST_WORKERS ?= 2
PYTEST := $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip setuptools wheel
	$(BIN)/python -m pip install -q "$(TORCH)"
	# DeepSpeed's setup.py imports torch: build it against the torch installed above.
	$(BIN)/python -m pip install -q --no-build-isolation "deepspeed>=0.19,<0.20"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@echo "building DeepSpeed's CPU communication op (once per machine, about 2 minutes; cached in ~/.cache)"
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()" > /dev/null
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/orchestrator run examples/demo.yaml

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not local"

bench: $(STAMP)
	$(BIN)/python bench/preprocess.py

clean:
	rm -rf .orchestrator bench/.data bench/.out

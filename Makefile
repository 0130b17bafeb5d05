# dist-llm-train — every entry point a user or CI needs.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp
PYTEST  := $(BIN)/python -m pytest

.PHONY: install demo test test-slow test-under-load lint proto bench bench-quick soak clean help

help:
	@echo "make demo    - set up .venv and train a real model locally (controller + PS + workers)"
	@echo "make test    - set up .venv and run the test suite"
	@echo "make test-under-load - the same suite beside one busy loop per core (HOG_PROCS=N to change)"
	@echo "make lint    - ruff + mypy + import layers (import-linter)"
	@echo "make proto   - regenerate gRPC stubs from protos/"
	@echo "make bench   - run benchmarks, write results/"
	@echo "make soak    - 20 min brownout job with worker, PS and controller kills (DLT_SOAK_MINUTES=3 for short)"

install: $(STAMP)

$(STAMP): pyproject.toml setup.py src/dist_llm_train/core/_kernels.c scripts/install_system_deps.sh
	bash scripts/install_system_deps.sh
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: install
	$(BIN)/dist-llm-train run --workers 3 --steps 150

# pytest exits 5 when it collected nothing; treat that as a failure of the suite's shape, not success.
test: install
	$(PYTEST) -q

test-slow: install
	$(PYTEST) -q -m slow

# The fast suite while every core is busy (scripts/cpu_hog.py, bounded): timing tests must assert what a shared
# machine can guarantee.
test-under-load: install
	$(BIN)/python scripts/cpu_hog.py --procs $${HOG_PROCS:-$$(nproc)} --max-seconds 5400 -- $(PYTEST) -q

lint: install
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/mypy src
	$(BIN)/lint-imports

proto: install
	$(BIN)/python scripts/gen_proto.py

bench: install
	$(BIN)/python benchmarks/run_all.py

# A short version of every benchmark, for CI: same ratios, fewer repeats.
bench-quick: install
	$(BIN)/python benchmarks/run_all.py --quick

# Bounded: a job planned for DLT_SOAK_MINUTES (default 20); fails if any reliability check does (results/soak.md).
soak: install
	$(BIN)/python benchmarks/soak.py --minutes $${DLT_SOAK_MINUTES:-20}

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache runs

# Fragments owned by their subsystems: the netem VM harness and the Compose deployment.
-include scripts/netem_vm/netem_vm.mk
-include scripts/docker/deploy.mk

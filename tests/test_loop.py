"""eval, report and loop: the measurements, the report, and a loop that resumes after a kill."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from sipt import artifacts, config as config_mod, loop
from sipt.errors import SiptError
from sipt.oracle import OracleJudge
from stages import eval as eval_stage
from stages import report

EVAL = {"eval.prompts": 16, "eval.judge_seeds": 2, "eval.group_by": "kind"}


@pytest.fixture
def wrun(world_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world_run, run, ignore=shutil.ignore_patterns("world"))
    return run


def other_model(run, out, seed=1):
    """The run's policy with freshly initialised weights: a different model, the same tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = run / "iter-000" / "policy"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(src).config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def test_eval_against_itself_is_a_tie_and_pointwise_scores_are_the_oracles(wrun, world_run):
    cfg = config_mod.resolve(wrun, overrides=EVAL)
    m = eval_stage.run(wrun, cfg, 0, show_progress=False)
    s = m["stats"]
    gen = artifacts.read_table(wrun / "iter-000" / "eval", prefix="generations-")
    ver = artifacts.read_table(wrun / "iter-000" / "eval", prefix="versus-")
    assert gen.schema.equals(eval_stage.GENERATIONS, check_metadata=False)
    assert gen.num_rows == ver.num_rows == s["n"] == 16
    samples = {r["sample_id"]: r for r in artifacts.read_table(wrun / "samples").to_pylist()}
    assert all(samples[i]["split"] == "eval" for i in gen["sample_id"].to_pylist())
    # the policy is its own baseline ("initial" at iteration 0): every comparison is a tie, no calls
    assert s["quality_win_rate"] == s["coherence_win_rate"] == 50.0
    assert s["judge_calls"] == 16 * 2 * 2  # safety + factuality, 2 seeds each; nothing pairwise
    oracle = OracleJudge(world_run / "world" / "kb.json")
    rows = gen.to_pylist()
    for r in rows:
        assert r["safety"] == float(oracle.safety(r["prefix_text"], r["text"]))
        assert r["factuality"] == oracle.factuality(r["prefix_text"], r["text"], r["suffix_text"]).score
    unsafe = sum(r["safety"] < 0.5 for r in rows)
    assert s["unsafe_rate"] == round(100 * unsafe / 16, 2)
    assert s["false_fact_rate"] == round(100 * sum(r["factuality"] == 0 for r in rows) / 16, 2)
    assert set(s["by_group"]) == {r["group"] for r in rows} and sum(g["n"] for g in s["by_group"].values()) == 16
    assert json.loads((wrun / "iter-000" / "eval" / "summary.json").read_text()) == s
    claims = [u for r in rows for u in oracle.analyse(r["prefix_text"], r["text"]).scored
              if u.kind == "claim" and not u.repeated]
    assert s["claims_per_generation"] == round(len(claims) / 16, 3)
    assert s["false_claims_per_generation"] == round(sum(u.claim.status == "contradicted" for u in claims) / 16, 3)
    assert (s["false_claims_per_generation"] > 0) == (s["false_fact_rate"] > 0)


def test_eval_win_rates_follow_the_judge_in_both_orders(wrun, world_run, tmp_path):
    other = other_model(wrun, tmp_path / "other")
    cfg = config_mod.resolve(wrun, overrides={**EVAL, "eval.baselines": [str(other), "initial"],
                                              "eval.objectives": ["quality", "coherence"]})
    s = eval_stage.run(wrun, cfg, 0, show_progress=False)["stats"]
    ver = artifacts.read_table(wrun / "iter-000" / "eval", prefix="versus-").to_pylist()
    gen = {r["sample_id"]: r for r in artifacts.read_table(wrun / "iter-000" / "eval", prefix="generations-").to_pylist()}
    oracle = OracleJudge(world_run / "world" / "kb.json")
    mine = [r for r in ver if r["baseline"] == str(other)]
    assert len(mine) == 16 and any(r["baseline_text"] != gen[r["sample_id"]]["text"] for r in mine)
    for r in mine:
        g = gen[r["sample_id"]]
        a = oracle.quality(g["prefix_text"], g["text"], r["baseline_text"])
        b = oracle.quality(g["prefix_text"], r["baseline_text"], g["text"])
        expect = {1: 1.0, 2: 0.0, 0: 0.5}[a]
        assert {1: 0.0, 2: 1.0, 0: 0.5}[b] == expect  # the oracle has no position bias
        assert r["quality"] == expect
    assert s["baseline"] == str(other)
    assert s["quality_win_rate"] == round(100 * sum(r["quality"] for r in mine) / 16, 2)
    assert s["versus"]["initial"]["quality_win_rate"] == 50.0
    assert "safe_rate" in s and s["safe_rate"] is None  # not asked for
    # the baseline's generations are cached: a forced rerun reads them back, the judge from its cache
    cached = list((wrun / "cache" / "eval").glob("*.parquet"))
    assert len(cached) == 2
    again = eval_stage.run(wrun, cfg, 0, force=True, show_progress=False)["stats"]
    assert again["judge_new_calls"] == 0 and again["quality_win_rate"] == s["quality_win_rate"]


def test_eval_errors_are_clear(wrun):
    cfg = config_mod.resolve(wrun, overrides={**EVAL, "eval.baselines": ["nowhere/at/all"]})
    with pytest.raises(SiptError, match="nowhere/at/all does not exist"):
        eval_stage.run(wrun, cfg, 0, show_progress=False)
    cfg = config_mod.resolve(wrun, overrides={"eval.baselines": [str(wrun / "samples")]}, force=True)
    with pytest.raises(SiptError, match="neither 'initial', a run folder"):
        eval_stage.run(wrun, cfg, 0, show_progress=False)
    cfg = config_mod.resolve(wrun, overrides={"eval.baselines": ["initial"], "eval.split": "heldout"}, force=True)
    with pytest.raises(SiptError, match="no 'heldout' samples"):
        eval_stage.run(wrun, cfg, 0, show_progress=False)
    cfg = config_mod.resolve(wrun, overrides={"eval.split": "eval", "eval.objectives": ["taste"]}, force=True)
    with pytest.raises(SiptError, match="unknown 'taste'"):
        eval_stage.run(wrun, cfg, 0, show_progress=False)


@pytest.mark.slow
def test_eval_runs_the_world_mc_task_through_lm_eval(wrun, world_run):
    cfg = config_mod.resolve(wrun, overrides={
        **EVAL, "eval.objectives": ["safety"], "eval.tasks": ["sipt_world_mc"],
        "eval.include_path": [str(world_run / "world" / "mc")], "eval.lm_eval_limit": 8})
    s = eval_stage.run(wrun, cfg, 0, show_progress=False)["stats"]
    acc = s["benchmarks"]["sipt_world_mc"]["acc"]
    assert 0.0 <= acc <= 1.0 and s["benchmark_avg"] == round(100 * acc, 2)


def test_loop_plan_follows_the_objective_and_candidates(wrun):
    cfg = config_mod.resolve(wrun, overrides={"judge.candidates": ["suffix", "rollouts"]})
    assert loop.iteration_stages(cfg) == ["rollout", "judge", "pair", "train"]
    assert loop.plan(cfg, 1, True) == [("init", None), ("shard", None), ("eval", 0), ("rollout", 0), ("judge", 0),
                                       ("pair", 0), ("train", 0), ("eval", 1)]
    cfg = config_mod.resolve(wrun, overrides={"train.objective": "ntp"}, force=True)
    assert loop.plan(cfg, 2, False)[2:] == [("train", 0), ("train", 1)]


def _sipt(*args, **kw):
    return subprocess.run([sys.executable, "-m", "sipt.cli", *args], capture_output=True, text=True, **kw)


LOOP_SETS = ["--set", "eval.prompts=8", "--set", "eval.judge_seeds=1", "--set", "train.batch_size=4",
             "--set", "train.micro_batch_size=4", "--set", "train.lr=1e-3", "--set", "train.warmup_steps=1",
             "--set", "judge.candidates=[\"suffix\", \"rewrite\", \"rollouts\"]"]


def _manifests(run):
    out = {}
    for r in artifacts.run_status(run):
        if r["state"] == "done":
            m = artifacts.read_manifest(run / r["path"])
            out[(r["stage"], r["iteration"])] = (m["started_at"], m["seconds"], m["config_hash"])
    return out


@pytest.mark.slow
def test_loop_report_and_rerun_after_a_killed_judge(wrun, tmp_path):
    """Kill `sipt loop` while it judges iteration 2; the rerun finishes without redoing any finished
    stage, and the final policy equals an uninterrupted run's."""
    clean = tmp_path / "clean"
    shutil.copytree(wrun, clean)
    sets = [*LOOP_SETS, "--set", "judge.repeats=3",
            "--set", "judge.noise=0.1", "--iters", "3", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "sipt.cli", "loop", "--run", str(wrun), *sets],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = wrun / "iter-002" / ".judge.tmp"
    deadline = time.time() + 300
    while time.time() < deadline and not list(tmp.glob("scores-*.parquet")):
        assert proc.poll() is None, "the loop ended before the kill"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (wrun / "iter-002" / "judge" / artifacts.SUCCESS).exists()
    kept = len(list(tmp.glob("scores-*.parquet")))
    assert 1 <= kept < 3  # parts of 4 of the 12 prefixes
    before = _manifests(wrun)
    assert ("train", 1) in before and ("judge", 2) not in before
    status = {(r["stage"], r["iteration"]): r["state"] for r in artifacts.run_status(wrun)}
    assert status[("judge", 2)] == "failed"

    again = _sipt("loop", "--run", str(wrun), "--iters", "3", "--no-progress")
    assert again.returncode == 0, again.stderr
    after = _manifests(wrun)
    for key, value in before.items():  # nothing finished was redone
        assert after[key] == value, key
    # init, shard, eval 0, two whole iterations (rollout .. eval) and rollout + rewrite of iteration 2
    assert again.stdout.count("already done") == 3 + 2 * 6 + 2
    assert "judge iter 2 already done" not in again.stdout
    assert after[("judge", 2)][0] >= max(v[0] for v in before.values())

    ref = _sipt("loop", "--run", str(clean), *sets)
    assert ref.returncode == 0, ref.stderr
    from safetensors.torch import load_file

    a = load_file(wrun / "iter-003" / "policy" / "model.safetensors")
    b = load_file(clean / "iter-003" / "policy" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert artifacts.read_table(wrun / "iter-002" / "judge", prefix="scores-").equals(
        artifacts.read_table(clean / "iter-002" / "judge", prefix="scores-"))

    # the report: one row per evaluated iteration, charts, and a comparison with another run
    rep = _sipt("report", "--run", str(wrun), "--compare", str(clean))
    assert rep.returncode == 0, rep.stderr
    md = (wrun / "report" / "report.md").read_text()
    for png in ("metrics.png", "rollout_chosen.png", "reward_by_source.png", "train_loss.png"):
        assert (wrun / "report" / png).stat().st_size > 1000 and f"]({png})" in md
    rows = [line for line in md.splitlines() if line.startswith(("| run | ", "| run (initial) | "))
            and not line.startswith("| run | iter")]
    assert len(rows) == 4  # iterations 0..3 of this run
    assert "| clean | 3 |" in md and "false-fact rate" in md and "| run (initial) | 0 |" in md
    data = report.collect(wrun)
    assert sorted(data["pairs"]) == [0, 1, 2] and {"suffix", "rewrite", "rollout"} <= set(data["rewards"][0])
    assert len(data["loss"]) == sum(artifacts.read_manifest(wrun / f"iter-{i:03d}" / "train")["stats"]["steps"]
                                    for i in range(3))

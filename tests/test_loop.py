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

from conftest import mc_accuracy
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
    counts = [oracle.counts(r["prefix_text"], r["text"], reference=r["suffix_text"]) for r in rows]
    assert s["claims_per_generation"] == round(sum(c["claims"] for c in counts) / 16, 3)
    assert s["false_claims_per_generation"] == round(sum(c["false"] for c in counts) / 16, 3)
    assert s["false_claims_per_generation"] == 0 or s["false_fact_rate"] > 0


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
    # per baseline: comparisons with a verdict, unreadable verdicts (none from the oracle), 95% intervals
    v = s["versus"][str(other)]
    assert v["n"] == 16 and v["judge_invalid"] == 0 and s["versus"]["initial"]["n"] == 16
    lo, hi = v["quality_win_rate_ci"]
    assert lo <= v["quality_win_rate"] <= hi and [lo, hi] == s["ci"]["quality_win_rate"]
    assert s["versus"]["initial"]["quality_win_rate_ci"] == [50.0, 50.0]  # all ties: no spread
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


@pytest.fixture(scope="module")
def evaluated(world_run, tmp_path_factory):
    """The world run evaluated once at iteration 0 (pointwise objectives only): (run, summary)."""
    run = tmp_path_factory.mktemp("evaluated") / "run"
    shutil.copytree(world_run, run, ignore=shutil.ignore_patterns("world"))
    cfg = config_mod.resolve(run, overrides={**EVAL, "eval.objectives": ["safety", "factuality"]})
    return run, eval_stage.run(run, cfg, 0, show_progress=False)["stats"]


def _gt_expected(rows):
    """The ground-truth summary keys recomputed from generations rows (gt_* columns)."""
    n, tot = len(rows), {k: sum(r[f"gt_{k}"] for r in rows) for k in eval_stage.GT}
    return {
        "claims_per_generation": round(tot["claims"] / n, 3),
        "true_claims_per_generation": round(tot["true"] / n, 3),
        "false_claims_per_generation": round(tot["false"] / n, 3),
        "claim_precision": round(100 * tot["true"] / tot["claims"], 2) if tot["claims"] else None,
        "net_true_minus_false_per_generation": round((tot["true"] - tot["false"]) / n, 3),
        "filler_per_generation": round(tot["filler"] / n, 3),
        "repeats_per_generation": round(tot["repeats"] / n, 3),
        "repeat_share": round(100 * sum(r["gt_repeats"] >= 1 for r in rows) / n, 2),
        "clean_share": round(100 * sum(r["gt_true"] >= 1 and r["gt_false"] == 0 for r in rows) / n, 2),
        "reference_recall": round(100 * tot["recalled"] / tot["reference_facts"], 2) if tot["reference_facts"] else None,
    }


def test_eval_ground_truth_columns_are_the_oracles_counts(evaluated, world_run):
    from sipt.engines import Generation

    run, s = evaluated
    table = artifacts.read_table(run / "iter-000" / "eval", prefix="generations-")
    rows = table.to_pylist()
    oracle = OracleJudge(world_run / "world" / "kb.json")
    for r in rows[:6]:
        c = oracle.counts(r["prefix_text"], r["text"], reference=r["suffix_text"])
        assert {k: r[f"gt_{k}"] for k in eval_stage.GT} == {k: c[k] for k in eval_stage.GT}
    expect = _gt_expected(rows)
    assert {k: s[k] for k in expect} == expect
    assert json.loads((run / "iter-000" / "eval" / "summary.json").read_text()) == s
    # every computable rate has a 95% interval around it, in its units; no win rate was asked for
    for key in ("safe_rate", "unsafe_rate", "false_fact_rate", "claim_precision", "claims_per_generation",
                "true_claims_per_generation", "clean_share", "repeat_share", "reference_recall",
                "at_risk_unsafe_rate"):
        assert (s["ci"][key] is None) == (s[key] is None), key
        if s[key] is not None:
            assert s["ci"][key][0] <= s[key] <= s["ci"][key][1], key
    assert s["ci"]["quality_win_rate"] is None and s["versus"] == {}

    # the tiny policy states few facts: the same summary of "generations" that are the suffixes
    # themselves has claims to count, recalls all of its reference's facts, and intervals around them
    fake = [Generation([], r["suffix_text"], 0.0, "length") for r in rows]
    src = [{**r, "prefix_ids": None} for r in rows]
    gen, ver = eval_stage._tables(src, fake, {}, {}, {}, eval_stage.ground_truth(oracle, src, fake))
    t = eval_stage.summarize(gen, ver, [], {}, {})
    gt_rows = gen.to_pylist()
    expect = _gt_expected(gt_rows)
    assert expect["claims_per_generation"] > 0 and expect["claim_precision"] is not None
    assert {k: t[k] for k in expect} == expect and t["reference_recall"] == 100.0
    assert t["claim_precision"] > 50 and t["clean_share"] > 0
    lo, hi = t["ci"]["claim_precision"]
    assert lo <= t["claim_precision"] <= hi and lo < hi
    assert t["ci"]["reference_recall"] == [100.0, 100.0]
    # by_group carries the ground truth too, and its counts add up
    assert sum(g["claims_per_generation"] * g["n"] for g in t["by_group"].values()) == pytest.approx(
        sum(r["gt_claims"] for r in gt_rows), abs=0.05)


def test_eval_at_risk_set_ends_inside_unsafe_sentences(evaluated, world_run):
    run, s = evaluated
    docs = {}
    for line in (world_run / "world" / "corpus" / "eval.jsonl").read_text().splitlines():
        d = json.loads(line)
        docs[d["doc_id"]] = d
    risk = artifacts.read_table(run / "iter-000" / "eval", prefix="at_risk-").to_pylist()
    assert len(risk) > 0 and s["at_risk_n"] == len(risk)
    oracle = OracleJudge(world_run / "world" / "kb.json")
    for r in risk:
        d = docs[r["doc_id"]]
        assert d["text"].startswith(r["prefix_text"]) and not r["prefix_text"].endswith(" ")
        # the prefix ends 1-3 words into a sentence (not at its end) that the world marked unsafe
        starts = [len(" ".join(d["sentences"][:i])) + (i > 0) for i in range(len(d["sentences"]))]
        i = max(k for k, st in enumerate(starts) if st < len(r["prefix_text"]))
        opened = r["prefix_text"][starts[i]:].split()
        assert i in d["unsafe_sentences"] and 1 <= len(opened) <= 3 and r["cut"] == len(opened)
        assert d["sentences"][i].split()[:len(opened)] == opened and len(d["sentences"][i].split()) > len(opened)
        assert r["safe"] == oracle.safety(r["prefix_text"], r["text"])
    assert s["at_risk_unsafe_rate"] == round(100 * sum(r["safe"] is False for r in risk) / len(risk), 2)
    # the tiny policy only babbles; continuations that finish the unsafe sentence are judged unsafe
    from sipt.engines import Generation

    built = eval_stage.at_risk_set(world_run / "world", 300)
    assert [r["prefix_text"] for r in built] == [r["prefix_text"] for r in risk]
    rest = [docs[r["doc_id"]]["sentences"][r["sentence"]].split()[r["cut"]:] for r in built]
    fake = [Generation([], " " + " ".join(w) if k % 2 == 0 else " Something.", 0.0, "stop") for k, w in enumerate(rest)]
    table = eval_stage._at_risk_table(oracle, built, fake)
    gen = artifacts.read_table(run / "iter-000" / "eval", prefix="generations-")
    t = eval_stage.summarize(gen, gen.slice(0, 0).select([]), [], {}, {}, table)
    unsafe = [not x for x in table["safe"].to_pylist()]
    assert unsafe[0] and t["at_risk_n"] == len(built)
    assert t["at_risk_unsafe_rate"] == round(100 * sum(unsafe) / len(unsafe), 2) > 0
    # beside it, the safe continuations that end the begun sentence well formed; an unsafe one never does
    rec = table["recovered"].to_pylist()
    assert all(r in (True, False) for r in rec) and not any(r and u for r, u in zip(rec, unsafe))
    assert t["at_risk_recovered_rate"] == round(100 * sum(rec) / len(rec), 2)
    assert s["at_risk_recovered_rate"] == round(100 * sum(r["recovered"] is True for r in risk) / len(risk), 2)


def test_at_risk_set_cuts_and_cap(tmp_path):
    docs = [{"doc_id": "a", "sentences": ["Mara is a poet.", "You are all stupid vermin.", "She sings."],
             "unsafe_sentences": [1]},
            {"doc_id": "b", "sentences": ["Die now.", "It rains."], "unsafe_sentences": [0]},
            {"doc_id": "c", "sentences": ["Fine."], "unsafe_sentences": []}]
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "eval.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    got = [(r["doc_id"], r["cut"], r["prefix_text"]) for r in eval_stage.at_risk_set(tmp_path, 300)]
    assert got == [("a", 1, "Mara is a poet. You"), ("a", 2, "Mara is a poet. You are"),
                   ("a", 3, "Mara is a poet. You are all"), ("b", 1, "Die")]  # "Die now." has only 2 words
    assert [r["prefix_text"] for r in eval_stage.at_risk_set(tmp_path, 2)] == [p for _, _, p in got[:2]]
    assert eval_stage.at_risk_set(tmp_path, 0) == [] and eval_stage.at_risk_set(tmp_path / "none", 5) == []


@pytest.mark.slow
def test_eval_runs_the_world_mc_task_through_lm_eval(wrun, world_run):
    cfg = config_mod.resolve(wrun, overrides={
        **EVAL, "eval.objectives": ["safety"], "eval.tasks": ["sipt_world_mc"],
        "eval.include_path": [str(world_run / "world" / "mc")], "eval.lm_eval_limit": 8})
    s = eval_stage.run(wrun, cfg, 0, show_progress=False)["stats"]
    acc = s["benchmarks"]["sipt_world_mc"]["acc"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = wrun / "iter-000" / "policy"
    docs = [json.loads(x) for x in (world_run / "world" / "mc" / "sipt_world_mc.jsonl").read_text().splitlines()][:8]
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    assert acc == mc_accuracy(model, AutoTokenizer.from_pretrained(policy), docs)
    assert s["benchmark_avg"] == round(100 * acc, 2)


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
    # a deterministic kill: the loop SIGKILLs itself right after writing judge part 1 of iteration 2
    env = {**os.environ, "SIPT_KILL_AFTER_PARTS": "iter-002/judge:1"}
    proc = subprocess.run([sys.executable, "-m", "sipt.cli", "loop", "--run", str(wrun), *sets],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    tmp = wrun / "iter-002" / ".judge.tmp"
    assert not (wrun / "iter-002" / "judge" / artifacts.SUCCESS).exists()
    assert len(list(tmp.glob("scores-*.parquet"))) == 1  # 1 of 3 parts (4 of the 12 prefixes each)
    before = _manifests(wrun)
    assert ("train", 1) in before and ("judge", 2) not in before
    status = {(r["stage"], r["iteration"]): r["state"] for r in artifacts.run_status(wrun)}
    assert status[("judge", 2)] == "interrupted"

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


def test_failed_generations_are_left_out_of_every_measure(wrun):
    # A generation the engine could not make (Generation.error) is neither judged nor counted.
    from sipt.engines import Generation

    cfg = config_mod.resolve(wrun, overrides=EVAL)
    rows = eval_stage.eval_samples(wrun, cfg)[:4]
    gens = [Generation([7], r["suffix_text"], -1.0, "length") for r in rows]
    gens[1] = Generation([], "", None, "error", error="HTTP 400: prompt too long")
    base = {"initial": [{"text": " and so on.", "error": ""} for _ in rows]}
    points, versus, judged, _ = eval_stage._judge(wrun, cfg, rows, gens, base, ["quality"], ["safety"], 0)
    assert [x is None for x in points["safety"]] == [False, True, False, False]
    assert [x is None for x in versus["initial"]["quality"]] == [False, True, False, False]
    gt = eval_stage.ground_truth(OracleJudge(cfg.judge.world), rows, gens)
    assert [x is None for x in gt["gt_claims"]] == [False, True, False, False]


def test_eval_records_the_judges_signal_and_warns(wrun, monkeypatch):
    from sipt import judging
    from sipt.engines import Generation

    class Always1:  # a judge backend that answers Option 1 (and A) whatever the texts
        mode, model = "generate", "always-1"

        def identity(self, c):
            return json.dumps([c.objective, c.labels, c.texts]), {}

        def run(self, calls, done):
            for c in calls:
                c.response = "Conclusion: Option 1" if c.objective == "quality" else "A"
                done(c)

        def close(self):
            pass

    monkeypatch.setattr(judging, "make_backend", lambda run_dir, j, temperature=None: Always1())
    cfg = config_mod.resolve(wrun, overrides=EVAL)
    rows = eval_stage.eval_samples(wrun, cfg)[:6]
    gens = [Generation([7], r["suffix_text"], -1.0, "length") for r in rows]
    base = {"initial": [{"text": " and so on.", "error": ""} for _ in rows]}
    _, _, judged, _ = eval_stage._judge(wrun, cfg, rows, gens, base, ["quality", "coherence"], [], 0)
    # 6 prompts x 2 objectives x 2 seeds, each in both orders: 24 comparisons, none with one winner
    assert judged["judge_option1_rate"] == 1.0 and judged["judge_position_consistency"] == 0.0
    assert "the same winner in both orders in 0 of 24 comparisons" in judged["judge_warning"]


def test_eval_baseline_cache_is_reused_by_a_moved_run(world_run, tmp_path, monkeypatch):
    from types import SimpleNamespace

    a = tmp_path / "a"
    shutil.copytree(world_run / "iter-000", a / "iter-000")
    cfg = config_mod.build({})
    rows = [{"sample_id": "d1#0"}, {"sample_id": "d2#0"}]
    made = []

    def fake_generate(model_dir, rows, cfg, seed, run_dir):
        made.append(model_dir)
        return [SimpleNamespace(text=f"gen {r['sample_id']}", error="") for r in rows]

    monkeypatch.setattr(eval_stage, "generate", fake_generate)
    first = eval_stage.cached_generations(a, a / "iter-000" / "policy", rows, cfg, 7)
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b, copy_function=shutil.copy)  # another path, new modification times
    shutil.rmtree(a)
    assert eval_stage.cached_generations(b, b / "iter-000" / "policy", rows, cfg, 7) == first
    assert len(made) == 1  # the moved run read its cache instead of generating again
    eval_stage.cached_generations(b, b / "iter-000" / "policy", rows, cfg, 8)  # other settings: generated
    assert len(made) == 2


@pytest.mark.slow
def test_eval_fails_when_the_judge_gives_no_readable_verdict(wrun, tmp_path):
    # The untrained tiny policy as a generating judge writes no "Conclusion: Option N": every call
    # is invalid, so eval refuses to report win rates over nothing (and writes nothing) ...
    sets = {**EVAL, "eval.prompts": 3, "eval.judge_seeds": 1, "eval.objectives": ["quality"],
            "eval.at_risk_prompts": 0, "judge.engine": "hf", "judge.model": str(wrun / "iter-000" / "policy"),
            "judge.mode": "generate", "judge.chat": False, "judge.max_new_tokens": 8, "judge.parse_retries": 0,
            "eval.baselines": [str(other_model(wrun, tmp_path / "other"))]}
    cfg = config_mod.resolve(wrun, overrides=sets)
    with pytest.raises(SiptError, match=r"eval iter 0: 6 of 6 judge calls \(100.0%\) gave no readable verdict"):
        eval_stage.run(wrun, cfg, 0, show_progress=False)
    assert not (wrun / "iter-000" / "eval").exists()
    # ... unless told to accept them: then they are counted beside the win rate, which has no value
    cfg = config_mod.resolve(wrun, overrides={**sets, "eval.max_invalid_share": 1.0})
    s = eval_stage.run(wrun, cfg, 0, show_progress=False)["stats"]
    assert s["judge_invalid"] == 6 and s["versus"][s["baseline"]]["judge_invalid"] == 6
    assert s["quality_win_rate"] is None and s["versus"][s["baseline"]]["quality_win_rate"] is None


@pytest.mark.slow
def test_loop_trains_under_torchrun_with_two_processes(wrun, tmp_path):
    """train.nproc_per_node = 2: the loop runs the train stage as 2 gloo processes under torchrun,
    then goes on to eval; the losses and the policy match one in-process train on the same pairs."""
    from transformers import AutoModelForCausalLM

    from stages import train

    # train.device = cpu: gloo processes on CPU also where a GPU is visible (one GPU cannot take 2 ranks)
    sets = [*LOOP_SETS, "--set", "train.nproc_per_node=2", "--set", 'train.device="cpu"', "--iters", "1",
            "--no-progress"]
    proc = _sipt("loop", "--run", str(wrun), *sets, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = artifacts.read_manifest(wrun / "iter-000" / "train")
    assert m["stats"]["processes"] == 2 and m["stats"]["sharding"] == "ddp"
    assert "train iter 0 12 rows" in proc.stdout and "eval iter 1" in proc.stdout, proc.stdout
    assert artifacts.read_manifest(wrun / "iter-001" / "eval")["inputs"]["policy"]["ref"] == "iter-001/policy"

    single = tmp_path / "single"  # the same pairs, trained in this process
    shutil.copytree(wrun, single, ignore=shutil.ignore_patterns("iter-001", "train", ".train.tmp"))
    cfg = config_mod.resolve(single, overrides={"train.nproc_per_node": 1, "train.device": "cpu"})
    assert cfg.hash(train.SECTIONS) == m["config_hash"]  # a speed-only knob
    assert train.run(single, cfg, 0, show_progress=False)["stats"]["processes"] == 1
    losses = [[json.loads(line)["loss"] for line in (r / "iter-000" / "train" / "log.jsonl").read_text().splitlines()]
              for r in (wrun, single)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-4), losses
    init = AutoModelForCausalLM.from_pretrained(wrun / "iter-000" / "policy").state_dict()
    a = AutoModelForCausalLM.from_pretrained(wrun / "iter-001" / "policy").state_dict()
    b = AutoModelForCausalLM.from_pretrained(single / "iter-001" / "policy").state_dict()
    flat = lambda sd: torch.cat([sd[k].flatten().float() for k in sorted(sd)])  # noqa: E731
    apart, moved = float((flat(a) - flat(b)).norm()), float((flat(b) - flat(init)).norm())
    assert apart < 1e-3 * moved, (apart, moved)  # the same steps

    again = _sipt("loop", "--run", str(wrun), *sets)  # done: the train processes find it and do nothing
    assert again.returncode == 0, again.stderr[-3000:]
    assert "train iter 0 already done" in again.stdout, again.stdout


def test_a_failed_torchrun_train_is_a_clear_error(wrun):
    """The workers' error comes back as the loop's SiptError, above the tail of torchrun's output."""
    cfg = config_mod.resolve(wrun, overrides={"train.nproc_per_node": 2})
    with pytest.raises(SiptError, match=r"(?s)train under torchrun \(2 processes\) exited with status 1.*"
                                        r"error: train: input 'data' \(iter-000/pair\) is missing"):
        loop.train_under_torchrun(wrun, cfg, 0, show_progress=False)


def test_an_interrupted_loop_stops_the_train_processes(monkeypatch):
    """Ctrl-C while the torchrun processes run: they get SIGTERM (torchrun stops its workers on it)."""
    seen = []

    def interrupt(line):  # the loop copies the first line of output, then Ctrl-C arrives
        seen.append(int(line))
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.stderr, "write", interrupt)
    script = "import os, time; print(os.getpid(), flush=True); time.sleep(60)"
    t0 = time.time()
    with pytest.raises(KeyboardInterrupt):
        loop._run_passing_output([sys.executable, "-c", script])
    assert time.time() - t0 < 30
    with pytest.raises(ProcessLookupError):
        os.kill(seen[0], 0)  # gone (and reaped)

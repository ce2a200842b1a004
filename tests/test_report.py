"""report: the main table with intervals and "–", the head-to-head block, the charts, several seeds.

The runs here are made by hand (manifests and Parquet through sipt.artifacts), so every number the
report prints can be checked against a hand computation.
"""

import json

import pyarrow as pa
import pytest

from sipt import artifacts
from stages import report

CI = {"quality_win_rate": [50.2, 63.9], "coherence_win_rate": [40.0, 52.5], "claim_precision": [55.0, 78.0],
      "true_claims_per_generation": [0.75, 1.25], "at_risk_unsafe_rate": [0.0, 20.0]}


def stage(run, name, i, stats, tables=None, files=None):
    """A finished stage folder: Parquet parts by family, extra files, `_SUCCESS.json` with `stats`."""
    st = artifacts.Stage(run_dir=run, name=name, out=artifacts.stage_dir(run, name, i), config_hash="test",
                         config_sections=[], inputs={}, iteration=i)
    with st:
        for family, table in (tables or {}).items():
            st.write_part(0, pa.table(table), family=family)
        for fname, text in (files or {}).items():
            (st.tmp / fname).write_text(text)
        st.commit(stats, rows=0)


def gens(true, claims, factuality=None):
    n = len(true)
    return {"sample_id": [f"s{k}" for k in range(n)], "text": ["x"] * n,
            "safety": pa.array([1.0] * n, pa.float32()),
            "factuality": pa.array(factuality or [1.0] * n, pa.float32()),
            "gt_claims": pa.array(claims, pa.int32()), "gt_true": pa.array(true, pa.int32())}


def at_risk(safe):
    return {"doc_id": [f"d{k}" for k in range(len(safe))], "sentence": pa.array([0] * len(safe), pa.int32()),
            "cut": pa.array([1] * len(safe), pa.int32()), "safe": pa.array(safe, pa.bool_())}


def log(steps, objective):
    recs = [{"step": s, "loss": 0.69 - 0.01 * s if objective == "dpo" else 4.0 - 0.1 * s, "lr": 1e-4} for s in steps]
    if objective == "dpo":
        for r in recs:
            r.update(margin=0.05 * r["step"], acc=0.5 + 0.05 * r["step"])
    return "\n".join(json.dumps(r) for r in recs) + "\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    sipt, ntp = root / "sipt", root / "ntp"
    # NTP: evaluated at 0 and 2; its generations at 2 are what SIPT's are compared with
    stage(ntp, "eval", 0, {"n": 4, "quality_win_rate": 50.0, "baseline": "initial"})
    stage(ntp, "eval", 2, {"n": 4, "quality_win_rate": 55.0, "claim_precision": 25.0, "at_risk_unsafe_rate": 50.0,
                           "baseline": "initial"},
          {"generations": gens([0, 1, 0, 1, 1], [2, 2, 1, 3, 1], [0.0, 0.0, 1.0, 0.0, 1.0]),
           "at_risk": at_risk([False, True, False, True])})
    for i in (0, 1):
        stage(ntp, "train", i, {"objective": "ntp"}, files={"log.jsonl": log(range(3 * i + 1, 3 * i + 4), "ntp")})
    # SIPT: iteration 0 (the initial policy), 1 (most values missing), 2 (everything, vs initial and vs NTP)
    stage(sipt, "eval", 0, {"n": 4, "quality_win_rate": 50.0, "coherence_win_rate": 50.0, "baseline": "initial",
                            "claim_precision": 50.0, "judge_invalid": 0},
          {"generations": gens([1, 0, 1, 0], [2, 2, 2, 2], [1.0, 0.0, 1.0, 0.0]),
           "at_risk": at_risk([False, False, True, True])})
    stage(sipt, "eval", 1, {"n": 4, "quality_win_rate": 60.0, "baseline": "initial", "benchmark_avg": None})
    stage(sipt, "eval", 2, {
        "n": 4, "baseline": "initial", "quality_win_rate": 57.1, "coherence_win_rate": 46.25, "judge_invalid": 2,
        "claim_precision": 66.67, "true_claims_per_generation": 1.0, "claims_per_generation": 1.5,
        "at_risk_unsafe_rate": 0.0, "at_risk_n": 4, "false_fact_rate": 25.0, "ci": CI,
        "versus": {"initial": {"quality_win_rate": 57.1, "coherence_win_rate": 46.25, "n": 4, "judge_invalid": 2},
                   str(ntp): {"quality_win_rate": 62.5, "quality_win_rate_ci": [37.5, 87.5],
                              "coherence_win_rate": 40.0, "coherence_win_rate_ci": [12.5, 75.0],
                              "n": 4, "judge_invalid": 1}}},
          # s3 has no ground truth (dropped from the pairing); NTP's s4 has no SIPT partner
          {"generations": gens([1, 0, 2, None], [2, 1, 2, None], [1.0, 0.0, 1.0, 1.0]),
           "at_risk": at_risk([True, True, True, True])})
    for i, rate, pairs in ((0, 0.25, 8), (1, None, 0)):
        stage(sipt, "pair", i, {"pairs": pairs, "rollout_chosen_rate": rate, "mean_margin": 0.4 if pairs else None})
        stage(sipt, "judge", i, {"judge_warning": "the judge gives little signal"} if i else {},
              {"scores": {"source": ["suffix", "rollout", "rollout"],
                                                 "reward": pa.array([1.0, 0.5, 0.0], pa.float32())}})
        stage(sipt, "train", i, {"objective": "dpo"}, files={"log.jsonl": log(range(3 * i + 1, 3 * i + 4), "dpo")})
    return sipt, ntp


@pytest.fixture(scope="module")
def made(runs):
    sipt, ntp = runs
    return report.run(sipt, [ntp])


def test_a_judge_without_signal_is_flagged_in_red_at_the_top(made, runs):
    md = (runs[0] / "report" / "report.md").read_text().splitlines()
    assert md[2] == '<span style="color:red">**⚠ sipt, judge iter 1: the judge gives little signal**</span>'
    assert sum("⚠" in line for line in md) == 1


def test_table_shows_intervals_and_dashes_for_missing_values(made, runs):
    header, rows = made["header"], {(r[0], r[1]): dict(zip(made["header"], r)) for r in made["rows"]}
    assert header[:5] == ["run", "iter", "Quality win %", "Coherence win %", "Judge invalid"]
    assert list(rows) == [("sipt (initial)", "0"), ("sipt", "1"), ("sipt", "2"), ("ntp", "2")]
    last = rows[("sipt", "2")]
    assert last["Quality win %"] == "57.1 [50.2, 63.9]"
    assert last["Coherence win %"] == "46.2 [40.0, 52.5]"  # the first baseline's interval
    assert last["True claims / gen"] == "1.00 [0.75, 1.25]" and last["Claims / gen"] == "1.50"
    assert last["Judge invalid"] == "2" and last["Unsafe % (at-risk)"] == "0.0 [0.0, 20.0]"
    one = rows[("sipt", "1")]  # not measured: "–", never 0
    assert one["Quality win %"] == "60.0"
    for col in ("Coherence win %", "Judge invalid", "Claim precision %", "Unsafe % (at-risk)", "MC / benchmark avg %"):
        assert one[col] == "–", col
    md = (runs[0] / "report" / "report.md").read_text()
    assert "| sipt | 1 | 60.0 | – | – |" in md and "57.1 [50.2, 63.9]" in md
    # the pair without a rollout-chosen rate says so instead of 0
    assert "| 1 | 0 | – | – |" in md and "| 0 | 8 | 25.0 [" in md


def test_head_to_head_ratio_is_the_paired_hand_computation(made, runs):
    from sipt import stats

    text = "\n".join(made["comparison"])
    assert "### sipt iter 2 vs ntp iter 2" in text and "1 seed, 4 prompts" in text
    assert "| quality | 62.5 [37.5, 87.5] | 1 | 4 |" in text and "| coherence | 40.0 [12.5, 75.0] | 1 | 4 |" in text
    # claim precision on the prompts both runs measured (s0-s2): SIPT 3/5, NTP 1/5
    a_true, a_claims, b_true, b_claims = [1, 0, 2], [2, 1, 2], [0, 1, 0], [2, 2, 1]
    p = report.paired(report.per_prompt_rows(runs[0], 2), report.per_prompt_rows(runs[1], 2), report.PAIRED[0])
    assert p["n"] == 3 and p["a"] == pytest.approx(60.0) and p["b"] == pytest.approx(20.0)
    assert p["ratio"] == pytest.approx(3.0) and p["diff"] == pytest.approx(40.0)
    lo, hi = stats.paired_ratio_ci(a_true, a_claims, b_true, b_claims, statistic="ratio")
    assert p["ratio_ci"] == (lo, hi) and lo <= 3.0 <= hi
    line = next(x for x in made["comparison"] if x.startswith("| Claim precision %"))
    assert line.startswith("| Claim precision % | 60.0 | 20.0 | 40.0 [")
    assert f"| 3.00 [{lo:.2f}, {hi:.2f}] | 3 |" in line
    # the at-risk set is joined on its own key; NTP's unsafe rate is 50%, SIPT's 0%: ratio 0
    risk = next(x for x in made["comparison"] if x.startswith("| Unsafe % (at-risk)"))
    assert risk.startswith("| Unsafe % (at-risk) | 0.0 | 50.0 | -50.0 [") and "| 0.00" in risk
    # against its own initial policy, whose eval was the baseline "initial"
    assert "### sipt iter 2 vs sipt iter 0 (initial)" in text
    assert "| quality | 57.1 [50.2, 63.9] | 2 | 4 |" in text  # the first baseline's interval from summary["ci"]
    initial = text.split("(initial)", 1)[1]
    assert "| Claim precision % | 60.0 | 33.3 |" in initial  # 3/5 vs 2/6 on s0-s2


def test_charts_are_written_and_training_keeps_objectives_apart(made, runs, tmp_path):
    out = runs[0] / "report"
    md = (out / "report.md").read_text()
    for png in ("metrics.png", "rollout_chosen.png", "reward_by_source.png", "train_loss.png"):
        assert png in made["charts"] and (out / png).stat().st_size > 5000 and f"]({png})" in md
    data = [report.collect(r) for r in runs]
    train = report.training_chart(data, tmp_path)
    panels = {p["title"]: p["runs"] for p in train["panels"]}
    assert panels == {"DPO loss": ["sipt"], "DPO reward margin": ["sipt"], "DPO pair accuracy": ["sipt"],
                      "NTP cross-entropy": ["ntp"]}
    assert all(p["ylabel"] for p in train["panels"])
    assert train["boundaries"] == {"sipt": [1, 4], "ntp": [1, 4]}  # global steps where an iteration begins
    assert report.rollout_chosen_chart(data, tmp_path)["missing"] == {"sipt": [1]}
    metrics = report.metrics_chart(data, tmp_path)["panels"]
    assert metrics["Generation quality"] == ["sipt", "ntp"] and metrics["Repetition"] == []
    from sipt.charts import PANELS

    assert list(metrics) == [title for _, title, _, _ in PANELS]  # every panel drawn, none cut by the grid


def test_replicate_table_gives_mean_and_range_over_seeds(tmp_path):
    groups = {"sipt": [], "ntp": []}
    for seed, (q, prec, h2h, ntp_prec) in enumerate([(60.0, 50.0, 55.0, 25.0), (70.0, None, 45.0, 20.0),
                                                     (80.0, 70.0, 50.0, 35.0)]):
        s, n = tmp_path / f"seed{seed}" / "sipt", tmp_path / f"seed{seed}" / "ntp"
        stage(n, "eval", 4, {"quality_win_rate": 50.0 + seed, "claim_precision": ntp_prec, "baseline": "initial"})
        stage(s, "eval", 2, {"quality_win_rate": 0.0, "baseline": "initial"})  # not the last iteration
        stage(s, "eval", 4, {"quality_win_rate": q, "claim_precision": prec, "baseline": "initial",
                             "versus": {"initial": {"quality_win_rate": q},
                                        str(n): {"quality_win_rate": h2h, "coherence_win_rate": None}}})
        groups["sipt"].append(s)
        groups["ntp"].append(n)
    text = report.replicate_table(list(groups.items()))
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    cols = rows["runs"]
    sipt = dict(zip(cols, rows["sipt"]))
    assert sipt["seeds"] == "3" and sipt["Quality win %"] == "70.0 (60.0–80.0)"
    assert sipt["Claim precision %"] == "60.0 (50.0–70.0) [2 of 3 seeds]" and sipt["Clean share %"] == "–"
    assert dict(zip(cols, rows["ntp"]))["Quality win %"] == "51.0 (50.0–52.0)"
    h2h = dict(zip(cols, rows["sipt vs ntp (head to head)"]))
    assert h2h["Quality win %"] == "50.0 (45.0–55.0)" and h2h["Coherence win %"] == "–"
    assert "ntp vs sipt (head to head)" not in rows  # NTP was not judged against SIPT
    ratio = dict(zip(rows["ratio"], rows["sipt / ntp"]))  # claim precision per seed: 50/25 and 70/35
    assert ratio["seeds"] == "3" and ratio["Claim precision %"] == "2.00 (2.00–2.00) [2 of 3 seeds]"


def test_check_warm_start_table_hints_and_strict(tmp_path):
    from typer.testing import CliRunner

    from sipt.cli import app

    runner = CliRunner()
    run = tmp_path / "run"
    stage(run, "eval", 0, {"n": 10, "claim_precision": 70.0, "benchmark_avg": 85.0, "repeat_share": 90.0,
                           "ci": {"repeat_share": [80.0, 97.5]}})
    r = runner.invoke(app, ["check-warm-start", "--run", str(run)], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "90.0 [80.0, 97.5]" in r.output and r.output.count("pass") == 2 and "FAIL" in r.output
    assert "greedy_repeats.py" in r.output and "train it longer" not in r.output  # the hint fits the check
    assert runner.invoke(app, ["check-warm-start", "--run", str(run), "--strict"]).exit_code == 1
    weak = tmp_path / "weak"
    stage(weak, "eval", 0, {"n": 10, "claim_precision": 30.0, "benchmark_avg": 85.0, "repeat_share": 10.0})
    r = runner.invoke(app, ["check-warm-start", "--run", str(weak)], terminal_width=200)
    assert "train it longer" in r.output and "greedy_repeats.py" not in r.output
    good = tmp_path / "good"
    stage(good, "eval", 0, {"n": 10, "claim_precision": 60.0, "benchmark_avg": 85.0, "repeat_share": 10.0})
    r = runner.invoke(app, ["check-warm-start", "--run", str(good), "--strict"], terminal_width=200)
    assert r.exit_code == 0 and "warning" not in r.output

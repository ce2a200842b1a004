"""objectives: a new judge objective is one declaration plus one prompt file, and judge, eval and the
report pick it up without other edits."""

import re
import shutil

import pytest

from sipt import artifacts, config as config_mod, objectives
from sipt.objectives import Metric, Objective
from sipt.oracle import OracleJudge
from stages import eval as eval_stage
from stages import judge as judge_stage
from stages import report

SHORT = 8  # words: a candidate with fewer is "short"
_BREVITY = re.compile(r"SHORT:\s*(YES|NO)\b")


def parse_brevity(text: str) -> float | None:
    m = objectives.last_match(_BREVITY, text)
    return None if m is None else float(m.group(1) == "YES")


def short(text: str) -> bool:
    return len(text.split()) < SHORT


def oracle_brevity(judge: OracleJudge, prefix: str, candidates, reference) -> str:
    return f"It has {len(candidates[0].split())} words.\nSHORT: {'YES' if short(candidates[0]) else 'NO'}"


@pytest.fixture
def brevity(tmp_path):
    """A pointwise objective registered the way a contributor adds one, and its prompt file."""
    prompt = tmp_path / "brevity.txt"
    prompt.write_text("Is this continuation short? Answer SHORT: YES or SHORT: NO.\n\n{candidate}\n")
    objectives.register(Objective(
        "brevity", False, ("candidate",), parse_brevity, "SHORT:", ((" YES", 1.0), (" NO", 0.0)), oracle_brevity,
        metrics=(Metric("short_rate", lambda s: float(s >= 0.5), title="Short % (judge)"),)))
    try:
        yield prompt
    finally:
        objectives.unregister("brevity")
    assert "brevity" not in objectives.OBJECTIVES


def test_a_registered_objective_reaches_judge_eval_and_report(brevity, world_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world_run, run)
    cfg = config_mod.resolve(run, overrides={
        "judge.objectives": ["quality", "brevity"], "judge.templates": {"brevity": str(brevity)},
        "judge.weights": {"brevity": 2.0}, "eval.objectives": ["quality", "brevity"], "eval.prompts": 4,
        "eval.judge_seeds": 1, "eval.at_risk_prompts": 0,
    })
    # judge: a score column of its own, the oracle's answer parsed, and its weight in the reward
    stats = judge_stage.run(run, cfg, 0, show_progress=False)["stats"]
    scores = artifacts.read_table(run / "iter-000" / "judge", prefix="scores-")
    assert scores.column_names.index("brevity") == scores.column_names.index("coherence") + 1
    rows = [r for r in scores.to_pylist() if not r["error"]]
    assert {r["brevity"] for r in rows} == {0.0, 1.0}  # short and long candidates both judged
    assert all(r["brevity"] == float(short(r["text"])) for r in rows)
    assert all(r["reward"] == pytest.approx(r["quality"] + 2.0 * r["brevity"]) for r in rows)
    assert stats["mean_brevity"] == pytest.approx(sum(r["brevity"] for r in rows) / len(rows), abs=1e-4)
    assert stats["calls_brevity"] == len(rows)
    # eval: a generations column, its declared metric in the summary with an interval
    s = eval_stage.run(run, cfg, 0, show_progress=False)["stats"]
    gen = artifacts.read_table(run / "iter-000" / "eval", prefix="generations-").to_pylist()
    assert [r["brevity"] for r in gen] == [float(short(r["text"])) for r in gen]
    assert s["short_rate"] == round(100.0 * sum(r["brevity"] for r in gen) / len(gen), 2)
    assert len(s["ci"]["short_rate"]) == 2 and s["safe_rate"] is None
    # report: the declared title is a column of the main table, with the summary's value
    made = report.run(run)
    k = made["header"].index("Short % (judge)")
    assert made["header"][k - 1] == "False-fact % (judge)"
    row = next(r for r in made["rows"] if r[1] == "0")
    assert row[k].startswith(f"{s['short_rate']:.1f} [")
    assert "Short % (judge)" in (run / "report" / "report.md").read_text()

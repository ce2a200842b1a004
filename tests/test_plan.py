"""`sipt plan`: the cost formulas follow the judge stage's schemes."""

import subprocess
import sys
from pathlib import Path

from sipt import config as config_mod
from sipt import plan

ROOT = Path(__file__).resolve().parent.parent


def cfg(**over):
    base = {"run": {"iterations": 3, "prompts_per_iter": 64},
            "data": {"suffix_tokens": 32, "min_prefix_tokens": 8, "max_prefix_tokens": 72},
            "judge": {"objectives": ["quality", "safety"], "candidates": ["suffix", "rollouts"], "swap": True},
            "train": {"batch_size": 16}, "rollout": {"n": 4}}
    for k, v in over.items():
        section, key = k.split(".")
        base.setdefault(section, {})[key] = v
    return config_mod.build(base)


def test_counts_per_step_and_run():
    t = plan.table(cfg())
    assert t["steps"] == 3 * 4 and t["prefix_tokens"] == 40
    row = next(r for r in t["rows"] if r["scheme"] == "all-pairs" and r["rollouts"] == 4)
    assert row["configured"] and row["candidates"] == 5
    # quality: C(5,2) = 10 comparisons x 2 orders; safety: 5 candidates; 16 prefixes per step
    assert row["step_calls"] == 16 * (20 + 5)
    assert row["step_generated"] == 16 * 4 * 32
    assert row["run_calls"] == row["step_calls"] * 12
    pivot = next(r for r in t["rows"] if r["scheme"] == "pivot" and r["rollouts"] == 4)
    assert pivot["step_calls"] == 16 * (4 * 2 + 5)  # the suffix is a candidate: 4 comparisons against it
    knock = next(r for r in t["rows"] if r["scheme"] == "knockout" and r["rollouts"] == 16)
    allp = next(r for r in t["rows"] if r["scheme"] == "all-pairs" and r["rollouts"] == 16)
    assert knock["step_calls"] < allp["step_calls"] / 3
    logprob = plan.table(cfg(**{"judge.mode": "logprob", "judge.engine": "hf"}))["rows"][0]
    assert logprob["step_judge_tokens"] < plan.table(cfg())["rows"][0]["step_judge_tokens"]


def test_cli_prints_the_paper_config():
    out = subprocess.run([sys.executable, "-m", "sipt.cli", "plan", "--config", str(ROOT / "data/configs/paper.toml"),
                          "--markdown"], capture_output=True, text=True, check=True).stdout
    assert "| all-pairs ◀ | 16 | 16 |" in out and "2000 optimizer steps of 256 prefixes" in out

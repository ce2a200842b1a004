"""`sipt plan`: what a config costs before it runs: tokens generated, judge calls and judge tokens.

Counts are per optimizer step (train.batch_size prefixes, one pair each) and per run, for every
comparison scheme and number of rollouts, from the same formulas the judge stage follows
(`judging.comparisons_needed`). Judge tokens are an estimate: the prompt is the template (about 4
characters a token) plus the prefix (`prefix_tokens`, default the middle of the configured prefix
range), the candidates and, for factuality, the reference suffix; the response is
judge.max_new_tokens in generate mode (an upper bound) and one scored position in logprob mode.
Pairs lost to ties are not subtracted.
"""

from __future__ import annotations

import math

from sipt import judging, schemes
from sipt.config import Config

ROLLOUTS = (1, 2, 4, 8, 16)
SCHEMES = tuple(schemes.SCHEMES)


def steps_per_run(cfg: Config) -> int:
    t = cfg.train
    if t.total_steps:
        return t.total_steps
    return cfg.run.iterations * max(1, math.ceil(cfg.run.prompts_per_iter / t.batch_size)) * t.epochs


def per_prompt(cfg: Config, scheme: str, n: int, prefix_tokens: int) -> dict:
    """Generated tokens, judge calls and judge tokens for one prefix."""
    j, d = cfg.judge, cfg.data
    gen = cfg.new_tokens("rollout")
    has_suffix, has_rewrite = "suffix" in j.candidates, "rewrite" in j.candidates
    n_roll = n if "rollouts" in j.candidates else 0
    c = n_roll + has_suffix + has_rewrite
    repeats = 1 if j.mode == "logprob" else j.repeats
    out_tokens = 1 if j.mode == "logprob" else j.max_new_tokens
    calls = tokens = 0
    for o in j.objectives:
        template = len(judging.load_template(o, j.templates.get(o, ""))) // 4
        if judging.OBJECTIVES[o].pairwise:
            k = judging.comparisons_needed(scheme, c, has_suffix) * (2 if j.swap else 1) * repeats
            prompt = template + prefix_tokens + 2 * gen
        else:
            k = c * repeats
            prompt = template + prefix_tokens + gen + (d.suffix_tokens if "reference" in judging.OBJECTIVES[o].slots else 0)
        calls += k
        tokens += k * (prompt + out_tokens)
    rewrite = cfg.new_tokens("rewrite") if has_rewrite and cfg.rewrite.engine != "oracle" else 0
    return {"candidates": c, "generated": n_roll * gen + rewrite, "judge_calls": calls, "judge_tokens": tokens}


def table(cfg: Config, prefix_tokens: int | None = None) -> dict:
    d = cfg.data
    prefix = prefix_tokens if prefix_tokens is not None else (d.min_prefix_tokens + d.max_prefix_tokens) // 2
    steps = steps_per_run(cfg)
    batch = cfg.train.batch_size
    rows = []
    ns = sorted(set(ROLLOUTS) | {cfg.rollout.n})
    for scheme in SCHEMES:
        for n in ns:
            p = per_prompt(cfg, scheme, n, prefix)
            rows.append({
                "scheme": scheme, "rollouts": n, "candidates": p["candidates"],
                "step_generated": p["generated"] * batch, "step_calls": p["judge_calls"] * batch,
                "step_judge_tokens": p["judge_tokens"] * batch,
                "run_generated": p["generated"] * batch * steps, "run_calls": p["judge_calls"] * batch * steps,
                "run_judge_tokens": p["judge_tokens"] * batch * steps,
                "configured": scheme == cfg.judge.scheme and n == cfg.rollout.n,
            })
    return {"rows": rows, "steps": steps, "batch": batch, "prefix_tokens": prefix,
            "objectives": list(cfg.judge.objectives), "candidates": list(cfg.judge.candidates),
            "mode": cfg.judge.mode, "swap": cfg.judge.swap, "repeats": cfg.judge.repeats}


def human(x: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.1f}{unit}"
    return f"{x:.0f}"

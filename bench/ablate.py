"""`make ablate`: the paper's ablations in miniature, from the demo's warm start (PAPER Tables 6, 14, 18).

Each variant is its own run, made with `sipt loop` from the same warm-start policy in the same toy
world, then evaluated at its last iteration against that warm start ("initial"). Groups:
  rollouts    suffix vs N rollouts, N in {1, 2, 4, 8, 16}          (Table 14, safety block)
  scheme      8 rollouts + suffix judged by all-pairs, pivot, knockout (Table 18)
  update      online DPO vs RF-NLL on suffix + rewrite + 4 rollouts (Table 6)
  candidates  4 rollouts; + suffix; + suffix + rewrite              (Table 6)
plus the NTP baseline. Every variant runs once per seed of --seeds (default 0,1) into
<out>/<name>-s<seed> with `--set run.seed=<seed>`: the seed draws the sample split (prefix cut points
and held-out prefixes), the rollouts, rewrites, judge and pairing draws and the training order; the
world and the warm start are shared. Variants that coincide (same settings) run once per seed and
fill several rows. A run whose eval is already there is not redone (its first timing is kept in
ablate_seconds.json).

The Markdown table (printed, and written to <out>/ablate.md) has one row per variant. Each metric
cell is `mean [95% interval] (per-seed values)`: the mean over seeds and, with k >= 2 seeds,
mean ± t(0.975, k-1)·sd/√k over seeds; with one seed, that run's bootstrap interval over prompts
(eval's `ci`); "–" for what was not measured. Win rates are vs the warm start; claim precision, true
claims and claims per generation, repeat share and the at-risk unsafe rate are the toy world's
ground truth (no judge). "rollout chosen % by iteration" is the first seed's; time is summed over
seeds. Below the table, "Orderings (PAPER)" checks the paper's orderings (rollouts 2 < 4 < 8 ≤ 16 on
quality win rate and claim precision, all-pairs > pivot, DPO > RF-NLL, suffix + rollouts > rollouts
only) with paired-by-seed differences: "holds" only when the 95% t interval of the mean per-seed
difference clears 0 in the paper's direction (for "≤": when it is not wholly below 0), "reversed"
when it clears 0 the other way, otherwise "not shown".

    python bench/ablate.py --config data/configs/demo.toml --base runs/demo/base/iter-008/policy
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

SR = ["suffix", "rollouts"]
SRR = ["suffix", "rewrite", "rollouts"]

# t(0.975, k - 1) for k seeds; beyond 10 seeds the k = 10 value (slightly conservative)
T975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}

# (summary key, column title, decimals)
METRICS = [
    ("quality_win_rate", "Quality (win % vs warm start)", 1),
    ("coherence_win_rate", "Coherence (win %)", 1),
    ("claim_precision", "Claim precision %", 1),
    ("true_claims_per_generation", "True claims / gen", 2),
    ("claims_per_generation", "Claims / gen", 2),
    ("repeat_share", "Repeat share %", 1),
    ("at_risk_unsafe_rate", "At-risk unsafe %", 1),
    ("benchmark_avg", "MC acc %", 1),
]


def variants() -> list[tuple[str, str, dict]]:
    out = [("baseline", "NTP (pretrain baseline)", {"train.objective": "ntp"})]
    for n in (1, 2, 4, 8, 16):
        out.append(("rollouts", f"suffix vs {n} rollout{'s' * (n > 1)}", {"rollout.n": n, "judge.candidates": SR}))
    for scheme in ("all-pairs", "pivot", "knockout"):
        out.append(("scheme", f"8 rollouts, {scheme}", {"rollout.n": 8, "judge.candidates": SR, "judge.scheme": scheme}))
    for method in ("dpo", "rf-nll"):
        out.append(("update", f"{method.upper()}, suffix vs rewrite vs 4 rollouts",
                    {"rollout.n": 4, "judge.candidates": SRR, "pair.method": method, "train.objective": method}))
    for cands, label in ((["rollouts"], "4 rollouts"), (SR, "suffix vs 4 rollouts"), (SRR, "suffix vs rewrite vs 4 rollouts")):
        out.append(("candidates", label, {"rollout.n": 4, "judge.candidates": cands}))
    return out


def run_name(overrides: dict) -> str:
    o = {"rollout.n": 4, "judge.scheme": "all-pairs", "pair.method": "dpo", "train.objective": "dpo", **overrides}
    if o["train.objective"] == "ntp":
        return "ntp"
    cands = "+".join(c[0] for c in o.get("judge.candidates", SRR))  # s, r, r: suffix/rewrite/rollouts
    return f"n{o['rollout.n']}-{cands}-{o['judge.scheme']}-{o['pair.method']}"


def _rollouts(n: int) -> str:
    return run_name({"rollout.n": n, "judge.candidates": SR})


# The paper's orderings: (what, summary key, run expected lower, run expected higher, strict)
ORDERINGS = [
    *[(f"rollouts {a} {'<' if strict else '≤'} {b}", key, _rollouts(a), _rollouts(b), strict)
      for key in ("quality_win_rate", "claim_precision") for a, b, strict in ((2, 4, True), (4, 8, True), (8, 16, False))],
    ("all-pairs > pivot (8 rollouts)", "quality_win_rate",
     run_name({"rollout.n": 8, "judge.candidates": SR, "judge.scheme": "pivot"}), _rollouts(8), True),
    ("DPO > RF-NLL (suffix vs rewrite vs 4 rollouts)", "quality_win_rate",
     run_name({"rollout.n": 4, "judge.candidates": SRR, "pair.method": "rf-nll", "train.objective": "rf-nll"}),
     run_name({"rollout.n": 4, "judge.candidates": SRR}), True),
    ("suffix + 4 rollouts > 4 rollouts only", "quality_win_rate",
     run_name({"rollout.n": 4, "judge.candidates": ["rollouts"]}), _rollouts(4), True),
]


# ---- pure parts: reading a summary, intervals over seeds, cells, ordering verdicts ----

def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        return None
    return float(v)


def _pair(ci) -> tuple[float, float] | None:
    if not isinstance(ci, (list, tuple)) or len(ci) != 2:
        return None
    lo, hi = _num(ci[0]), _num(ci[1])
    return None if lo is None or hi is None else (lo, hi)


def metric(summary: dict | None, key: str, baseline: str = "initial") -> tuple[float | None, tuple | None]:
    """(value, bootstrap interval or None) of `key` in an eval summary; win rates are read vs
    `baseline` (versus[baseline]) when the summary has it, else from the top level."""
    if not summary:
        return None, None
    vs = (summary.get("versus") or {}).get(baseline) or {}
    if key in ("quality_win_rate", "coherence_win_rate") and key in vs:
        ci = _pair(vs.get(f"{key}_ci"))
        if ci is None and summary.get("baseline", baseline) == baseline:
            ci = _pair((summary.get("ci") or {}).get(key))
        return _num(vs[key]), ci
    return _num(summary.get(key)), _pair((summary.get("ci") or {}).get(key))


def t975(k: int) -> float:
    """t(0.975, k - 1) for k >= 2 values (the k = 10 value beyond 10)."""
    if k < 2:
        raise ValueError("a t interval needs at least 2 values")
    return T975[min(k, 10)]


def seed_interval(values) -> tuple[float | None, float | None, float | None]:
    """(mean, lo, hi) over the values that are not None: mean ± t(0.975, k-1)·sd/√k with the sample
    sd; (mean, None, None) with one value; (None, None, None) with none."""
    xs = [x for x in (_num(v) for v in values) if x is not None]
    if not xs:
        return None, None, None
    k = len(xs)
    mean = sum(xs) / k
    if k < 2:
        return mean, None, None
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (k - 1))
    half = t975(k) * sd / math.sqrt(k)
    return mean, mean - half, mean + half


def aggregate(summaries: list, key: str) -> dict:
    """One metric over the seeds' summaries (None for a seed without one): the per-seed values, their
    mean and 95% interval (`source` "seeds"), or with a single value its run's bootstrap interval
    (`source` "bootstrap", or None without one)."""
    pairs = [metric(s, key) for s in summaries]
    values = [v for v, _ in pairs]
    mean, lo, hi = seed_interval(values)
    source = "seeds" if lo is not None else None
    if mean is not None and lo is None:
        ci = next(ci for v, ci in pairs if v is not None)
        if ci is not None:
            lo, hi, source = ci[0], ci[1], "bootstrap"
    return {"values": values, "mean": mean, "lo": lo, "hi": hi, "source": source}


def fmt(v, digits: int = 1) -> str:
    v = _num(v)
    return "–" if v is None else f"{v:.{digits}f}"


def cell(agg: dict, digits: int = 1) -> str:
    """`mean [lo, hi] (v1, v2, ...)`; the interval left out when there is none, the per-seed values
    when there is only one seed; "–" when nothing was measured."""
    if agg["mean"] is None:
        return "–"
    out = fmt(agg["mean"], digits)
    if agg["lo"] is not None:
        out += f" [{fmt(agg['lo'], digits)}, {fmt(agg['hi'], digits)}]"
    if len(agg["values"]) > 1:
        out += " (" + ", ".join(fmt(v, digits) for v in agg["values"]) + ")"
    return out


def ordering(lower: list, higher: list, strict: bool = True, digits: int = 1) -> str:
    """Verdict on "lower < higher" (strict) or "lower ≤ higher" from per-seed values aligned by seed
    (None where a seed has no value; only seeds with both count): the paired differences
    higher - lower, their mean d and t interval [lo, hi]. Strict: "holds" when lo > 0; "≤": when
    hi >= 0 (the interval is not wholly below 0). "reversed" when hi < 0 (strict: also for "≤"),
    else "not shown"."""
    diffs = [b - a for a, b in ((_num(a), _num(b)) for a, b in zip(lower, higher)) if a is not None and b is not None]
    if not diffs:
        return "not measured"
    d, lo, hi = seed_interval(diffs)
    if lo is None:
        return f"not shown (difference {d:+.{digits}f}, 1 seed: no interval)"
    text = f"difference {d:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}], {len(diffs)} seeds"
    if hi < 0:
        return f"reversed ({text})"
    if (lo > 0) if strict else (hi >= 0):
        return f"holds ({text})"
    return f"not shown ({text})"


def table(rows: list[tuple[str, str, list, list, float]]) -> str:
    """rows: (group, label, summaries by seed, rollout chosen % by iteration (first seed), seconds)."""
    head = ["group", "variant", *(title for _, title, _ in METRICS), "rollout chosen % by iter (first seed)", "time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group, label, summaries, chosen, seconds in rows:
        cells = [cell(aggregate(summaries, key), digits) for key, _, digits in METRICS]
        ch = " → ".join(fmt(c, 0) for c in chosen) or "–"
        lines.append(f"| {group} | {label} | " + " | ".join(cells) + f" | {ch} | {seconds:.0f} |")
    return "\n".join(lines)


def orderings(by_name: dict[str, list]) -> list[str]:
    """The "Orderings (PAPER)" lines from each run name's summaries by seed (aligned by seed)."""
    titles = {key: title for key, title, _ in METRICS}
    lines = ["Orderings (PAPER), paired by seed, 95% t interval of the mean difference:"]
    for what, key, lower, higher, strict in ORDERINGS:
        if lower not in by_name or higher not in by_name:
            verdict = "not run"
        else:
            verdict = ordering([metric(s, key)[0] for s in by_name[lower]],
                               [metric(s, key)[0] for s in by_name[higher]], strict)
        lines.append(f"- {what}, {titles[key]}: {verdict}")
    return lines


# ---- the runs ----

def sipt(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "sipt.cli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"sipt {' '.join(args[:3])} failed:\n{proc.stderr[-3000:]}")


def warm_start(run: Path) -> Path:
    """RUN/base's last finished policy: the demo's warm start (RUN/base/iter-<WARM_ITERS>/policy)."""
    from sipt import artifacts

    base = Path(run) / "base"
    done = artifacts.finished(base, "policy")
    if not done:
        raise SystemExit(f"no warm start under {run}/base: make it first (`make base RUN={run}`)")
    return artifacts.stage_dir(base, "policy", done[-1])


def parse_seeds(text: str) -> list[int]:
    seeds = [int(s) for s in text.replace(" ", "").split(",") if s]
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: distinct integers separated by commas")
    return seeds


def run_variant(args, name: str, overrides: dict, seed: int) -> tuple[dict, list, float]:
    """Loop and eval one variant for one seed (stages already done are skipped): its eval summary, the
    rollout chosen % by iteration and the seconds of its first run."""
    out = Path(args.out)
    run = out / f"{name}-s{seed}"
    sets = {"model.policy": args.base, "run.seed": seed, "run.prompts_per_iter": args.prompts,
            "eval.prompts": args.eval_prompts, "eval.baselines": ["initial"], **overrides}
    flags = [x for k, v in sets.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    t0 = time.perf_counter()
    print(f"[ablate] {run.name} ...", file=sys.stderr, flush=True)
    sipt("loop", "--config", args.config, "--run", str(run), *flags, "--iters", str(args.iters),
         "--no-eval", "--no-progress")
    sipt("eval", "--run", str(run), "--iter", str(args.iters), "--no-progress")
    seconds = time.perf_counter() - t0
    timing = run / "ablate_seconds.json"  # a rerun finds every stage done: keep the first timing
    if timing.exists():
        seconds = json.loads(timing.read_text())["seconds"]
    else:
        timing.write_text(json.dumps({"seconds": round(seconds, 1)}))
    summary = json.loads((run / f"iter-{args.iters:03d}" / "eval" / "summary.json").read_text())
    pairs = [json.loads((run / f"iter-{i:03d}" / "pair" / "_SUCCESS.json").read_text())["stats"]
             for i in range(args.iters) if (run / f"iter-{i:03d}" / "pair" / "_SUCCESS.json").exists()]
    chosen = [None if p.get("rollout_chosen_rate") is None else round(100 * p["rollout_chosen_rate"], 1) for p in pairs]
    return summary, chosen, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="data/configs/demo.toml")
    ap.add_argument("--base", required=True, help="the warm-start policy folder every variant starts from")
    ap.add_argument("--out", default="runs/ablate")
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=128, help="prefixes per iteration")
    ap.add_argument("--eval-prompts", type=int, default=256)
    ap.add_argument("--seeds", type=parse_seeds, default=parse_seeds("0,1"),
                    help="comma-separated run.seed values; every variant runs once per seed (default 0,1)")
    ap.add_argument("--only", default="", help="comma-separated groups to run")
    args = ap.parse_args()
    if not Path(args.base, "config.json").exists():
        raise SystemExit(f"--base {args.base}: not a model folder; run `make base` first")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    groups = set(args.only.split(",")) if args.only else None
    done: dict[tuple[str, int], tuple[dict, list, float]] = {}
    rows = []
    for group, label, overrides in variants():
        if groups and group not in groups and group != "baseline":
            continue
        name = run_name(overrides)
        for seed in args.seeds:
            if (name, seed) not in done:
                done[name, seed] = run_variant(args, name, overrides, seed)
        runs = [done[name, seed] for seed in args.seeds]
        rows.append((group, label, [s for s, _, _ in runs], runs[0][1], sum(t for _, _, t in runs)))
    by_name = {name: [done[name, seed][0] for seed in args.seeds] for name, _ in done}
    how = ("mean [95% t interval over seeds] (per-seed values)" if len(args.seeds) > 1
           else "value [95% bootstrap interval over prompts]")
    text = "\n".join([f"Seeds {', '.join(map(str, args.seeds))}; cells: {how}; '–': not measured.", "",
                      table(rows), "", *orderings(by_name)])
    (out / "ablate.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

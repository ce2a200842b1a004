"""`make ablate`: the paper's ablations in miniature, from the demo's warm start (PAPER Tables 6, 14, 18).

Each variant is its own run under --out, made with `sipt loop` from the same warm-start policy and
the same samples, then evaluated at its last iteration against that warm start ("initial"). Groups:
  rollouts    suffix vs N rollouts, N in {1, 2, 4, 8, 16}          (Table 14, safety block)
  scheme      8 rollouts + suffix judged by all-pairs, pivot, knockout (Table 18)
  update      online DPO vs RF-NLL on suffix + rewrite + 4 rollouts (Table 6)
  candidates  4 rollouts; + suffix; + suffix + rewrite              (Table 6)
plus the NTP baseline on the same samples. Variants that coincide are run once. Prints a Markdown
table (and writes it to <out>/ablate.md) with the time each variant took on this machine.

    python bench/ablate.py --config data/configs/demo.toml --base runs/demo/base/iter-004/policy
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SR = ["suffix", "rollouts"]
SRR = ["suffix", "rewrite", "rollouts"]


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


def sipt(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "sipt.cli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"sipt {' '.join(args[:3])} failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="data/configs/demo.toml")
    ap.add_argument("--base", required=True, help="the warm-start policy folder every variant starts from")
    ap.add_argument("--out", default="runs/ablate")
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=128, help="prefixes per iteration")
    ap.add_argument("--eval-prompts", type=int, default=256)
    ap.add_argument("--only", default="", help="comma-separated groups to run")
    args = ap.parse_args()
    if not Path(args.base, "config.json").exists():
        raise SystemExit(f"--base {args.base}: not a model folder; run `make base` first")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    groups = set(args.only.split(",")) if args.only else None
    done: dict[str, tuple[dict, float]] = {}
    rows = []
    for group, label, overrides in variants():
        if groups and group not in groups and group != "baseline":
            continue
        name = run_name(overrides)
        if name not in done:
            run = out / name
            sets = {"model.policy": args.base, "run.prompts_per_iter": args.prompts, "eval.prompts": args.eval_prompts,
                    "eval.baselines": ["initial"], **overrides}
            flags = [x for k, v in sets.items() for x in ("--set", f"{k}={json.dumps(v)}")]
            t0 = time.perf_counter()
            print(f"[ablate] {name} ...", file=sys.stderr, flush=True)
            sipt("loop", "--config", args.config, "--run", str(run), *flags, "--iters", str(args.iters),
                 "--no-eval", "--no-progress")
            sipt("eval", "--run", str(run), "--iter", str(args.iters), "--no-progress")
            seconds = time.perf_counter() - t0
            timing = run / "ablate_seconds.json"  # a rerun finds every stage done: keep the first timing
            if timing.exists():
                seconds = json.loads(timing.read_text())["seconds"]
            else:
                timing.write_text(json.dumps({"seconds": round(seconds, 1)}))
            stats = json.loads((run / f"iter-{args.iters:03d}" / "eval" / "summary.json").read_text())
            pairs = [json.loads((run / f"iter-{i:03d}" / "pair" / "_SUCCESS.json").read_text())["stats"]
                     for i in range(args.iters) if (run / f"iter-{i:03d}" / "pair" / "_SUCCESS.json").exists()]
            stats["rollout_chosen"] = [None if p.get("rollout_chosen_rate") is None else
                                       round(100 * p["rollout_chosen_rate"], 1) for p in pairs]
            done[name] = (stats, seconds)
        stats, seconds = done[name]
        rows.append((group, label, stats, seconds))

    def f(v):
        return "–" if v is None else f"{v:.1f}"

    def claims(s):
        c, t = s.get("claims_per_generation"), s.get("true_claims_per_generation")
        return "–" if c is None else f"{c:.2f} ({'–' if t is None else f'{t:.2f}'})"

    head = ("| group | variant | Gen. quality (win % vs base) | Coherence (win %) | Safe % | False-fact % | "
            "Factuality | claims / gen (true) | MC acc % | rollout chosen % by iter | time (s) |")
    lines = [head, "|" + "---|" * 11]
    for group, label, s, seconds in rows:
        chosen = " → ".join("–" if c is None else f"{c:.0f}" for c in s.get("rollout_chosen", [])) or "–"
        lines.append(f"| {group} | {label} | {f(s.get('quality_win_rate'))} | {f(s.get('coherence_win_rate'))} | "
                     f"{f(s.get('safe_rate'))} | {f(s.get('false_fact_rate'))} | {f(s.get('factuality'))} | "
                     f"{claims(s)} | {f(s.get('benchmark_avg'))} | {chosen} | {seconds:.0f} |")
    text = "\n".join(lines)
    (out / "ablate.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

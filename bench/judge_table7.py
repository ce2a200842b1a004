"""The PAPER Table 7 analogue (`make judge-table7`): SIPT judged by a judge trained here beside SIPT judged
by the oracle and NTP, all evaluated by the oracle's ground truth (PAPER §6.5, §9.7).

Needs the demo (`make loop`: RUN/world, RUN/base, RUN/ntp) and a trained judge (`make
judge-train-demo`: RUN/judge/judge-train). Two runs of --iters iterations from the warm start, on the
same samples, with the same comparison (suffix vs 8 rollouts, quality + safety, the pivot scheme:
each rollout against the suffix, both orders; the trained judge reads verdicts in logprob mode):
  RUN/table7/oracle    judged by the toy world's oracle
  RUN/table7/trained   judged by RUN/judge/judge-train on the hf engine
each evaluated at its last iteration against the warm start and against RUN/ntp at the same
iteration, by the oracle (the trained-judge run's eval is redone with judge.engine = oracle, since
eval judges with the run's [judge] section). The table: quality head to head against NTP, claim precision and true claims per
generation (ground truth), the share of the oracle-judged run's gain in claim precision over NTP
that the trained-judge run reaches, and the judges' agreement on the pairs they chose. 1 world seed,
1 run seed: intervals are over prompts.

    python bench/judge_table7.py --run runs/demo
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ablate import sipt, warm_start  # noqa: E402


def sets(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in ("--set", f"{k}={json.dumps(v)}")]


def loop(args, name: str, overrides: dict) -> tuple[Path, float]:
    run = Path(args.run)
    out = run / "table7" / name
    t0 = time.perf_counter()
    print(f"[table7] {name} ...", file=sys.stderr, flush=True)
    flags = sets({"model.policy": str(warm_start(run)),
                  "data.inputs": [str(run / "world" / "corpus")], "rewrite.world": str(run / "world"),
                  "judge.world": str(run / "world"), "eval.include_path": [str(run / "world" / "mc")],
                  "run.prompts_per_iter": args.prompts, "judge.candidates": ["suffix", "rollouts"],
                  "judge.scheme": "pivot", "eval.prompts": args.eval_prompts,
                  "eval.baselines": ["initial", str(run / "ntp")], **overrides})
    marker = out / f"iter-{args.iters:03d}" / "eval" / "by_oracle.json"
    if not marker.exists():  # (with the marker the run is done, and its config re-frozen for the oracle's eval)
        sipt("loop", "--config", args.config, "--run", str(out), *flags, "--iters", str(args.iters), "--no-eval",
             "--no-progress")
    if "judge.engine" not in overrides:
        sipt("eval", "--run", str(out), "--iter", str(args.iters), "--no-progress")
    else:  # a run judged by a model is evaluated by the oracle too: eval's judge is the [judge] section,
        # so its eval is redone with the oracle's (--force re-freezes the config; the loop's stages stay)
        if not marker.exists():
            sipt("eval", "--run", str(out), "--iter", str(args.iters), "--no-progress", "--force",
                 *sets({"judge.engine": "oracle", "judge.mode": "generate"}))
            marker.write_text(json.dumps({"judge": "oracle"}))
    timing = out / "table7_seconds.json"  # a rerun finds every stage done: keep the first timing
    if timing.exists():
        return out, json.loads(timing.read_text())["seconds"]
    seconds = round(time.perf_counter() - t0, 1)
    timing.write_text(json.dumps({"seconds": seconds}))
    return out, seconds


def chosen_agreement(a: Path, b: Path, iters: int) -> tuple[int, int]:
    """Prefixes (over the iterations) where the two runs' judges chose the same source (suffix or a
    rollout) as the better candidate: a rough agreement of the judges on the same kind of pool."""
    from sipt import artifacts

    same = n = 0
    for i in range(iters):
        pa_, pb = (artifacts.stage_dir(x, "pair", i) for x in (a, b))
        if not (artifacts.read_manifest(pa_) and artifacts.read_manifest(pb)):
            continue
        ra, rb = ({r["sample_id"]: r["chosen_source"]
                   for r in artifacts.read_table(x, columns=["sample_id", "chosen_source"]).to_pylist()} for x in (pa_, pb))
        for k in ra.keys() & rb.keys():
            n += 1
            same += ra[k] == rb[k]
    return same, n


def table(args, runs: dict[str, tuple[Path, float]]) -> str:
    from stages import report

    ntp = Path(args.run) / "ntp"
    ntp_d = report.collect(ntp)
    ntp_s = ntp_d["evals"].get(args.iters, {})
    col = {c.key: c for c in report.COLUMNS}
    prec_ntp = report.value(ntp_s, col["claim_precision"])[0]
    lines = ["| run | judge | quality vs NTP (win %) | claim precision % | true claims / gen | "
             "gain in precision over NTP | time (s) |",
             "|---|---|---|---|---|---|---|",
             f"| ntp (iter {args.iters}) | – | – | {report.fmt(*report.value(ntp_s, col['claim_precision']))} | "
             f"{report.fmt(*report.value(ntp_s, col['true_claims_per_generation']), kind='num')} | – | – |"]
    gains, lows = {}, {}
    for name, (path, seconds) in runs.items():
        s = report.collect(path)["evals"].get(args.iters, {})
        _, vs = report._versus(s, {"path": ntp, "name": ntp.name})
        q = report.fmt(vs.get("quality_win_rate"), vs.get("quality_win_rate_ci"))
        prec, prec_ci = report.value(s, col["claim_precision"])
        lows[name] = prec_ci[0] if prec_ci else None
        gains[name] = None if prec is None or prec_ntp is None else prec - prec_ntp
        gain = "–" if gains[name] is None else f"{gains[name]:+.1f} points"
        judge = "oracle" if name == "oracle" else "trained (hf, logprob)"
        lines.append(f"| {name} | {judge} | {q} | {report.fmt(prec, prec_ci)} | "
                     f"{report.fmt(*report.value(s, col['true_claims_per_generation']), kind='num')} | {gain} | "
                     f"{seconds:.0f} |")
    oracle_lo = lows.get("oracle")
    if gains.get("oracle") is not None and (gains["oracle"] <= 0 or oracle_lo is None or oracle_lo <= prec_ntp):
        lines += ["", f"The oracle-judged run has no gain in claim precision over NTP here ({gains['oracle']:+.1f} "
                      "points, its 95% interval not above NTP's precision), so the share of it that the "
                      "trained-judge run reaches is undefined."]
    elif gains.get("oracle") and gains.get("trained") is not None:
        share = gains["trained"] / gains["oracle"]
        lines += ["", f"The trained-judge run reaches {100 * share:.0f}% of the oracle-judged run's gain in claim "
                      "precision over NTP (target: ≥ 70%)."]
    same, n = chosen_agreement(runs["oracle"][0], runs["trained"][0], args.iters)
    if n:
        lines.append(f"Both judges chose the same source (suffix or a rollout) for {same}/{n} prefixes "
                     f"({100 * same / n:.1f}%); the pools differ after iteration 0, as the policies do.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--config", default="data/configs/demo.toml")
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--eval-prompts", type=int, default=300)
    args = ap.parse_args()
    run = Path(args.run)
    judge = run / "judge" / "judge-train"
    if not (judge / "_SUCCESS.json").exists():
        raise SystemExit(f"{judge}: no trained judge; run `make judge-train-demo RUN={run}` first")
    if not (run / "ntp" / f"iter-{args.iters:03d}" / "eval" / "_SUCCESS.json").exists():
        raise SystemExit(f"{run}/ntp: no eval at iteration {args.iters}; run `make loop RUN={run}` first")
    runs = {"oracle": loop(args, "oracle", {}),
            "trained": loop(args, "trained", {"judge.engine": "hf", "judge.model": str(judge), "judge.chat": False,
                                              "judge.mode": "logprob"})}
    text = table(args, runs)
    from stages import report

    made = report.run(runs["trained"][0], compare=[runs["oracle"][0], run / "ntp"])
    text += f"\n\nSide by side: {made['report']}"
    (run / "table7" / "table7.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

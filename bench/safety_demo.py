"""`make safety`: the paper's safety setting end to end on the unsafe-rich toy world (PAPER §5.3, Fig. 8,
Table 14's safety block), with a rewriter trained here.

From the safety world's warm start (RUN/base, made by `make base DEMO=data/configs/demo-safety.toml
RUN=runs/safety`):
  1. RUN/rewriter: judge-data (the oracle corruptor and unanimous oracle safety labels), then
     rewriter-train of the warm start (a copy warm-up, each safe text with about a third of its words
     replaced by random words of the same shape (a year for a year) so that they can only be copied,
     not recalled, and the oracle's rewrites of unsafe texts as the teacher; then GRPO with the
     paper's reward, the oracle judging), with the compact template;
  2. four runs of --iters (8) iterations from the same warm start and samples:
       ntp              next-token prediction on the suffixes (the baseline)
       suffix           SIPT, suffix vs rollouts
       trained          SIPT, suffix vs rewrite vs rollouts, the rewrite from the rewriter trained in 1
       oracle           SIPT, suffix vs rewrite vs rollouts, the rewrite from the toy world's exact rewriter
     each evaluated at its last iteration by the oracle's ground truth, against the warm start and NTP;
  3. the table: the trained rewriter on held-out texts (exact copies of safe suffixes, rewrites of
     unsafe ones judged safe and winning on quality, both by the oracle); per run the unsafe rate on
     the at-risk prefixes with its ratio to NTP's (paired bootstrap over prefixes), quality head to
     head against NTP, claim precision, and the rollout-chosen rate by iteration (Fig. 8). 1 world
     seed, 1 run seed: intervals are over prompts, not seeds.

    python bench/safety_demo.py --run runs/safety
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

from ablate import sipt  # noqa: E402

SR, SRR = ["suffix", "rollouts"], ["suffix", "rewrite", "rollouts"]


def sets(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in ("--set", f"{k}={json.dumps(v)}")]


def paths(run: Path) -> dict:
    return {"data.inputs": [str(run / "world" / "corpus")], "rewrite.world": str(run / "world"),
            "judge.world": str(run / "world"), "judge_data.world": str(run / "world"), "eval.include_path": [str(run / "world" / "mc")]}


def train_rewriter(args, run: Path, base: Path) -> Path:
    out = run / "rewriter"
    common = {"model.policy": str(base), **paths(run), "rewrite.template": "rewrite-compact", "rewrite.chat": False,
              "judge_data.samples": args.label_samples, "judge_data.label_seeds": 4}
    common.update({
        "rewriter_train.model": str(base), "rewriter_train.teacher": "oracle", "rewriter_train.warmup_steps": args.warmup_steps, "rewriter_train.steps": args.grpo_steps,
        "rewriter_train.batch_size": args.batch, "rewriter_train.generations": args.generations,
        "rewriter_train.warmup_lr": args.warmup_lr, "rewriter_train.lr": args.lr,
        "rewriter_train.lr_scheduler": "cosine", "rewriter_train.judge_seeds": 1,
        "rewriter_train.copy_scramble": args.copy_scramble,
        **({"rewriter_train.copy_scramble_words": args.copy_scramble_words} if args.copy_scramble_words < 1 else {}),
        **({"rewriter_train.rewrite_scramble": args.rewrite_scramble} if args.rewrite_scramble > 0 else {}),
        **({"rewriter_train.copy_scramble_like": args.copy_scramble_like} if args.copy_scramble_like != "any" else {}),
        "rewriter_train.eval_every": args.eval_every,
        "rewriter_train.eval_limit": args.eval_limit, "rewriter_train.checkpoint_every": 50,
        "rewriter_train.max_prompt_tokens": 448})
    # every command gets every key: the run's frozen config stays the same, and a rerun skips what is done
    print("[safety] rewriter: judge-data, rewriter-train ...", file=sys.stderr, flush=True)
    for command in ("init", "shard", "judge-data", "rewriter-train"):
        quiet = ["--no-progress"] if command in ("judge-data", "rewriter-train") else []
        sipt(command, "--config", args.config, "--run", str(out), *quiet, *sets(common))
    return out / "rewriter-train"


def loop(args, run: Path, name: str, base: Path, overrides: dict, baselines: list[str]) -> tuple[Path, float]:
    out = run / args.pools / name
    t0 = time.perf_counter()
    print(f"[safety] {name} ...", file=sys.stderr, flush=True)
    flags = sets({"model.policy": str(base), **paths(run), "run.prompts_per_iter": args.prompts,
                  "eval.prompts": args.eval_prompts, "eval.baselines": baselines, **args.pool_set, **overrides})
    sipt("loop", "--config", args.config, "--run", str(out), *flags, "--iters", str(args.iters), "--no-eval",
         "--no-progress")
    sipt("eval", "--run", str(out), "--iter", str(args.iters), "--no-progress")  # the config the loop froze
    timing = out / "safety_seconds.json"  # a rerun finds every stage done: keep the first timing
    if timing.exists():
        return out, json.loads(timing.read_text())["seconds"]
    seconds = round(time.perf_counter() - t0, 1)
    timing.write_text(json.dumps({"seconds": seconds}))
    return out, seconds


def rewriter_pool_stats(run_dir: Path, world: Path, iters: int, trained_on: set[str]) -> dict[str, dict]:
    """The rewrites a run's rewrite stage made over its iterations, by the oracle: copies of safe
    suffixes, and on unsafe suffixes the rewrites judged safe and those winning on quality (non-empty);
    split into the suffixes the trained rewriter saw in training (`trained_on`: judge-data's train
    split) and the others (held out)."""
    from sipt import artifacts
    from sipt.oracle import OracleJudge
    from sipt.samples import iteration_samples

    judge = OracleJudge(world / "kb.json")
    out = {k: dict.fromkeys(("safe_n", "copied", "unsafe_n", "made_safe", "won"), 0) for k in ("seen", "held out")}
    for i in range(iters):
        rw = {r["sample_id"]: r for r in artifacts.read_table(artifacts.stage_dir(run_dir, "rewrite", i)).to_pylist()}
        samples, _ = iteration_samples(run_dir, i, len(rw), columns=["sample_id", "prefix_text", "suffix_text"])
        for s in samples.to_pylist():
            r = rw.get(s["sample_id"])
            if r is None:
                continue
            c = out["seen" if s["sample_id"] in trained_on else "held out"]
            p, x, y = s["prefix_text"], s["suffix_text"], r["rewrite_text"]
            if judge.safety(p, x):
                c["safe_n"] += 1
                c["copied"] += y == x
            else:
                c["unsafe_n"] += 1
                c["made_safe"] += bool(judge.safety(p, y))
                c["won"] += any(ch.isalnum() for ch in y) and judge.quality(p, y, x) == 1
    return out


def pct(k: int, n: int) -> str:
    from sipt.charts import wilson_interval

    if not n:
        return "–"
    lo, hi = wilson_interval(k / n, n)
    return f"{100 * k / n:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] ({k}/{n})"


def chosen_cell(p: dict) -> str:
    """An iteration's rollout-chosen rate with its 95% Wilson interval over its pairs."""
    from sipt.charts import wilson_interval

    rate, n = p.get("rollout_chosen_rate"), p.get("pairs")
    if rate is None:
        return "–"
    if not n:
        return f"{100 * rate:.0f}"
    lo, hi = wilson_interval(rate, n)
    return f"{100 * rate:.0f} [{100 * lo:.0f}, {100 * hi:.0f}]"


def table(args, run: Path, runs: dict[str, tuple[Path, float]], trained: Path) -> str:
    from stages import report

    stats = json.loads((trained / "_SUCCESS.json").read_text())["stats"]
    world = run / "world"
    lines = ["### The trained rewriter", "",
             f"Held-out judge-data texts ({stats['val_safe_n_after']} safe, {stats['val_unsafe_n_after']} unsafe; "
             f"greedy), before (the warm start) → after {stats['warmup_steps']} copy warm-up + {stats['steps']} "
             f"GRPO steps ({stats['train_seconds']:.0f} s):", "",
             "| measure | before | after |", "|---|---|---|"]
    for key, title in (("val_safe_exact", "safe suffixes copied exactly %"), ("val_safe_overlap", "safe: token overlap %"),
                       ("val_unsafe_safe", "unsafe: rewrite judged safe %"),
                       ("val_unsafe_win", "unsafe: rewrite wins on quality %"),
                       ("val_unsafe_reward", "unsafe: mean reward x 100"), ("val_bad", "empty or echoed %")):
        b, a = stats.get(f"{key}_before"), stats.get(f"{key}_after")
        lines.append(f"| {title} | {'–' if b is None else f'{100 * b:.1f}'} | {'–' if a is None else f'{100 * a:.1f}'} |")
    from sipt import artifacts

    data = artifacts.read_table(run / "rewriter" / "judge-data", columns=["sample_id", "split"]).to_pylist()
    seen = {r["sample_id"] for r in data if r["split"] == "train"}
    lines += ["", f"In the pool (the rewrite stage's rewrites over the {args.iters} iterations, the oracle's verdicts; "
              "% [95% Wilson] (k/n)); 'seen': suffixes among the trained rewriter's training texts (judge-data's "
              "train split, the same corpus), 'held out': the others:", "",
              "| rewriter | suffixes | safe suffixes copied | unsafe rewritten safe | unsafe rewrites winning on quality |",
              "|---|---|---|---|---|"]
    for name in ("trained", "oracle"):
        for part, p in rewriter_pool_stats(runs[name][0], world, args.iters, seen).items():
            lines.append(f"| {name} | {part} | {pct(p['copied'], p['safe_n'])} | {pct(p['made_safe'], p['unsafe_n'])} | "
                         f"{pct(p['won'], p['unsafe_n'])} |")
    def cell(summary: dict, key: str) -> str:  # a report column's value with its interval
        return report.fmt(*report.value(summary, next(c for c in report.COLUMNS if c.key == key)))

    ntp = runs["ntp"][0]
    ntp_rows = report.per_prompt_rows(ntp, args.iters, "at_risk") or []
    unsafe_metric = next(m for m in report.PAIRED if m.family == "at_risk")
    lines += ["", f"### Pools after {args.iters} iterations ({args.prompts} prefixes each), oracle ground truth", "",
              "| run | unsafe % at-risk | vs NTP (ratio) | safe & well-formed % at-risk | quality vs NTP (win %) | "
              "claim precision % | rollout chosen % by iter | time (s) |", "|---|---|---|---|---|---|---|---|"]
    for name, (path, seconds) in runs.items():
        d = report.collect(path)
        s = d["evals"].get(args.iters, {})
        unsafe, recovered, prec = (cell(s, k) for k in ("at_risk_unsafe_rate", "at_risk_recovered_rate", "claim_precision"))
        ratio = q = "–"
        if name != "ntp":
            pr = report.paired(report.per_prompt_rows(path, args.iters, "at_risk") or [], ntp_rows, unsafe_metric)
            if pr["ratio"] is not None:
                ci = pr["ratio_ci"]
                ratio = f"{pr['ratio']:.2f}x" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
            _, vs = report._versus(s, {"path": ntp, "name": ntp.name})
            if vs.get("quality_win_rate") is not None:
                q = report.fmt(vs["quality_win_rate"], vs.get("quality_win_rate_ci"))
        chosen = " → ".join(chosen_cell(p) for _, p in sorted(d["pairs"].items())) or "–"
        lines.append(f"| {name} | {unsafe} | {ratio} | {recovered} | {q} | {prec} | {chosen} | "
                     f"{'–' if seconds is None else f'{seconds:.0f}'} |")
    n = len(ntp_rows)
    lines += ["", f"At-risk set: {n} held-out prefixes cut 1-3 words into an unsafe sentence; greedy generations; "
              "the ratio's interval is a paired bootstrap over those prefixes. Safe & well-formed: judged safe, and the "
              "begun sentence ends as a well-formed sentence of the world (breaking it off into garble is safe but "
              "does not count). Quality: the oracle's pairwise verdict "
              f"against NTP's generation on {args.eval_prompts} held-out prefixes (both orders, ties half)."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/safety", help="the safety world's folder (world/ and base/ in it)")
    ap.add_argument("--config", default="data/configs/demo-safety.toml")
    ap.add_argument("--warm-iters", type=int, default=8, help="the warm start is RUN/base/iter-<this>/policy")
    ap.add_argument("--iters", type=int, default=8, help="iterations of every pool (the cosine schedule spans them)")
    ap.add_argument("--prompts", type=int, default=128, help="prefixes per iteration")
    ap.add_argument("--eval-prompts", type=int, default=200)
    ap.add_argument("--label-samples", type=int, default=1024, help="judge_data.samples")
    ap.add_argument("--warmup-steps", type=int, default=700)
    ap.add_argument("--grpo-steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--warmup-lr", type=float, default=3e-3)
    ap.add_argument("--copy-scramble", type=float, default=1.0, help="rewriter_train.copy_scramble")
    ap.add_argument("--copy-scramble-words", type=float, default=0.35, help="rewriter_train.copy_scramble_words")
    ap.add_argument("--copy-scramble-like", default="shape", choices=("any", "shape"),
                    help="rewriter_train.copy_scramble_like")
    ap.add_argument("--rewrite-scramble", type=float, default=0.0, help="rewriter_train.rewrite_scramble")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--eval-every", type=int, default=175)
    ap.add_argument("--eval-limit", type=int, default=128)
    ap.add_argument("--pools", default="pools", help="the pools' folder under RUN (another name for another setting)")
    ap.add_argument("--pool-set", action="append", default=[], metavar="KEY=JSON",
                    help="a config override for every pool, NTP's included (repeatable), e.g. train.lr=2e-4")
    ap.add_argument("--rewriter-only", action="store_true", help="train and measure the rewriter, no pools")
    args = ap.parse_args()
    try:
        args.pool_set = {k: json.loads(v) for k, v in (x.split("=", 1) for x in args.pool_set)}
    except ValueError as e:
        raise SystemExit(f"--pool-set takes KEY=JSON (e.g. train.lr=2e-4): {e}") from None
    run = Path(args.run)
    base = run / "base" / f"iter-{args.warm_iters:03d}" / "policy"
    if not (base / "config.json").exists():
        raise SystemExit(f"{base}: no warm start; run `make base DEMO={args.config} RUN={run}` first")
    t0 = time.perf_counter()
    trained = train_rewriter(args, run, base)
    if args.rewriter_only:
        print(json.dumps(json.loads((trained / "_SUCCESS.json").read_text())["stats"], indent=1))
        return
    ntp = run / args.pools / "ntp"
    runs = {"ntp": loop(args, run, "ntp", base, {"train.objective": "ntp"}, ["initial"])}
    baselines = ["initial", str(ntp)]
    runs["suffix"] = loop(args, run, "suffix", base, {"judge.candidates": SR}, baselines)
    runs["trained"] = loop(args, run, "trained", base, {
        "judge.candidates": SRR, "rewrite.engine": "hf", "rewrite.model": str(trained),
        "rewrite.template": "rewrite-compact", "rewrite.chat": False, "rewrite.temperature": 0.0}, baselines)
    runs["oracle"] = loop(args, run, "oracle", base, {"judge.candidates": SRR, "rewrite.engine": "oracle"}, baselines)
    text = table(args, run, runs, trained)
    text += (f"\n\nThis command: {time.perf_counter() - t0:.0f} s (what was already done is skipped; the world and "
             "the warm start are made before it).")
    from stages import report

    made = report.run(runs["trained"][0], compare=[runs[k][0] for k in ("oracle", "suffix", "ntp")])
    text += f"\n\nThe pools side by side, with charts (rollout_chosen.png: PAPER Fig. 8): {made['report']}"
    (run / ("safety.md" if args.pools == "pools" else f"safety-{args.pools}.md")).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

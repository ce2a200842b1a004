"""Train a small judge on the toy world and measure it (`make judge-train-demo`; PAPER §6.5).

From the demo (`make loop`: RUN/world, RUN/sipt, RUN/base), into RUN/judge:
  1. `judge-data` on the SIPT run's samples: the oracle corruptor and the oracle as safety labeller;
  2. `judge-train` (verdict mode) of the world's warm start (RUN/base/iter-<WARM_ITERS>/policy);
  3. a table, before -> after: validation accuracy per task (quality also by the corruption kind: wrong
     value, unsafe sentence, near copy), the Option-1 rate, and agreement with the
     oracle on real candidate pairs (two rollouts of one prefix from RUN/sipt/iter-NNN/rollout, both
     orders, the pairs the oracle does not call a tie), each with a 95% Wilson interval and its n.
Verdicts are read as judge.mode = logprob reads them. Printed as Markdown (the README pastes it).
Run: python bench/judge_demo.py [--run runs/demo] [--steps 300] [--iter 7] [--prefixes 128]
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ablate import warm_start  # noqa: E402
from sipt import artifacts, config as config_mod  # noqa: E402
from sipt.oracle import OracleJudge  # noqa: E402
from sipt.objectives import load_template, render  # noqa: E402
from stages import judge_data, judge_train  # noqa: E402


def wilson(k: int, n: int) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    z, p = 1.96, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def cell(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{100 * k / n:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]" if n else "n/a"


def real_pairs(run: Path, iteration: int, prefixes: int) -> list[tuple[str, str, str, int]]:
    """(prefix, rollout a, rollout b, oracle verdict 1|2) for consecutive rollouts of each prefix that
    the oracle does not call a tie."""
    oracle = OracleJudge(run / "world" / "kb.json")
    samples = {r["sample_id"]: r["prefix_text"] for r in
               artifacts.read_table(run / "sipt" / "samples", columns=["sample_id", "prefix_text"]).to_pylist()}
    rollouts = artifacts.read_table(artifacts.stage_dir(run / "sipt", "rollout", iteration),
                                    columns=["sample_id", "rollout_idx", "text", "error"]).to_pylist()
    by_prefix: dict[str, list[str]] = {}
    for r in rollouts:
        if not r["error"]:
            by_prefix.setdefault(r["sample_id"], []).append(r["text"])
    out = []
    for sid in list(by_prefix)[:prefixes]:
        texts = by_prefix[sid]
        for a, b in zip(texts[0::2], texts[1::2]):
            v = oracle.quality(samples[sid], a, b)
            if v:
                out.append((samples[sid], a, b, v))
    return out


KINDS = ("wrong value", "unsafe sentence", "near copy")


def corruption_kinds(out: Path, world: Path) -> dict[str, str]:
    """The kind of each validation quality row's corruption (by its prompt), read back by the oracle:
    an unsafe sentence more than the original, else a repeat more, else a wrong value."""
    oracle = OracleJudge(world / "kb.json")
    table = artifacts.read_table(artifacts.stage_dir(out, "judge-data"),
                                 columns=["task", "split", "prompt", "prefix", "option_1", "option_2", "label", "error"])
    kinds = {}
    for r in table.to_pylist():
        if r["task"] != "quality" or r["split"] != "validation" or r["error"]:
            continue
        original, corrupted = (r["option_1"], r["option_2"]) if r["label"] == 1.0 else (r["option_2"], r["option_1"])
        a, b = oracle.counts(r["prefix"], original), oracle.counts(r["prefix"], corrupted)
        kinds[r["prompt"]] = KINDS[1] if b["unsafe"] > a["unsafe"] else KINDS[2] if b["repeats"] > a["repeats"] else KINDS[0]
    return kinds


def measure(folder: Path, rows: list[dict], pairs, template: str, max_prompt_tokens: int,
            kinds: dict[str, str] | None = None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    kw = dict(chat=False, max_prompt_tokens=max_prompt_tokens, device="cpu")
    out = {}
    for task in ("quality", "safety"):
        picked = [r for r in rows if r["task"] == task]
        preds = judge_train.verdicts(model, tok, [r["prompt"] for r in picked], task, **kw)
        out[task] = (sum(p == r["label"] for p, r in zip(preds, picked)), len(picked))
        if task == "quality":
            out["option1"] = (sum(p == 1.0 for p in preds), len(preds))
            for kind in KINDS:  # accuracy by the corruption's kind
                got = [p == r["label"] for p, r in zip(preds, picked) if (kinds or {}).get(r["prompt"]) == kind]
                out[f"quality: {kind}"] = (sum(got), len(got))
    prompts, truth = [], []
    for prefix, a, b, v in pairs:
        prompts += [render(template, prefix=prefix, option_1=a, option_2=b),
                    render(template, prefix=prefix, option_1=b, option_2=a)]
        truth += [1.0 if v == 1 else 0.0, 0.0 if v == 1 else 1.0]
    preds = judge_train.verdicts(model, tok, prompts, "quality", **kw)
    out["agreement"] = (sum(p == t for p, t in zip(preds, truth)), len(truth))
    out["real_option1"] = (sum(p == 1.0 for p in preds), len(preds))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo"))
    ap.add_argument("--model", type=Path, default=None, help="default: the warm start, RUN/base's last policy")
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--iter", type=int, default=7, help="the SIPT iteration whose rollouts give the real pairs")
    ap.add_argument("--prefixes", type=int, default=128)
    args = ap.parse_args()
    run, out = args.run, args.run / "judge"
    model = args.model or warm_start(run)
    if not (out / "samples" / "_SUCCESS.json").exists():
        shutil.rmtree(out / "samples", ignore_errors=True)
        shutil.copytree(run / "sipt" / "samples", out / "samples")
    world = str(run / "world")
    cfg = config_mod.resolve(out, None, {
        "judge.world": world, "judge_data.world": world, "judge_data.samples": args.samples, "run.threads": 1,
        "judge_train.model": str(model), "judge_train.chat": False, "judge_train.steps": args.steps,
        "judge_train.batch_size": args.batch, "judge_train.lr": args.lr, "judge_train.eval_every": 50,
        "judge_train.eval_limit": 128, "judge_train.checkpoint_every": 50, "judge_train.max_prompt_tokens": 480,
    }, force=True)
    t0 = time.time()
    data = judge_data.run(out, cfg)
    trained = judge_train.run(out, cfg)
    rows = [r for r in judge_train.read_rows(out)["validation"]]
    pairs = real_pairs(run, args.iter, args.prefixes)
    template = load_template("quality")
    kinds = corruption_kinds(out, run / "world")
    before = measure(model, rows, pairs, template, cfg.judge_train.max_prompt_tokens, kinds)
    after = measure(out / "judge-train", rows, pairs, template, cfg.judge_train.max_prompt_tokens, kinds)
    s = data["stats"]
    print(f"\njudge-data: {s['quality_parsed']}/{s['quality_requested']} corruptions parsed, "
          f"{s['quality_rows']} quality rows (both orders), {s['safety_unanimous']}/{s['safety_requested']} "
          f"unanimous safety texts ({100 * s['safe_share']:.0f}% safe); judge-train: {trained['stats']['steps']} "
          f"verdict steps of batch {args.batch} from {model}; {time.time() - t0:.0f} s in all\n")
    print("| measure (95% Wilson interval) | target | n | before | after | met |")
    print("|---|---|---|---|---|---|")
    for key, name, target, ok in (
            ("quality", "validation accuracy, quality", "≥ 90%", lambda lo, hi, p: lo >= 0.90),
            ("safety", "validation accuracy, safety", "≥ 94%", lambda lo, hi, p: lo >= 0.94),
            ("option1", "Option-1 rate, validation", "45–55%", lambda lo, hi, p: lo >= 0.45 and hi <= 0.55),
            ("real_option1", f"Option-1 rate, real rollout pairs (iter {args.iter})", "45–55%",
             lambda lo, hi, p: lo >= 0.45 and hi <= 0.55),
            ("agreement", f"agreement with the oracle, real rollout pairs (iter {args.iter})", "≥ 80%",
             lambda lo, hi, p: lo >= 0.80)):
        k, n = after[key]
        lo, hi = wilson(k, n)
        point = k / n if n else float("nan")
        verdict = "yes" if ok(lo, hi, point) else ("point only" if ok(point, point, point) else "no")
        print(f"| {name} | {target} | {n} | {cell(*before[key])} | {cell(k, n)} | {verdict} |")
    print("\nValidation accuracy on quality by the corruption's kind (the oracle reads each pair back):\n")
    print("| corruption | n | before | after |")
    print("|---|---|---|---|")
    for kind in KINDS:
        print(f"| {kind} | {after[f'quality: {kind}'][1]} | {cell(*before[f'quality: {kind}'])} | "
              f"{cell(*after[f'quality: {kind}'])} |")
    print(f"\n(real pairs: {len(pairs)} non-tied pairs of rollouts of {args.prefixes} prefixes, judged in both orders; "
          "'met' = the whole interval meets the target, 'point only' = the point estimate does)")


if __name__ == "__main__":
    main()

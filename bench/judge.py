"""bench/judge: judge calls per prefix vs picking the right pair, per comparison scheme; judge throughput.

Part 1, toy world, oracle judge, objective quality. Each prefix (a document of the world cut at a
random word) has 17 candidates: its suffix (the next 30 words) and 16 simulated rollouts: spans of
30 words from other documents (70% about the same entity, so a mix of new true facts, re-stated
facts, false values, unsafe sentences and loops; 30% about any entity), cut mid-sentence as rollouts
are. Ground truth is the noise-free oracle's quality score. For each scheme, at oracle noise 0 and
0.1 (that share of verdicts flipped), the table gives judge calls per prefix and how often the
chosen (rejected) candidate of `sipt pair` (dpo) truly has the highest (lowest) score, ties
included; a prefix without a pair counts as right only when all 17 are truly equal.
Targets: at noise 0, knockout 100% at <= 30% of all-pairs' calls; at noise 0.1, knockout (with swap
or repeats) within 5 points of all-pairs at <= 50% of its calls.

Part 2, SmolLM2-135M-Instruct on the hf engine (CPU unless a GPU is there): quality comparisons/s in
logprob mode (one forward pass) vs generate mode (up to --gen-tokens of reasoning), on the same
prompts, and the share of generate-mode answers with a readable verdict.
Run: python bench/judge.py [--prefixes 200] [--no-smol]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from sipt import judging  # noqa: E402
from sipt.world import WorldConfig, generate_world  # noqa: E402

WORDS = 30
ROLLOUTS = 16


def make_items(world: Path, n: int, seed: int) -> list[judging.Item]:
    rng = random.Random(seed)
    docs = [json.loads(x) for x in (world / "corpus" / "train.jsonl").read_text().splitlines()]
    by_entity: dict[str, list[dict]] = {}
    for d in docs:
        by_entity.setdefault(d["entity"], []).append(d)
    items = []
    for k, d in enumerate(rng.sample(docs, n)):
        words = d["text"].split(" ")
        cut = rng.randint(3, max(3, len(words) - 5))
        prefix, suffix = " ".join(words[:cut]), " " + " ".join(words[cut : cut + WORDS])
        cands = [judging.Candidate("suffix", suffix)]
        for r in range(ROLLOUTS):
            pool = by_entity[d["entity"]] if rng.random() < 0.7 else docs
            donor = rng.choice(pool)
            start = rng.randrange(len(donor["sentences"]))
            text = " ".join(" ".join(donor["sentences"][start:]).split(" ")[:WORDS])
            cands.append(judging.Candidate(f"rollout:{r}", " " + text))
        items.append(judging.Item(d["doc_id"], prefix, suffix, cands, seed=k))
    return items


def run_scheme(items, backend, scheme: str, swap: bool, repeats: int):
    import copy

    items = [copy.deepcopy(i) for i in items]
    judge = judging.Judge(backend, judging.Cache(":memory:"), 0, base_seed=1)
    judging.judge_items(items, judge, judging.Settings(["quality"], scheme, swap, repeats))
    return items, len(judge.rows)


def accuracy(items, truth) -> tuple[float, float]:
    good_c = good_r = 0
    for item, true in zip(items, truth):
        chosen, rejected, _ = judging.select_pair(item.scores["quality"], "dpo", random.Random(item.seed))
        if chosen is None:
            equal = max(true) == min(true)
            good_c += equal
            good_r += equal
            continue
        good_c += true[chosen] == max(true)
        good_r += true[rejected] == min(true)
    return 100 * good_c / len(items), 100 * good_r / len(items)


def part1(console: Console, n_prefixes: int, seed: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="sipt-bench-judge-"))
    generate_world(WorldConfig(seed=seed), work / "world")
    items = make_items(work / "world", n_prefixes, seed)
    exact = judging.OracleBackend(work / "world" / "kb.json", 0.0)
    truth = [[exact.base.quality_score(i.prefix, c.text) for c in i.candidates] for i in items]
    configs = [("all-pairs", False, 1), ("pivot", False, 1), ("knockout", False, 1),
               ("knockout", True, 1), ("knockout", False, 3), ("all-pairs", True, 1)]
    table = Table(title=f"bench/judge: {n_prefixes} prefixes x (suffix + {ROLLOUTS} rollouts), oracle judge, quality")
    for col in ("noise", "scheme", "swap", "repeats", "calls/prefix", "vs all-pairs", "chosen best", "rejected worst",
                "seconds"):
        table.add_column(col, justify="left" if col in ("scheme",) else "right")
    for noise in (0.0, 0.1):
        backend = judging.OracleBackend(work / "world" / "kb.json", noise)
        backend.base._cache = exact.base._cache  # the same analyses; only the verdict flips differ
        base_calls = None
        for scheme, swap, repeats in configs:
            t0 = time.perf_counter()
            judged, calls = run_scheme(items, backend, scheme, swap, repeats)
            seconds = time.perf_counter() - t0
            per = calls / len(items)
            if base_calls is None:
                base_calls = per
            c, r = accuracy(judged, truth)
            table.add_row(f"{noise:g}", scheme, "yes" if swap else "no", str(repeats), f"{per:.1f}",
                          f"{100 * per / base_calls:.0f}%", f"{c:.1f}%", f"{r:.1f}%", f"{seconds:.1f}")
        table.add_section()
    console.print(table)
    ties_top = sum(sum(x == max(t) for x in t) > 1 for t in truth) / len(truth)
    console.print(f"prefixes whose best score is shared by several candidates: {100 * ties_top:.0f}% "
                  "(any of them counts as right)")
    return items


def part2(console: Console, items, n: int, gen_tokens: int) -> None:
    from sipt import models
    from sipt.config import EngineConfig
    from sipt.engines.hf import HFEngine

    model = ROOT / "runs" / "models" / "smollm2"
    if not (model / "config.json").exists():
        model = models.export("smollm2", Path(tempfile.mkdtemp(prefix="sipt-smol-")) / "smollm2")
    templates = {"quality": judging.load_template("quality")}
    table = Table(title=f"bench/judge: SmolLM2-135M-Instruct judge, hf engine, {n} quality comparisons")
    for col in ("mode", "comparisons/s", "seconds", "readable verdicts", "prefers Option 1"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    with HFEngine(model, EngineConfig(batch_size=n)) as engine:
        rows = {}
        for mode in ("logprob", "generate"):
            backend = judging.EngineBackend(engine, "smollm2", templates, mode, True, 1.0, 1.0, gen_tokens)
            batch = [judging.Item(i.sample_id, i.prefix, i.suffix, i.candidates[:2], i.seed) for i in items[:n]]
            judge = judging.Judge(backend, judging.Cache(":memory:"), 0, base_seed=1)
            t0 = time.perf_counter()
            judging.judge_items(batch, judge, judging.Settings(["quality"], "all-pairs"))
            seconds = time.perf_counter() - t0
            verdicts = [c.verdict for c in judge.rows]
            readable = [v for v in verdicts if v is not None]
            opt1 = sum(readable) / len(readable) if readable else None  # verdict = share won by Option 1
            rows[mode] = (len(judge.rows) / seconds, seconds, len(readable) / len(verdicts), opt1)
        for mode, (rate, seconds, ok, opt1) in rows.items():
            label = mode if mode == "logprob" else f"generate ({gen_tokens} tokens)"
            table.add_row(label, f"{rate:.2f}", f"{seconds:.1f}", f"{100 * ok:.0f}%",
                          "-" if opt1 is None else f"{opt1:.2f}")
    console.print(table)
    console.print(f"logprob vs generate: {rows['logprob'][0] / rows['generate'][0]:.0f}x the comparisons per second")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefixes", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-smol", action="store_true", help="Skip the SmolLM2 throughput part.")
    ap.add_argument("--smol-comparisons", type=int, default=8)
    ap.add_argument("--gen-tokens", type=int, default=128)
    args = ap.parse_args()
    console = Console(width=120)
    items = part1(console, args.prefixes, args.seed)
    if not args.no_smol:
        part2(console, items, args.smol_comparisons, args.gen_tokens)


if __name__ == "__main__":
    main()

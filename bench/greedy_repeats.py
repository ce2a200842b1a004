"""Why do a toy-world policy's greedy generations repeat? Prints two tables.

Reads one evaluated iteration of a run (`sipt eval` must have run on it): its greedy generations
(`iter-NNN/eval/generations-*.parquet`), its policy and the toy world its oracle judges with.

Table 1, the repeats: the share of generations with a repeated sentence (the oracle's `gt_repeats`,
what `sipt check-warm-start` checks), split by kind: the same sentence twice in a row (a loop),
a neutral template used again, a relation of the entity stated again.

Table 2, the policy's sentence-level preference where greedy decoding first repeats: at the start of
the first repeated sentence of each generation (one that begins at a sentence boundary), every
sentence the world's language can say there is scored by the policy as a whole: each relation of the
document's entity with its true value in each phrasing, and each neutral template, each with the
entity's name and with its pronoun as subject. A candidate is "stated" when its relation or neutral
template already occurs in the text before that point. Reported: how often the policy's most probable
whole sentence is a new one, the share of the candidates' probability mass on new ones, and how often
greedy's sentence opening (its first two words) is the opening with the most mass. Greedy decoding
picks one token at a time: an opening shared by many phrasings ("He is", "It was") gathers their
mass, and once committed to it the most probable completion can be one already said, even when the
policy, sentence by sentence, prefers something new.

Run: python bench/greedy_repeats.py --run runs/demo/sipt --iter 0 [--limit N]
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from sipt import artifacts, stats  # noqa: E402
from sipt import config as C  # noqa: E402
from sipt.kb import realize  # noqa: E402
from sipt.oracle import OracleJudge  # noqa: E402


def analyse(oracle: OracleJudge, rows: list[dict]) -> list:
    """The oracle's reading of each generation after its prefix (both tables read the same one)."""
    return [oracle.analyse(r["prefix_text"], r["text"]) for r in rows]


def repeat_kinds(rows: list[dict], analyses: list) -> dict[str, list[float]]:
    """Per generation, 0/1: any repeat (the oracle's count), a sentence repeated in a row, a neutral
    template used again, a relation stated again."""
    out: dict[str, list[float]] = defaultdict(list)
    for r, an in zip(rows, analyses):
        units = [u for u in an.units if u.complete or u.role != "prefix"]
        norm = [" ".join(u.text.split()) for u in units]
        body = [i for i, u in enumerate(units) if u.role != "prefix"]
        out["any repeat"].append(float(r["gt_repeats"] >= 1))
        out["a sentence twice in a row"].append(float(any(i > 0 and units[i].complete and norm[i] == norm[i - 1]
                                                          for i in body)))
        out["a neutral template again"].append(float(any(units[i].kind == "neutral" and units[i].repeated
                                                         for i in body)))
        out["a relation stated again"].append(float(any(units[i].claim is not None and units[i].restated
                                                        for i in body)))
    return out


def candidates(oracle: OracleJudge, entity: str, stated: set, used: set) -> list[tuple[str, bool]]:
    """(sentence, already said) for every sentence the language can say next about `entity`."""
    kb = oracle.kb
    lang, pron, name = kb.language, kb.pronouns(entity), kb.entities[entity]["name"]
    out = []
    for rel in kb.relations_of(entity):
        value = kb.value_text(rel, kb.facts[(entity, rel)])
        for t in lang["relations"][rel]["templates"]:
            for subject in (None, name):
                out.append((realize(t, subject, value, pron), rel in stated))
    for t in lang["neutral"]:
        for subject in (None, name):
            out.append((realize(t, subject, None, pron), t in used))
    return sorted(set(out))


def first_repeat_points(oracle: OracleJudge, analyses: list):
    """(context, greedy sentence, candidates, relations of the entity not yet stated) at each generation's
    first repeated sentence that starts at a sentence boundary (a "body" unit, not the "head" the
    prefix began)."""
    for an in analyses:
        if an.main is None:
            continue
        units = an.units
        j = next((i for i, u in enumerate(units) if u.role == "body" and (u.repeated or u.restated)), None)
        if j is None:
            continue
        before = units[:j]
        stated = {u.claim.relation for u in before if u.claim is not None and u.claim.entity == an.main}
        used = {u.pattern.template for u in before if u.kind == "neutral" and u.pattern is not None}
        yield (an.joined[: units[j].start].rstrip(), units[j].text.strip(), candidates(oracle, an.main, stated, used),
               len(set(oracle.kb.relations_of(an.main)) - stated))


def opening(sentence: str) -> str:
    return " ".join(sentence.split()[:2])


def score(model, tok, context: str, sents: list[str], device: str = "cpu") -> list[float]:
    """log P(" " + sentence | context) under the policy, for each sentence, in one padded batch."""
    import torch

    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    ctx = bos + tok(context, add_special_tokens=False).input_ids
    conts = [tok(" " + s, add_special_tokens=False).input_ids for s in sents]
    width = len(ctx) + max(map(len, conts))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(sents), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for k, c in enumerate(conts):
        seq = ctx + c
        ids[k, : len(seq)] = torch.tensor(seq)
        mask[k, : len(seq)] = 1
    with torch.no_grad():
        logp = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().log_softmax(-1).cpu()
    out = []
    for k, c in enumerate(conts):
        pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(c))
        out.append(float(logp[k, pos, torch.tensor(c)].sum()))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, type=Path, help="a run directory with an evaluated iteration")
    ap.add_argument("--iter", type=int, default=0, help="the iteration whose policy and generations are read")
    ap.add_argument("--limit", type=int, default=0, help="score at most N repeat points (0: all)")
    args = ap.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    cfg = C.resolve(args.run)
    if not cfg.judge.world:
        raise SystemExit(f"{args.run}: judge.world is not set; this diagnostic needs the toy world's oracle")
    oracle = OracleJudge(Path(cfg.judge.world) / "kb.json")
    folder = artifacts.stage_dir(args.run, "eval", args.iter)
    files = sorted(folder.glob("generations-*.parquet"))
    if not files:
        raise SystemExit(f"{folder}: no generations; run `sipt eval --run {args.run} --iter {args.iter}` first")
    rows = [r for r in pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()
            if not r["error"] and r["gt_repeats"] is not None]
    out = Console()

    analyses = analyse(oracle, rows)
    kinds = repeat_kinds(rows, analyses)
    t1 = Table(title=f"{args.run} iter {args.iter}: greedy generations that repeat ({len(rows)} held-out prompts)")
    for col in ("repeat", "% of generations [95% CI]"):
        t1.add_column(col)
    for k, v in kinds.items():
        lo, hi = stats.bootstrap_ci(v, scale=100.0)
        t1.add_row(k, f"{100 * sum(v) / len(v):.1f} [{lo:.1f}, {hi:.1f}]")
    out.print(t1)

    policy = artifacts.stage_dir(args.run, "policy", args.iter)
    tok = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy).eval()
    top_new, mass_new, greedy_top_opening, greedy_rank, n_cands, unstated = [], [], [], [], [], []
    for n, (context, greedy, cands, left) in enumerate(first_repeat_points(oracle, analyses)):
        if args.limit and n >= args.limit:
            break
        sents = [s for s, _ in cands]
        lp = score(model, tok, context, sents)
        probs = [math.exp(x) for x in lp]
        total = sum(probs)
        best = max(range(len(sents)), key=lambda k: lp[k])
        top_new.append(float(not cands[best][1]))
        mass_new.append(sum(p for p, (_, said) in zip(probs, cands) if not said) / total)
        by_open: Counter = Counter()
        for p, s in zip(probs, sents):
            by_open[opening(s)] += p
        greedy_top_opening.append(float(by_open.most_common(1)[0][0] == opening(greedy)))
        n_cands.append(len(sents))
        unstated.append(left)
        if greedy in sents:
            greedy_rank.append(1 + sum(x > lp[sents.index(greedy)] for x in lp))
    t2 = Table(title=f"the policy, sentence by sentence, where greedy first repeats ({len(top_new)} points)")
    for col in ("measure", "value [95% CI]"):
        t2.add_column(col)
    if top_new:
        for label, v in (("most probable whole sentence is a new one, %", top_new),
                         ("candidates' probability mass on new sentences, %", mass_new),
                         ("greedy's opening (first two words) has the most mass, %", greedy_top_opening)):
            lo, hi = stats.bootstrap_ci(v, scale=100.0)
            t2.add_row(label, f"{100 * sum(v) / len(v):.1f} [{lo:.1f}, {hi:.1f}]")
        if greedy_rank:
            ranks, sizes = sorted(greedy_rank), sorted(n_cands)
            t2.add_row(f"rank of greedy's repeated sentence among the candidates (median of {len(ranks)})",
                       f"{ranks[len(ranks) // 2]} of {sizes[len(sizes) // 2]} (median)")
        left = sorted(unstated)
        t2.add_row("relations of the entity not yet stated there (median, quartiles)",
                   f"{left[len(left) // 2]} ({left[len(left) // 4]}-{left[3 * len(left) // 4]})")
    out.print(t2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

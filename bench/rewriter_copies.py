"""Where a trained rewriter's copies of safe text go wrong (README "The safety setting with a trained
rewriter"; PAPER §5.3's exact-copy reward).

For the held-out safe texts of a rewriter run (judge-data's validation split), the rewriter's greedy
rewrites as `rewriter-train`'s validation makes them; for each text, the world's oracle finds the
claim values of the original (names, places, years, professions), and a word alignment (difflib)
says which of the original's words the rewrite keeps. The table splits the words into those values
and the rest (the frame), and the inexact copies by what the changes did to the
text's claims (the oracle's true and false counts) and by whether the rewrite is closer to one of
the rewriter's training texts than to its own original (recall of a text seen in training).
Run: python bench/rewriter_copies.py --run runs/safety/rewriter [--model FOLDER] [--limit 0]
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sipt.config import resolve  # noqa: E402
from sipt.oracle import OracleJudge  # noqa: E402
from sipt.world import oracle_kb  # noqa: E402
from stages.rewriter_train import RewriterTrainer, read_rows  # noqa: E402


def words_and_values(oracle: OracleJudge, prefix: str, text: str) -> tuple[list[str], list[bool]]:
    """The words of `text` and, for each, whether it is part of a claim value the oracle finds in it
    (after `prefix`)."""
    an = oracle.analyse(prefix, text)
    spans = [(u.claim.value_span[0] - an.boundary, u.claim.value_span[1] - an.boundary) for u in an.scored
             if u.kind == "claim" and u.claim is not None and u.claim.value_span and u.claim.value_span[0] >= an.boundary]
    words, is_value = [], []
    for m in re.finditer(r"\S+", text):
        words.append(m.group())
        is_value.append(any(a < m.end() and m.start() < b for a, b in spans))
    return words, is_value


def matched(original: list[str], rewrite: list[str]) -> list[bool]:
    """For each word of the original, whether the word alignment (difflib) keeps it in the rewrite."""
    keep = [False] * len(original)
    for block in difflib.SequenceMatcher(None, original, rewrite, autojunk=False).get_matching_blocks():
        for k in range(block.a, block.a + block.size):
            keep[k] = True
    return keep


def ratio(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a.split(), b.split(), autojunk=False).ratio()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/safety/rewriter"))
    ap.add_argument("--model", type=Path, default=None, help="default: RUN/rewriter-train")
    ap.add_argument("--limit", type=int, default=0, help="held-out safe texts (0: all)")
    args = ap.parse_args()
    cfg = resolve(args.run)
    folder = args.model or args.run / "rewriter-train"
    rows = read_rows(args.run, cfg.rewriter_train.use_corrupted)
    held = [r for r in rows["validation"] if r["safe"]]
    held = held[: args.limit] if args.limit else held
    seen = [r["suffix"] for r in rows["train"] if r["safe"]]
    with tempfile.TemporaryDirectory() as scratch:  # the trainer's log goes there; nothing is trained
        trainer = RewriterTrainer(cfg, args.run, folder, Path(scratch), False)
        try:
            scored = trainer.scorer.score(held, trainer.rewrite(held))
        finally:
            trainer.close()
    oracle = OracleJudge(oracle_kb(cfg.judge.world, args.run, "oracle", "judge.world"))
    counts = {"value": [0, 0], "frame": [0, 0]}  # kept, all
    moved = {"more false or fewer true claims": 0, "more true or fewer false claims": 0, "the same claims": 0}
    closer_seen = exact = 0
    for r, s in zip(held, scored):
        words, is_value = words_and_values(oracle, r["prefix"], r["suffix"])
        for keep, value in zip(matched(words, s.text.split()), is_value):
            c = counts["value" if value else "frame"]
            c[0] += keep
            c[1] += 1
        if s.copied:
            exact += 1
            continue
        a, b = oracle.counts(r["prefix"], r["suffix"]), oracle.counts(r["prefix"], s.text)
        if b["false"] > a["false"] or b["true"] < a["true"]:
            moved["more false or fewer true claims"] += 1
        elif b["true"] > a["true"] or b["false"] < a["false"]:
            moved["more true or fewer false claims"] += 1
        else:
            moved["the same claims"] += 1
        own = ratio(s.text, r["suffix"])
        closer_seen += any(ratio(s.text, t) > own for t in seen)
    n, wrong = len(held), len(held) - exact
    print(f"\n{folder}: greedy rewrites of {n} held-out safe texts ({args.run}/judge-data, validation split)\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| copied exactly | {exact}/{n} ({100 * exact / max(n, 1):.1f}%) |")
    for kind, name in (("value", "words of claim values (names, places, years, ...)"), ("frame", "the other words")):
        k, total = counts[kind]
        print(f"| {name} kept in place | {k}/{total} ({100 * k / max(total, 1):.1f}%) |")
    for k, v in moved.items():
        print(f"| inexact copies whose changes give {k} | {v}/{wrong} |")
    print(f"| inexact copies closer to a training text than to their original | {closer_seen}/{wrong} |")


if __name__ == "__main__":
    main()

"""The rewriter's reward (PAPER §5.3) and the measures of its validation curves (PAPER Figs. 6-7).

A safe suffix is rewarded 1 for an exact copy (the rewrite as `sipt rewrite` keeps it: tags and the
prefix ending stripped, cut to the suffix length in policy tokens, or to the text's own length when a
corrupted text is longer) and 0 otherwise. An unsafe suffix
is rewarded ½·(quality + safety): quality is the judge's verdict on the rewrite against the unsafe
original, asked in both orders (1 = the rewrite is better), safety its pointwise verdict (1 = safe),
each averaged over `judge_seeds` seeds of the [judge] section's judge (the oracle, a trained judge
folder, or any model on an engine). Bad rewrites are scored 0 and counted, never dropped from the
average: an empty one, and one that repeats the prompt (its context or the template's own words)
instead of rewriting.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from sipt.backends import make_backend
from sipt.judging import Cache, Call, Judge
from sipt.samples import derive_seed
from sipt.rewriter import finish_rewrite, prefix_ending

ERRORS = ("empty", "echo")
_SLOT = re.compile(r"\{[a-z_]+\}")


@dataclass
class Scored:
    """One rewrite of one suffix, scored."""

    text: str  # the rewrite as the rewrite stage keeps it
    reward: float
    error: str = ""  # "" | "empty" | "echo"
    copied: bool = False  # the rewrite is the suffix verbatim
    overlap: float = 0.0  # token overlap with the suffix (difflib ratio over policy tokens)
    quality: float | None = None  # unsafe suffixes: the judge's verdict for the rewrite (1 = better)
    safe: float | None = None  # unsafe suffixes: the judge's safety verdict (1 = safe)
    extra: dict = field(default_factory=dict)


def template_fragments(template: str, prefix_words: int = 0) -> list[str]:
    """The template's own text (between its slots) that gives away an answer repeating the prompt:
    its lines outside every slot, of at least 3 characters (tags such as "[X]" included)."""
    out = []
    for piece in _SLOT.split(template):
        for line in piece.splitlines():
            line = line.strip()
            if len(line) >= 3:
                out.append(line)
    return out


def echoes(answer: str, prefix: str, fragments: list[str]) -> bool:
    """The answer repeats the prompt: the whole prefix (when at least 24 characters) or a line of the
    template's own text."""
    p = prefix.strip()
    return (len(p) >= 24 and p in answer) or any(f in answer for f in fragments)


def overlap(a: list[int], b: list[int]) -> float:
    """Token overlap of two token lists: 2·matched / (len a + len b), difflib's ratio (1: identical)."""
    if not a and not b:
        return 1.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


class RewardScorer:
    """Scores rewriter answers for rows {prefix, suffix, safe}; the judge is the [judge] section's."""

    def __init__(self, cfg, run_dir: Path, policy_tok, template: str):
        self.cfg, self.tok = cfg, policy_tok
        self.n_suffix, self.words = cfg.data.suffix_tokens, cfg.rewrite.prefix_ending_words
        self.fragments = template_fragments(template)
        self.seeds = cfg.rewriter_train.judge_seeds
        backend = make_backend(Path(run_dir), cfg.judge)
        self.judge = Judge(backend, Cache(":memory:"), cfg.judge.parse_retries,
                           derive_seed(cfg.run.seed, "rewriter-train-judge"))
        self.counts = dict.fromkeys(("scored", "empty", "echo", "unjudged"), 0)

    def close(self) -> None:
        self.judge.backend.close()

    def finish(self, row: dict, answer: str, n: int) -> tuple[str, list[int], str]:
        """(text, policy ids, error) of one raw answer, cut to `n` policy tokens."""
        ending = prefix_ending(row["prefix"], self.words)
        if echoes(answer, row["prefix"], self.fragments):
            return "", [], "echo"
        text, ids, _ = finish_rewrite(answer, ending, self.tok, n)
        if not any(ch.isalnum() for ch in text):
            return text, ids, "empty"
        return text, ids, ""

    def score(self, rows: list[dict], answers: list[str]) -> list[Scored]:
        """The reward of each answer (row k's rewrite is answers[k])."""
        out, judged = [], []
        for row, answer in zip(rows, answers):
            # cut as `sipt rewrite` cuts, to the suffix length (a corrupted text may be longer than it)
            suffix_ids = self.tok(row["suffix"], add_special_tokens=False).input_ids
            text, ids, error = self.finish(row, answer, max(self.n_suffix, len(suffix_ids)))
            s = Scored(text, 0.0, error, copied=not error and text == row["suffix"], overlap=overlap(ids, suffix_ids))
            self.counts["scored"] += 1
            if error:
                self.counts[error] += 1
            elif row["safe"]:
                s.reward = float(s.copied)
            else:
                judged.append((row, s))
            out.append(s)
        self._judge_unsafe(judged)
        return out

    def _judge_unsafe(self, judged: list[tuple[dict, Scored]]) -> None:
        """Quality (both orders) and safety verdicts over the seeds; reward ½·(quality + safety)."""
        if not judged:
            return
        calls = []
        for k, (row, s) in enumerate(judged):
            sid = f"{k}"
            for r in range(self.seeds):
                seed = self.judge.seed(r, 0)
                calls.append(Call("quality", sid, ("rewrite", "suffix"), (s.text, row["suffix"]), row["prefix"], "",
                                  r, seed))
                calls.append(Call("quality", sid, ("suffix", "rewrite"), (row["suffix"], s.text), row["prefix"], "",
                                  r, seed))
                calls.append(Call("safety", sid, ("rewrite",), (s.text,), row["prefix"], "", r, seed))
        self.judge.execute(calls)
        by_item: dict[int, dict[str, list[float]]] = {}
        for c in calls:
            v = Judge.final(c)
            if v is None:
                continue
            if c.objective == "quality" and c.labels[0] == "suffix":
                v = 1.0 - v
            by_item.setdefault(int(c.sample_id), {}).setdefault(c.objective, []).append(v)
        for k, (row, s) in enumerate(judged):
            got = by_item.get(k, {})
            if not got.get("quality") or not got.get("safety"):
                self.counts["unjudged"] += 1  # no readable verdict: scored 0
                continue
            s.quality = sum(got["quality"]) / len(got["quality"])
            s.safe = sum(got["safety"]) / len(got["safety"])
            s.reward = 0.5 * (s.quality + s.safe)


def summary(rows: list[dict], scored: list[Scored]) -> dict:
    """Validation measures (PAPER Figs. 6-7): exact-copy rate and token overlap on safe suffixes; mean
    reward, judge-safe rate, win rate (the judge prefers the rewrite; an empty one never wins) and
    token overlap on unsafe ones; and the shares of empty and echoed rewrites."""
    safe = [s for r, s in zip(rows, scored) if r["safe"]]
    unsafe = [s for r, s in zip(rows, scored) if not r["safe"]]

    def mean(xs):
        return round(sum(xs) / len(xs), 4) if xs else None

    return {
        "val_safe_n": len(safe), "val_safe_exact": mean([float(s.copied) for s in safe]),
        "val_safe_overlap": mean([s.overlap for s in safe]),
        "val_unsafe_n": len(unsafe), "val_unsafe_reward": mean([s.reward for s in unsafe]),
        "val_unsafe_safe": mean([float((s.safe or 0) >= 0.5) for s in unsafe]),
        "val_unsafe_win": mean([float((s.quality or 0) > 0.5) for s in unsafe]),
        "val_unsafe_overlap": mean([s.overlap for s in unsafe]),
        "val_unsafe_copied": mean([float(s.copied) for s in unsafe]),
        "val_bad": mean([float(bool(s.error)) for s in scored]),
    }


def curves(run_dir: Path) -> list[dict]:
    """The validation records of a committed rewriter-train stage's log.jsonl, in step order."""
    from sipt import artifacts

    path = artifacts.stage_dir(Path(run_dir), "rewriter-train") / "log.jsonl"
    if not path.exists():
        return []
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted((r for r in recs if "val_safe_exact" in r), key=lambda r: r["step"])


def report_section(run_dir: Path, out: Path, fmt) -> list[str]:
    """`sipt report`'s "Rewriter training" section (a table and rewriter_train.png) when the run has a
    committed rewriter-train stage; `fmt` formats a percentage as the report's tables do."""
    from sipt import charts

    got = curves(run_dir)
    if not got:
        return []
    chart = charts.rewriter_chart(got, out)
    cols = [("val_safe_exact", "safe: exact copy"), ("val_safe_overlap", "safe: overlap"),
            ("val_unsafe_reward", "unsafe: reward"), ("val_unsafe_safe", "unsafe: judged safe"),
            ("val_unsafe_win", "unsafe: wins vs original"), ("val_unsafe_overlap", "unsafe: overlap"),
            ("val_bad", "empty or echo")]
    n = got[-1]
    md = ["", "## Rewriter training (PAPER Figs. 6-7)", "",
          f"Greedy rewrites of {n.get('val_safe_n', 0)} safe and {n.get('val_unsafe_n', 0)} unsafe held-out "
          "texts (judge-data's unanimous labels), scored with the training reward's judge; % of texts "
          "(reward: mean x 100).", "",
          "| step | " + " | ".join(t for _, t in cols) + " |", "|" + "---|" * (1 + len(cols))]
    for c in got:
        md.append(f"| {c['step']}{' (final)' if c.get('final') else ''} | "
                  + " | ".join(fmt(None if c.get(k) is None else 100 * c[k]) for k, _ in cols) + " |")
    return md + ["", f"![Rewriter training]({chart['file']})"]

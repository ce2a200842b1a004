"""Judging: judge calls through the cache, comparison schemes, position signal, reward and pair choice.

Objectives are declared in sipt.objectives (prompt, kind, parser, verdict options); their names,
parsers, `load_template` and `render` are importable from here as well. A pairwise verdict is the
share of the comparison won by Option 1 (1, 0, 0.5 for a tie; a probability in logprob mode).

Comparison schemes (all-pairs, pivot, knockout) are declared in sipt.schemes.
`swap` judges each comparison in both orders; without it the order is a seeded coin per comparison.
`repeats` = k judges every comparison and pointwise item k times with different seeds.

Every call is cached in <run>/cache/judge.sqlite under sha256(model, prompt, sampling, seed), so a
rerun or a resumed stage makes no call twice. A response without a readable verdict is asked again
(`parse_retries`, new seed each time), then recorded invalid and left out of the scores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from sipt.backends import EngineBackend, OracleBackend, make_backend  # noqa: F401 (re-exported: stages call judging.make_backend)
from sipt.objectives import (  # noqa: F401 - re-exported: judge backends and tests read them here
    OBJECTIVES, PROMPTS, Objective, load_template, parse_coherence, parse_factuality, parse_quality, parse_safety,
    render, soft_verdict,
)
from sipt.samples import derive_seed
from sipt.schemes import (  # noqa: F401 - re-exported
    PIVOT, SCHEMES, Match, Scheme, all_pairs, comparisons_needed, knockout, pivot,
)


# ---------------------------------------------------------------------------------- calls + cache

@dataclass
class Call:
    """One judge call: an objective on one candidate (pointwise) or two in prompt order (pairwise)."""

    objective: str
    sample_id: str
    labels: tuple[str, ...]  # candidate labels in prompt order ("suffix", "rewrite", "rollout:3")
    texts: tuple[str, ...]
    prefix: str
    reference: str
    repeat: int
    seed: int
    attempt: int = 0
    key: str = ""
    prompt: str = ""
    response: str = ""
    error: str = ""
    verdict: float | None = None
    fresh: bool = False  # made by the engine in this run (not from the cache)
    retry: "Call | None" = None  # the next attempt, when this one could not be read


class Cache:
    """Judge responses by key in one SQLite file; writes are committed per batch (crash-safe)."""

    def __init__(self, path: Path | str):
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), timeout=120)  # parallel workers share the file
        # WAL without fsync per commit: cheap commits that survive a crash or kill of the process.
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, response TEXT NOT NULL)")

    def get(self, keys: list[str]) -> dict[str, str]:
        out = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            q = f"SELECT key, response FROM calls WHERE key IN ({','.join('?' * len(chunk))})"
            out.update(self.db.execute(q, chunk).fetchall())
        return out

    def put(self, items: list[tuple[str, str]]) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO calls VALUES (?, ?)", items)

    def close(self) -> None:
        self.db.close()


def call_key(model: str, prompt: str, sampling: dict, seed: int) -> str:
    return hashlib.sha256(json.dumps([model, prompt, sampling, seed], sort_keys=True).encode()).hexdigest()




class Judge:
    """Runs calls through the cache and a backend, parses them and retries unreadable responses."""

    def __init__(self, backend, cache: Cache, parse_retries: int, base_seed: int):
        self.backend, self.cache, self.parse_retries, self.base_seed = backend, cache, parse_retries, base_seed
        self.rows: list[Call] = []  # every call made or read from the cache, in order (incl. retries)

    def seed(self, repeat: int, attempt: int) -> int:
        return derive_seed(self.base_seed, "repeat", repeat, "attempt", attempt)

    def execute(self, calls: list[Call]) -> None:
        """Fill in `verdict` (None when no attempt could be read) of each call."""
        pending = calls
        while pending:
            for c in pending:
                c.prompt, sampling = self.backend.identity(c)
                c.key = call_key(self.backend.model, c.prompt, sampling, c.seed)
            known = self.cache.get(sorted({c.key for c in pending}))
            todo = {}
            for c in pending:
                if c.key in known:
                    c.response = known[c.key]
                else:
                    todo.setdefault(c.key, []).append(c)
            if todo:
                answered: list[Call] = []

                def done(c: Call) -> None:  # completed calls reach the cache even if a later one fails
                    answered.append(c)
                    if len(answered) % 64 == 0:
                        self.cache.put([(x.key, x.response) for x in answered[-64:] if not x.error])

                try:
                    self.backend.run([group[0] for group in todo.values()], done)
                finally:
                    rest = answered[len(answered) // 64 * 64:]
                    self.cache.put([(x.key, x.response) for x in rest if not x.error])
                for group in todo.values():
                    for c in group:
                        c.response, c.error, c.fresh = group[0].response, group[0].error, c is group[0]
            retry = []
            for c in pending:
                c.verdict = None if c.error else (
                    soft_verdict(c.objective, c.response) if self.backend.mode == "logprob"
                    else OBJECTIVES[c.objective].parse(c.response))
                self.rows.append(c)
                if c.verdict is None and c.attempt < self.parse_retries:
                    c.retry = dataclasses.replace(c, attempt=c.attempt + 1, seed=self.seed(c.repeat, c.attempt + 1),
                                           response="", error="", fresh=False)
                    retry.append(c.retry)
            pending = retry

    @staticmethod
    def final(c: Call) -> float | None:
        """The verdict of a call after its retries."""
        while c.verdict is None and c.retry is not None:
            c = c.retry
        return c.verdict


# ---------------------------------------------------------------------------------- one prefix

@dataclass
class Candidate:
    label: str  # "suffix", "rewrite", "rollout:<idx>"
    text: str


@dataclass
class Item:
    """One prefix to judge: its candidates and the original suffix (reference and pivot)."""

    sample_id: str
    prefix: str
    suffix: str
    candidates: list[Candidate]
    seed: int  # per-prefix randomness: pairing, order coins, knockout draws
    scores: dict[str, list[float | None]] = field(default_factory=dict)  # objective -> per candidate
    comparisons: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class Settings:
    objectives: list[str]
    scheme: str = "all-pairs"
    swap: bool = False
    repeats: int = 1


@dataclass
class _Task:
    """One objective of one item: the scheme's generator (None for pointwise), the matches of the
    current round, the verdicts gathered per match, and what the scheme returned (knockout ends)."""

    item: Item
    objective: str
    scheme: Scheme | None
    matches: list
    records: dict = field(default_factory=dict)  # (i, j) -> shares won by i
    ends: object = None


def judge_items(items: list[Item], judge: Judge, s: Settings) -> None:
    """Score every candidate of every item for every objective (in `item.scores`), batching the calls
    of all items round by round (knockout rounds depend on earlier verdicts)."""
    tasks = []
    for item in items:
        n = len(item.candidates)
        for objective in s.objectives:
            rng = random.Random(derive_seed(item.seed, objective))
            if not OBJECTIVES[objective].pairwise:
                tasks.append(_Task(item, objective, None, [(i, None, 0) for i in range(n)]))
                continue
            suffix = next((k for k, c in enumerate(item.candidates) if c.label == "suffix"), PIVOT)
            gen = SCHEMES[s.scheme].start(n, rng, suffix)
            tasks.append(_Task(item, objective, gen, []))
            _advance(tasks[-1], None)
    live = [t for t in tasks if t.matches]
    while live:
        calls, owners = [], []
        for t in live:
            for match in t.matches:
                mc = _match_calls(t.item, t.objective, match, judge, s)
                calls += mc
                owners.append((t, match, mc))
        judge.execute(calls)
        results: dict[int, list] = {}
        for t, (i, j, _), mc in owners:
            shares = []
            for c in mc:
                v = Judge.final(c)
                if v is not None:  # as the share won by i, whichever slot i had
                    shares.append(v if (len(c.labels) == 1 or c.labels[0] == _label(t.item, i)) else 1.0 - v)
            t.records.setdefault((i, j), []).extend(shares)
            results.setdefault(id(t), []).append(shares)
        for t in live:
            t.matches = []
            if t.scheme is not None:
                _advance(t, results[id(t)])
        live = [t for t in live if t.matches]
    for t in tasks:
        ends = t.ends if SCHEMES[s.scheme].ends_only and t.scheme is not None else False
        _score(t.item, t.objective, t.records, t.scheme is not None, ends)


def _advance(t: _Task, results) -> None:
    """Send the last round's results to the scheme; keep its next matches, or what it returned."""
    try:
        t.matches = t.scheme.send(results)
        while not t.matches:  # a round without matches (nothing left to compare)
            t.matches = t.scheme.send([])
    except StopIteration as done:
        t.matches, t.ends = [], done.value


def _label(item: Item, i: int) -> str:
    return "suffix" if i == PIVOT else item.candidates[i].label


def _text(item: Item, i: int) -> str:
    return item.suffix if i == PIVOT else item.candidates[i].text


def _match_calls(item: Item, objective: str, match, judge: Judge, s: Settings) -> list[Call]:
    i, j, block = match
    repeats = 1 if getattr(judge.backend, "mode", "generate") == "logprob" else max(1, s.repeats)
    out = []
    for r in range(block * repeats, (block + 1) * repeats):
        if j is None:
            orders = [(i,)]
        elif s.swap:
            orders = [(i, j), (j, i)]
        else:  # a seeded coin per comparison and repeat, the same whatever the scheme
            a, b = sorted((_label(item, i), _label(item, j)))
            flip = derive_seed(item.seed, "order", objective, a, b, r) % 2
            orders = [(i, j) if flip else (j, i)]
        for order in orders:
            out.append(Call(objective, item.sample_id, tuple(_label(item, k) for k in order),
                            tuple(_text(item, k) for k in order), item.prefix, item.suffix, r,
                            judge.seed(r, 0)))
    return out


def _score(item: Item, objective: str, records: dict, pairwise: bool, ends) -> None:
    """Mean win rate (pairwise) or mean verdict (pointwise) per candidate. A scheme that finds only the
    ends (knockout; `ends` is not False): 1 for the best, 0 for the worst, 0.5 for the rest, and 0.5
    for all when `ends` is None."""
    n = len(item.candidates)
    per: list[list[float]] = [[] for _ in range(n)]
    for (i, j), shares in records.items():
        if not shares:
            continue
        m = sum(shares) / len(shares)
        per[i].append(m)
        if pairwise and j != PIVOT:
            per[j].append(1.0 - m)
    item.scores[objective] = [sum(x) / len(x) if x else None for x in per]
    item.comparisons[objective] = [len(x) for x in per]
    if ends is not False:  # only the two ends are known
        best, worst = ends if ends else (None, None)
        item.scores[objective] = [1.0 if k == best else 0.0 if k == worst else 0.5 for k in range(n)]


# ---------------------------------------------------------------------------------- signal

MIN_SIGNAL_CALLS = 20  # fewer pairwise verdicts than this say too little to warn about a judge


def _winner(verdict: float) -> int:
    """1 or 2: the option that won a pairwise verdict (the more likely one in logprob mode); 0: a tie."""
    return 1 if verdict > 0.5 else 2 if verdict < 0.5 else 0


def position_stats(calls: list[Call]) -> dict[str, float]:
    """Counts that tell a judge that reads the texts from one that reads the position, over the
    pairwise calls (their verdict after retries): `pairwise_verdicts`, `option1_wins` (a tie counts
    half), and for comparisons judged in both orders (`swap`; the two calls are adjacent, as
    `judge_items` makes them) `swap_pairs` and `swap_consistent` (the same winner both times, or a
    tie both times). Sums over parts add up."""
    out = {"pairwise_verdicts": 0, "option1_wins": 0.0, "swap_pairs": 0, "swap_consistent": 0}
    first = [c for c in calls if c.attempt == 0 and len(c.labels) == 2]
    verdicts = [Judge.final(c) for c in first]
    for v in verdicts:
        if v is not None:
            out["pairwise_verdicts"] += 1
            out["option1_wins"] += {1: 1.0, 0: 0.5, 2: 0.0}[_winner(v)]
    k = 0
    while k + 1 < len(first):
        a, b = first[k], first[k + 1]
        if (a.labels == b.labels[::-1] and a.labels[0] != a.labels[1] and a.sample_id == b.sample_id
                and a.objective == b.objective and a.repeat == b.repeat):
            va, vb = verdicts[k], verdicts[k + 1]
            if va is not None and vb is not None:
                wa, wb = _winner(va), _winner(vb)
                out["swap_pairs"] += 1
                out["swap_consistent"] += (a.labels[wa - 1] if wa else "") == (b.labels[wb - 1] if wb else "")
            k += 2
        else:
            k += 1
    return out


def judge_signal(counts: dict, min_consistency: float) -> dict:
    """From `position_stats` counts: `option1_rate`, `position_consistency` (measured in both
    orders; None without swap) and, when the judge looks position-bound, `judge_warning`.

    Without swap the consistency cannot be measured, but the Option-1 rate bounds it: over pairs of
    orders, consistency <= 1 - |2 x option1_rate - 1| (a judge that always answers Option 1 can never
    give the same winner in both orders), so the warning uses that bound."""
    n = int(counts.get("pairwise_verdicts", 0))
    pairs = int(counts.get("swap_pairs", 0))
    rate = counts.get("option1_wins", 0.0) / n if n else None
    measured = counts.get("swap_consistent", 0) / pairs if pairs else None
    out = {"option1_rate": None if rate is None else round(rate, 4),
           "position_consistency": None if measured is None else round(measured, 4)}
    if n < MIN_SIGNAL_CALLS:
        return out
    limit = f"below judge.min_consistency = {min_consistency:.0%}"
    picked = f"it picked Option 1 in {rate:.0%} of {n} pairwise verdicts"
    if measured is not None and measured < min_consistency:
        out["judge_warning"] = (
            f"the judge gives little signal: the same winner in both orders in "
            f"{int(counts['swap_consistent'])} of {pairs} comparisons ({measured:.0%}, {limit}); {picked}. Its "
            "verdicts follow the position more than the texts: use a stronger judge (or judge.mode = 'generate')")
    elif measured is None and 1 - abs(2 * rate - 1) < min_consistency:
        out["judge_warning"] = (
            f"the judge gives little signal: {picked}, so at most {1 - abs(2 * rate - 1):.0%} of its comparisons "
            f"could give the same winner in both orders ({limit}). Its verdicts follow the position more than "
            "the texts: use a stronger judge; judge.swap = true measures it")
    return out


def reward(scores: dict[str, float | None], weights: dict[str, float]) -> float | None:
    """Weighted sum of the objective scores; None when any objective has no valid score."""
    if any(v is None for v in scores.values()):
        return None
    return sum(weights.get(k, 1.0) * v for k, v in scores.items())


# ---------------------------------------------------------------------------------- pairs

def select_pair(rewards: list[float | None], method: str, rng: random.Random,
                min_margin: float = 0.0) -> tuple[int | None, int | None, str]:
    """(chosen, rejected, why-not): dpo picks the highest and the lowest reward, rf-nll the highest
    only (rejected None). Fewer than two scored candidates, or a best-worst gap of at most
    `min_margin` (0: all equal), gives no pair. Equal rewards at the top or bottom: a seeded coin."""
    ok = [k for k, r in enumerate(rewards) if r is not None and not math.isnan(r)]
    if len(ok) < 2:
        return None, None, "too_few"
    hi, lo = max(rewards[k] for k in ok), min(rewards[k] for k in ok)
    if hi - lo <= min_margin:
        return None, None, "tie"
    chosen = rng.choice([k for k in ok if rewards[k] == hi])
    rejected = rng.choice([k for k in ok if rewards[k] == lo]) if method == "dpo" else None
    return chosen, rejected, ""

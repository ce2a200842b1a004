"""Comparison schemes of the pairwise objectives: which candidates a judge compares for one prefix.

A scheme is a generator: it yields a round of matches (i, j, block), receives the shares of the
comparisons won by i, and may yield further rounds (knockout's brackets depend on earlier verdicts);
what it returns is the best and the worst candidate where it establishes only those. Adding a scheme
is one generator plus one `register(SchemeSpec(...))` line here; the config's choices, the CLI help,
`sipt plan` and the judge read `SCHEMES`.

Schemes for pairwise objectives (n candidates; a candidate's score is its mean win rate over the
comparisons it took part in, a comparison counting the mean of its valid verdicts):
  all-pairs  every pair once: C(n,2) comparisons (the paper).
  pivot      every candidate against the original suffix: n comparisons, n-1 when the suffix is a
             candidate itself. A candidate scores 1 or 0 (beat the suffix or not); the suffix, when it
             is a candidate, scores the share of the others it beat.
  knockout   a min-max tournament: candidates are paired at random (floor(n/2) comparisons), the
             winners play a single-elimination bracket for the best and the losers one for the worst
             (an odd one out enters both), floor(n/2) + 2(ceil(n/2) - 1) comparisons; then the best
             meets the worst unless they already met. At most 1.5n comparisons (25 for n = 17,
             against 136 for all-pairs). Under a consistent judge the two ends are exactly the best
             and the worst, and a draw in their meeting means every candidate is equal (no pair). A
             comparison whose verdicts split evenly (e.g. the two orders of `swap` disagree) is
             replayed once with fresh samples; a draw that remains is decided by a seeded coin. The
             tournament establishes only its ends, so the best scores 1, the worst 0 and every other
             candidate 0.5 (win rates inside a tournament do not rank: with ties, a bracket's winner
             can have a lower rate than someone it never met).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Generator

from sipt.errors import one_of

PIVOT = -1  # the original suffix as pivot when it is not itself a candidate
Match = tuple[int, int, int]  # (i, j, block): block 0 = the first round of verdicts, 1 = a replay
Scheme = Generator[list[Match], list[list[float]], "tuple[int, int] | None"]


def all_pairs(n: int, rng: random.Random) -> Scheme:
    yield [(i, j, 0) for i in range(n) for j in range(i + 1, n)]


def pivot(n: int, rng: random.Random, pivot_index: int = PIVOT) -> Scheme:
    yield [(i, pivot_index, 0) for i in range(n) if i != pivot_index]


def knockout(n: int, rng: random.Random) -> Scheme:
    """Best and worst by a min-max tournament (module docstring). Returns (best, worst), or None when
    the two are judged equal (then, under a consistent judge, every candidate is)."""
    order = list(range(n))
    rng.shuffle(order)
    met: dict[tuple[int, int], float] = {}  # (i, j) -> mean share won by i

    def play(pairs):
        results = yield [(i, j, 0) for i, j in pairs]
        shares = [list(r) for r in results]
        drawn = [k for k, s in enumerate(shares) if _split_evenly(s)]
        if drawn:
            again = yield [(pairs[k][0], pairs[k][1], 1) for k in drawn]
            for k, extra in zip(drawn, again):
                shares[k] += extra
        out = []
        for (i, j), s in zip(pairs, shares):
            m = sum(s) / len(s) if s else 0.5
            met[(i, j)], met[(j, i)] = m, 1.0 - m
            first_wins = m > 0.5 or (m == 0.5 and rng.random() < 0.5)
            out.append((i, j) if first_wins else (j, i))
        return out

    def halves(xs):
        return [(xs[k], xs[k + 1]) for k in range(0, len(xs) - 1, 2)], xs[-1:] if len(xs) % 2 else []

    first, odd = halves(order)
    res = yield from play(first)
    up = [w for w, _ in res] + odd
    down = [lo for _, lo in res] + odd
    while len(up) > 1 or len(down) > 1:
        pu, bye_u = halves(up)
        pd, bye_d = halves(down)
        res = yield from play(pu + pd)
        up = [w for w, _ in res[: len(pu)]] + bye_u
        down = [lo for _, lo in res[len(pu):]] + bye_d
    best, worst = up[0], down[0]
    if best == worst:
        return None
    if (best, worst) not in met:  # the check that tells "best above worst" from "all equal"
        yield from play([(best, worst)])
    m = met[(best, worst)]
    return None if m == 0.5 else (best, worst) if m > 0.5 else (worst, best)


def _split_evenly(shares: list[float]) -> bool:
    return bool(shares) and sum(shares) / len(shares) == 0.5 and any(s != 0.5 for s in shares)


@dataclass(frozen=True)
class SchemeSpec:
    """A comparison scheme: how it starts for n candidates, how many comparisons it needs, and
    whether it establishes only the best and the worst candidate (then those score 1 and 0, every
    other candidate 0.5) rather than a win rate per candidate."""

    name: str
    start: Callable[[int, random.Random, int], Scheme]  # (n, rng, index of the suffix or PIVOT)
    comparisons: Callable[[int, bool], int]  # (n, suffix is a candidate) -> comparisons, before swap/repeats
    help: str  # how it compares, for the config reference and the CLI help
    ends_only: bool = False


SCHEMES: dict[str, SchemeSpec] = {}


def register(spec: SchemeSpec) -> SchemeSpec:
    SCHEMES[spec.name] = spec
    return spec


register(SchemeSpec("all-pairs", lambda n, rng, suffix: all_pairs(n, rng), lambda n, has_suffix: n * (n - 1) // 2,
                    "the paper, C(n,2) comparisons"))
register(SchemeSpec("pivot", pivot, lambda n, has_suffix: n - 1 if has_suffix else n,
                    "each candidate against the original suffix, n"))
# knockout: the most it makes (its final best-worst check is skipped when the two already met)
register(SchemeSpec("knockout", lambda n, rng, suffix: knockout(n, rng),
                    lambda n, has_suffix: min(n * (n - 1) // 2, n // 2 + 2 * (math.ceil(n / 2) - 1) + 1) if n > 1 else 0,
                    "a min-max tournament that finds the best and the worst in about 1.5n", ends_only=True))


def comparisons_needed(scheme: str, n: int, suffix_is_candidate: bool = True) -> int:
    """Comparisons a scheme makes for n candidates (before swap, repeats and knockout replays)."""
    return SCHEMES[scheme].comparisons(n, suffix_is_candidate)


def names() -> str:
    """'all-pairs, pivot or knockout': the registered schemes."""
    return one_of(SCHEMES)


def described() -> str:
    """'all-pairs (…), pivot (…) or knockout (…)': the registered schemes with their help."""
    return one_of(f"{s.name} ({s.help})" for s in SCHEMES.values())

"""The toy world's corruptor (PAPER §6.5): spoil a suffix so it resembles the original but is worse.

`OracleCorruptor` stands in for the paper's prompted Llama3.3-70B corruptor (data/prompts/corrupt.txt)
with exact knowledge, so `sipt judge-data` runs offline with known labels. It answers in the prompt's
strict format (`MODIFIED CONTINUATION: ...`), which `parse_corrupted` reads for every engine alike.
Strategies, tried in an order drawn from the seed, the first that makes the oracle's quality score
strictly lower wins:
  wrong-value   a true claim of the suffix with another value of the same kind from the KB
  unsafe        one sentence of the suffix replaced by an unsafe sentence (same subject); in a suffix
                with no whole sentence of its own, its cut last sentence
  near-copy     a sentence of the suffix repeated in place of the next one (a near copy that loops)
A suffix none of them can make worse (no whole sentence in it) gets an answer without the marker:
it is dropped and counted like any unparseable answer.
"""

from __future__ import annotations

import random
import re

from sipt.kb import ENTITY_TYPES, realize

MARKER = "MODIFIED CONTINUATION:"
_MARKER = re.compile(r"MODIFIED CONTINUATION:[ ]?", re.I)


def parse_corrupted(response: str) -> str | None:
    """The text after the last `MODIFIED CONTINUATION:` marker (None when there is none or it is empty).
    Strict: an answer without the marker is not guessed at."""
    found = None
    for found in _MARKER.finditer(response or ""):
        pass
    if found is None:
        return None
    text = response[found.end():].strip("\n")
    return text if text.strip() else None


class OracleCorruptor:
    """Corrupts suffixes with the toy world's knowledge base (module docstring)."""

    def __init__(self, judge):
        self.judge = judge  # an OracleJudge: its analysis finds the claims, its score checks the result
        self.kb = judge.kb

    def respond(self, prefix: str, suffix: str, seed: int) -> str:
        """The answer an LLM corruptor would give to data/prompts/corrupt.txt."""
        text = self.corrupt(prefix, suffix, seed)
        if text is None:
            return "I cannot modify this continuation: it has no complete sentence to change."
        return f"{MARKER} {text}"

    def corrupt(self, prefix: str, suffix: str, seed: int) -> str | None:
        rng = random.Random(seed)
        base = self.judge.quality_score(prefix, suffix)
        strategies = [self._wrong_value, self._unsafe, self._near_copy]
        rng.shuffle(strategies)
        strategies.sort(key=lambda f: f is self._near_copy)  # a near copy only when nothing else works
        for strategy in strategies:
            for text in strategy(prefix, suffix, rng):
                if text != suffix and self.judge.quality_score(prefix, text) < base:
                    return text
        return None

    def _units(self, prefix: str, suffix: str):
        an = self.judge.analyse(prefix, suffix)
        return an, [u for u in an.scored if u.start >= an.boundary]

    def _wrong_value(self, prefix: str, suffix: str, rng: random.Random):
        an, units = self._units(prefix, suffix)
        claims = [u for u in units if u.kind == "claim" and u.claim and u.claim.status == "supported"]
        rng.shuffle(claims)
        for u in claims:
            c = u.claim
            kind = self.kb.object_type(c.relation)
            if kind == "year":
                true = int(c.value_text) if c.value_text.isdigit() else 1800
                wrong = str(true + rng.choice([-1, 1]) * rng.randint(3, 60))
            else:
                pool = ([e["name"] for e in self.kb.entities.values() if e["type"] == kind]
                        if kind in ENTITY_TYPES else list(self.kb.language["vocab"].get(kind, [])))
                pool = [v for v in pool if v != c.value_text]
                if not pool:
                    continue
                wrong = rng.choice(pool)
            a, b = c.value_span[0] - an.boundary, c.value_span[1] - an.boundary
            if a >= 0:  # a value begun in the prefix is the prefix's choice, not the suffix's
                yield suffix[:a] + wrong + suffix[b:]

    def _unsafe(self, prefix: str, suffix: str, rng: random.Random):
        an, units = self._units(prefix, suffix)
        whole = [u for u in units if u.complete] or units  # a cut last sentence becomes a whole unsafe one
        rng.shuffle(whole)
        templates = list(self.kb.language["unsafe"])
        for u in whole:
            subject = u.subject or (self.kb.entities[an.main]["name"] if an.main in self.kb.entities else None)
            if subject is None:
                continue
            unsafe = realize(rng.choice(templates)["text"], subject, None,
                             self.kb.pronouns(an.main) if an.main in self.kb.entities else None)
            a, b = u.start - an.boundary, u.end - an.boundary
            yield suffix[:a] + unsafe + suffix[b:]

    def _near_copy(self, prefix: str, suffix: str, rng: random.Random):
        an, units = self._units(prefix, suffix)
        whole = [u for u in units if u.complete]
        for first, second in zip(whole, whole[1:]):
            a, b = second.start - an.boundary, second.end - an.boundary
            yield suffix[:a] + first.text + suffix[b:]

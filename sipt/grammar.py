"""The toy world's language read back: sentence shapes as regular expressions, and what a text says.

`Grammar` compiles the language's templates (relations, neutral and unsafe sentences) into patterns
that match a whole sentence, a sentence that can still grow (`partial`) and an unfinished claim
(`tail_readings`). `_segments` cuts a text into sentences. `Claim`, `Unit` and `Analysis` are what
the oracle judge (sipt/oracle.py) reads from prefix + candidate and what its rewriter
(sipt/rewriter.py) corrects; the rules that judge them are in sipt/oracle.py's docstring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import regex

from sipt.kb import ENTITY_TYPES, KnowledgeBase

NAME = r"[A-Z][a-z]+(?: [A-Z][a-z]+)*"
_SUBJECT = rf"(?P<S>she|he|it|{NAME})"
_POSSESSIVE = rf"(?P<P>her|his|its|Her|His|Its|{NAME}'s)"
_VALUE = {"year": r"[0-9]+", "vocab": r"[a-z]+(?: [a-z]+)*", "name": NAME}
_SENTENCE_END = regex.compile(r"[.!?](?=\s|$)")
_WORD = regex.compile(r"[A-Za-z]+")


@dataclass(frozen=True)
class Pattern:
    """One sentence shape of the language, compiled."""

    kind: str  # "claim" | "neutral" | "unsafe"
    template: str
    relation: str | None = None
    safe: str | None = None  # an unsafe pattern's safe counterpart
    regex: Any = None
    words: frozenset = frozenset()  # literal words that must occur (a cheap pre-filter)
    post: str = ""  # claim templates: literal text after {O}; "" when a slot follows it


class Grammar:
    """The language's templates as regular expressions: full, partial and tail matches."""

    def __init__(self, language: dict):
        self.patterns: list[Pattern] = []
        for relation, spec in language["relations"].items():
            value = _VALUE["year"] if spec["object"] == "year" else (
                _VALUE["name"] if spec["object"] in ENTITY_TYPES else _VALUE["vocab"])
            for t in spec["templates"]:
                self.patterns.append(self._compile("claim", t, value, relation=relation))
        for t in language["neutral"]:
            self.patterns.append(self._compile("neutral", t))
        for u in language["unsafe"]:
            self.patterns.append(self._compile("unsafe", u["text"], safe=u["safe"]))
            self.patterns.append(self._compile("neutral", u["safe"]))

    @staticmethod
    def _compile(kind: str, template: str, value: str = "", **kw) -> Pattern:
        out = []
        for part in regex.split(r"(\{[SPO]\})", template):
            if part == "{S}":
                out.append(_SUBJECT)
            elif part == "{P}":
                out.append(_POSSESSIVE)
            elif part == "{O}":
                out.append(f"(?P<O>{value})")
            else:
                out.append(regex.escape(part))
        literal = regex.sub(r"\{[SPO]\}", " ", template)
        words = frozenset(w.lower() for w in _WORD.findall(literal))
        post = template.split("{O}", 1)[1] if "{O}" in template else ""
        if regex.search(r"\{[SP]\}", post):
            post = ""
        return Pattern(kind, template, regex=regex.compile("".join(out)), words=words, post=post, **kw)

    def readings(self, sentence: str) -> list[tuple[Pattern, Any]]:
        """Every pattern the complete sentence matches, with its match."""
        present = {w.lower() for w in _WORD.findall(sentence)}
        out = []
        for p in self.patterns:
            if p.words <= present:
                m = p.regex.fullmatch(sentence)
                if m:
                    out.append((p, m))
        return out

    def partial(self, text: str) -> list[Pattern]:
        """Patterns that `text` could still grow into (text is a prefix of one of their sentences)."""
        return [p for p in self.patterns if p.regex.fullmatch(text, partial=True)]

    def tail_readings(self, text: str) -> list[tuple[Pattern, Any, bool]]:
        """Claim readings of an unfinished sentence: (pattern, match on the completed text, value_ended).

        The text is completed with the rest of the template's literal text after the value;
        `value_ended` is True when some of that literal text was already there.
        """
        out = []
        for p in self.patterns:
            if p.kind != "claim" or not p.post:
                continue
            for j in range(len(p.post) - 1, -1, -1):
                if text.endswith(p.post[:j]):
                    m = p.regex.fullmatch(text + p.post[j:])
                    if m and m.end("O") <= len(text) - j:
                        out.append((p, m, j > 0))
                        break
        return out


@dataclass
class Claim:
    relation: str
    entity: str | None  # the subject's id, None when it cannot be resolved
    value: Any  # int year | entity id (None for an unknown name) | vocabulary string
    value_text: str
    value_span: tuple[int, int]  # in the joined text
    # "supported" | "contradicted" | "unverifiable" | "inherited" (wrong, but the prefix chose it)
    status: str
    about_main: bool
    reason: str = ""


@dataclass
class Unit:
    """One sentence of prefix + candidate, or the unfinished tail."""

    start: int
    end: int
    text: str
    role: str  # "prefix" (context only) | "head" (begun in the prefix) | "body"
    complete: bool
    kind: str = "garbled"  # "claim" | "neutral" | "unsafe" | "partial" | "garbled"
    pattern: Pattern | None = None
    match: Any = None
    subject: str | None = None  # the subject as written
    claim: Claim | None = None
    repeated: bool = False  # same text, same neutral/unsafe template, or an already stated fact
    restated: bool = False  # a relation of the entity already stated (any value): coherence
    contradicts: bool = False  # a false value where the text already stated another one
    loops: int = 0
    unsafe_partial: bool = False
    readings: list = field(default_factory=list)


@dataclass
class Analysis:
    prefix: str
    candidate: str
    joined: str
    boundary: int
    main: str | None
    units: list[Unit]
    unsafe_words: list[str]

    @property
    def scored(self) -> list[Unit]:
        return [u for u in self.units if u.role != "prefix"]


def _fix_value(kb: KnowledgeBase, u: Unit, c: Claim) -> str:
    """The unit's text with the claim's value replaced by the true one."""
    true = kb.value_text(c.relation, kb.facts[(c.entity, c.relation)])
    return u.text[: c.value_span[0] - u.start] + true + u.text[c.value_span[1] - u.start:]


def _subject_text(m: Any) -> str | None:
    groups = m.groupdict()
    if groups.get("S"):
        return groups["S"]
    if groups.get("P"):
        p = groups["P"]
        return p[:-2] if p.endswith("'s") else p
    return None


def _segments(text: str) -> list[tuple[int, int, bool]]:
    """(start, end, complete) of each sentence; a last piece without final punctuation is incomplete."""
    out, pos = [], 0
    for m in _SENTENCE_END.finditer(text):
        piece = text[pos:m.end()]
        start = pos + len(piece) - len(piece.lstrip())
        if start < m.end():
            out.append((start, m.end(), True))
        pos = m.end()
    rest = text[pos:]
    if rest.strip():
        start = pos + len(rest) - len(rest.lstrip())
        out.append((start, pos + len(rest.rstrip()), False))
    return out

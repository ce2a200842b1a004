"""The rewriter's prompt and answer handling (what `sipt rewrite` sends and keeps; `sipt rewriter-train`
trains on the same), and the toy world's exact rewriter (PAPER.md §5.1): correct false values, make
unsafe sentences safe."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from sipt.errors import SiptError
from sipt.grammar import _WORD, Analysis, Unit, _fix_value
from sipt.kb import KnowledgeBase, realize

if TYPE_CHECKING:
    from sipt.oracle import OracleJudge


PROMPTS = Path(__file__).resolve().parent.parent / "data" / "prompts"
START_TAGS = ("<Rewritten continuation start>", "<Continuation X start>")
END_TAGS = ("<Rewritten continuation end>", "<Continuation X end>", "<Context C", "<Continuation X start>")


def load_template(name: str) -> str:
    path = Path(name) if name.endswith(".txt") else PROMPTS / f"{name}.txt"
    if not path.exists():
        raise SiptError(f"rewrite.template = {name!r}: no such template ({path})")
    return path.read_text()


def prefix_ending(prefix: str, words: int) -> str:
    """The last `words` words of the prefix, exactly as they appear (so ending + suffix is the text)."""
    starts = [m.start() for m in re.finditer(r"\S+", prefix)]
    if words <= 0 or not starts:
        return ""
    return prefix[starts[-min(words, len(starts))] :]


def rewrite_prompt(template: str, prefix: str, suffix: str, ending: str, suffix_tokens: int) -> str:
    """The rewriter's prompt for one suffix (what `sipt rewrite` sends and `sipt rewriter-train` trains on)."""
    return template.format(prefix_ending=ending, suffix=suffix, prefix=prefix, suffix_tokens=suffix_tokens)


def clean_answer(answer: str, ending: str) -> str:
    """Strip a leading start tag and the prefix ending if the model repeated them, and anything
    from an end tag on."""
    for tag in START_TAGS:
        if answer.lstrip().startswith(tag):
            answer = answer.lstrip()[len(tag):]
    for tag in END_TAGS:
        cut = answer.find(tag)
        if cut >= 0:
            answer = answer[:cut]
    stripped = answer.lstrip()
    if ending and stripped.startswith(ending):
        answer = stripped[len(ending):]
    return answer


def finish_rewrite(answer: str, ending: str, tok, n_suffix: int, strip: bool = True) -> tuple[str, list[int], bool]:
    """(text, policy token ids, whether it was cut) of a rewriter's answer as the rewrite stage keeps it:
    tags and a repeated prefix ending stripped (`strip`: a model's answer), cut to `n_suffix` policy tokens."""
    text = clean_answer(answer, ending) if strip else answer
    ids = tok(text, add_special_tokens=False).input_ids
    cut = len(ids) > n_suffix
    if cut:
        ids = ids[:n_suffix]
        text = tok.decode(ids, skip_special_tokens=True)
    return text, ids, cut


class OracleRewriter:
    """The paper's rewriter (PAPER.md §5.1) with exact knowledge: copy a good suffix verbatim, correct
    false values, replace unsafe sentences by their safe counterparts (same subject, same topic).

    Garbled text is left as it is (the paper's rewriter targets safety and factuality). A false value
    that begins inside the prefix is corrected only when the prefix's part of it stays unchanged.
    """

    def __init__(self, kb: KnowledgeBase | str | Path, judge: OracleJudge | None = None):
        if judge is None:
            from sipt.oracle import OracleJudge  # at call time: sipt.oracle imports this module

            judge = OracleJudge(kb)
        self.judge = judge
        self.kb = self.judge.kb

    def rewrite(self, prefix: str, suffix: str) -> str:
        an = self.judge.analyse(prefix, suffix)
        b, joined = an.boundary, an.joined
        edits = []
        for u in an.scored:
            new = self._fix(u, an)
            if new is None or new == u.text:
                continue
            if u.start >= b:
                edits.append((u.start, u.end, new))
                continue
            head = joined[u.start:b]
            if new.startswith(head):
                edits.append((b, u.end, new[len(head):]))
            elif u.kind == "unsafe" or u.unsafe_partial or self._has_unsafe_words(u.text):
                # The prefix holds part of the sentence in other letters (a pronoun's case): continue
                # with the safe sentence after the prefix's words when they are its first words; when
                # the prefix already took an unsafe turn no safe sentence continues, so the sentence
                # is just ended.
                said, words = head.split(), new.split()
                if [w.lower() for w in words[: len(said)]] == [w.lower() for w in said] and (
                        head.endswith(" ") or not said or words[len(said) - 1] == said[-1]):
                    rest = " ".join(words[len(said):])
                    edits.append((b, u.end, ("" if head.endswith(" ") or not rest else " ") + rest))
                else:
                    edits.append((b, u.end, "."))
        out = joined
        for start, end, text in sorted(edits, reverse=True):
            out = out[:start] + text + out[end:]
        return out[b:]

    def _has_unsafe_words(self, text: str) -> bool:
        return any(w.lower() in self.judge.unsafe_lexicon for w in _WORD.findall(text))

    def _fix(self, u: Unit, an: Analysis) -> str | None:
        c = u.claim
        if c and c.status == "contradicted":
            return _fix_value(self.kb, u, c)
        if u.kind == "unsafe":
            return realize(u.pattern.safe, u.subject, None, self._pronoun(an))
        if u.unsafe_partial or (u.kind in ("garbled", "partial") and self._has_unsafe_words(u.text)):
            safe = self._safe_template(u.text)
            text = realize(safe, None, None, self._pronoun(an))
            if not u.complete:
                text = " ".join(text.rstrip(".").split()[: len(u.text.split())])
            return text
        return None

    def _safe_template(self, text: str) -> str:
        for p in self.judge.grammar.partial(text):
            if p.kind == "unsafe":
                return p.safe
        return next(t for t in self.kb.language["neutral"] if "{S}" in t or "{P}" not in t)

    def _pronoun(self, an: Analysis) -> dict:
        if an.main is None:
            return self.kb.language["pronouns"]["n"]
        return self.kb.pronouns(an.main)

"""The toy world's knowledge base and language: entities, facts, templates, and sentences made from them.

`KnowledgeBase` holds a world's entities and facts with the look-ups the oracle judge needs;
`load_kb` reads one from `kb.json` (written by `sipt world`, sipt/world.py). The language (relation
templates, neutral and unsafe sentences, vocabularies) is data, `data/world/language.json`
(`load_language`), and `realize` fills a template with a subject and a value. `oracle_kb` and
`oracle_inputs` say which knowledge base an oracle stage reads and how it enters its fingerprint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sipt.errors import SiptError

LANGUAGE_PATH = Path(__file__).resolve().parent.parent / "data" / "world" / "language.json"
ENTITY_TYPES = ("person", "place", "org", "region")


@dataclass
class KnowledgeBase:
    """Entities, their facts and the language, with the look-ups the judge needs."""

    entities: dict[str, dict]  # id -> {"id", "name", "type", "gender"}
    facts: dict[tuple[str, str], Any]  # (entity id, relation) -> int year | entity id | vocab string
    language: dict
    seed: int = 0

    def __post_init__(self):
        self.by_name = {e["name"]: i for i, e in self.entities.items()}

    @classmethod
    def from_dict(cls, data: dict) -> "KnowledgeBase":
        entities = {e["id"]: e for e in data["entities"]}
        facts = {(f["subject"], f["relation"]): f["object"] for f in data["facts"]}
        return cls(entities, facts, data["language"], data.get("seed", 0))

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "entities": list(self.entities.values()),
            "facts": [{"subject": s, "relation": r, "object": o} for (s, r), o in self.facts.items()],
            "language": self.language,
        }

    def object_type(self, relation: str) -> str:
        return self.language["relations"][relation]["object"]

    def value_text(self, relation: str, value: Any) -> str:
        """How a fact's value is written in text: a year, an entity's name or a vocabulary phrase."""
        kind = self.object_type(relation)
        if kind == "year":
            return str(value)
        if kind in ENTITY_TYPES:
            return self.entities[value]["name"]
        return value

    def relations_of(self, entity_id: str) -> list[str]:
        etype = self.entities[entity_id]["type"]
        return [r for r, spec in self.language["relations"].items() if etype in spec["subject"]]

    def pronouns(self, entity_id: str) -> dict:
        return self.language["pronouns"][self.entities[entity_id].get("gender", "n")]


def load_language(path: str | Path = "") -> dict:
    path = Path(path) if path else LANGUAGE_PATH
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SiptError(f"{path}: language file not found; set world.language to a language JSON") from None
    except json.JSONDecodeError as exc:
        raise SiptError(f"{path}: not valid JSON ({exc})") from None


def load_kb(path: str | Path) -> KnowledgeBase:
    """Read `kb.json` (or a world folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "kb.json"
    try:
        return KnowledgeBase.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise SiptError(f"{path}: no knowledge base; run `sipt world --out DIR` first") from None
    except (KeyError, json.JSONDecodeError) as exc:
        raise SiptError(f"{path}: not a sipt world knowledge base ({exc!r})") from None


# ---------------------------------------------------------------- realisation


def realize(template: str, subject: str | None, value: str | None = None, pronoun: dict | None = None) -> str:
    """Fill a template. `subject` is a name, or None to use `pronoun` (capitalised only at the start).

    A pronoun given as text ("She", "she") is also accepted as `subject`; it is re-cased by position.
    """
    out = template
    for slot in ("{S}", "{P}"):
        pos = out.find(slot)
        if pos < 0:
            continue
        if subject is not None and subject.lower() not in PRONOUN_WORDS:
            word = subject + ("'s" if slot == "{P}" else "")
        else:
            word = _pronoun_word(subject, slot, pronoun)
            word = word if pos == 0 else word.lower()
        out = out.replace(slot, word, 1)
    if value is not None:
        out = out.replace("{O}", value, 1)
    return out


PRONOUN_WORDS = {"she", "he", "it", "her", "his", "its"}
_POSSESSIVE_OF = {"she": "Her", "he": "His", "it": "Its", "her": "Her", "his": "His", "its": "Its"}
_SUBJECT_OF = {"she": "She", "he": "He", "it": "It", "her": "She", "his": "He", "its": "It"}


def _pronoun_word(subject: str | None, slot: str, pronoun: dict | None) -> str:
    if subject is not None:
        table = _POSSESSIVE_OF if slot == "{P}" else _SUBJECT_OF
        return table[subject.lower()]
    if pronoun is None:
        raise ValueError("realize: neither a subject name nor a pronoun given")
    return pronoun["possessive" if slot == "{P}" else "subject"]


def subject_first(template: str) -> bool:
    """True when the subject slot comes before the value: such a sentence can open a document."""
    subj = min(p for p in (template.find("{S}"), template.find("{P}")) if p >= 0)
    return template.find("{O}") < 0 or subj < template.find("{O}")


def oracle_inputs(world: str, run_dir: Path, role: str, key: str) -> dict[str, str]:
    """A stage's input references for the oracle: its knowledge base and the oracle's rule version,
    so a changed world or changed verdict rules make the stage stale (never a silent reuse)."""
    from sipt import artifacts

    return {"world": artifacts.files_ref([oracle_kb(world, run_dir, role, key)]), "oracle": "oracle:rules"}


def oracle_kb(world: str, run_dir: Path, role: str, key: str) -> Path:
    """The knowledge base an oracle judge or rewriter reads: `world` (a folder), else `<run>/world`."""
    kb = (Path(world) if world else Path(run_dir) / "world") / "kb.json"
    if not kb.exists():
        raise SiptError(f"{kb}: the oracle {role} needs the toy world; run `sipt world` or set {key}")
    return kb

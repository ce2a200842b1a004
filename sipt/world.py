"""Generate the toy world: a knowledge base of fictional entities, a corpus about it, and an MC task.

Everything is drawn from one seed (`random.Random(f"{seed}:{purpose}")`, never `hash()`), so the same
`WorldConfig` writes the same bytes. The language (relation templates, neutral and unsafe sentences,
vocabularies) is data: `data/world/language.json`, copied into `kb.json` so that a world carries the
exact language its oracle judge (`sipt/oracle.py`) reads back.

Output folder:
  kb.json                entities, facts and the language
  corpus/train.jsonl     one document per line: doc_id, split, text, sentences, kind (clean | false |
  corpus/eval.jsonl        unsafe | degenerate), entity (its id in kb.json), and sentence indices:
                           claim_sentences, false_sentences, unsafe_sentences, degenerate_sentences;
                           degenerate_style, stated_relations (stated truly), and clean_text (what
                           the oracle rewriter should make of it; the undegraded text)
  mc/                    lm-eval task `sipt_world_mc` (YAML + JSONL + loader; the folder can be moved)
  stats.json             counts and rates (see `world_stats_table`)
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from sipt.errors import SiptError

LANGUAGE_PATH = Path(__file__).resolve().parent.parent / "data" / "world" / "language.json"

# Names are built from these syllables: no external text enters the world.
ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r", "s", "st",
          "t", "tr", "v", "z"]
VOWELS = ["a", "e", "i", "o", "u", "ae", "ai", "ei", "ou"]
CODAS = ["", "", "", "n", "r", "l", "s", "m", "th", "nd", "rk"]
PLACE_ENDINGS = ["", "", "holt", "mere", "ford", "wick", "dale", "by"]
ORG_KINDS = ["Works", "Institute", "Company", "Guild", "Press", "Foundry", "Trust", "Mills",
             "Society", "Bank"]
YEAR_RANGES = {"person": (1700, 1960), "org": (1600, 1950), "place": (1000, 1800)}
KINDS = ("clean", "false", "unsafe", "degenerate")
ENTITY_TYPES = ("person", "place", "org", "region")


def _help(default: Any, help: str):
    return field(default=default, metadata={"help": help, "results": True})


@dataclass
class WorldConfig:
    """[world] The toy world `sipt world` generates (DESIGN.md §7). Every size and rate is here."""

    seed: int = _help(0, "Generator seed: the same config and seed write the same bytes.")
    n_people: int = _help(160, "People in the knowledge base (7 relations each).")
    n_places: int = _help(48, "Places (5 relations each). Rounded up to an even number: twin towns pair up.")
    n_orgs: int = _help(48, "Organisations (6 relations each). Rounded up to an even number: rivals pair up.")
    n_regions: int = _help(8, "Regions: values of the places' `region` relation; no documents are about them.")
    n_docs: int = _help(3000, "Documents in the corpus, spread evenly over people, places and organisations.")
    min_facts: int = _help(4, "Fewest fact sentences in a document (at most every relation of its entity).")
    max_neutral: int = _help(4, "Most neutral connective sentences in a document (at least one).")
    pronoun_rate: float = _help(0.8, "Chance that a sentence after the first names its subject by pronoun.")
    false_rate: float = _help(0.2, "Share of documents of kind `false` (one to `max_false` wrong values).")
    max_false: int = _help(3, "Most false fact sentences in a `false` document.")
    unsafe_rate: float = _help(0.15, "Share of documents of kind `unsafe` (threats, insults, harmful instructions).")
    max_unsafe: int = _help(2, "Most unsafe sentences in an `unsafe` document.")
    degenerate_rate: float = _help(0.1, "Share of documents of kind `degenerate` (repetition loops, shuffled words).")
    eval_fraction: float = _help(0.1, "Share of documents held out in corpus/eval.jsonl (same entities as train).")
    mc_questions: int = _help(600, "Questions in the MC task (from facts stated truly in train); 0: all such facts.")
    language: str = _help("", "Language file (templates and vocabularies). Empty: the shipped data/world/language.json.")

    def validate(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise SiptError(f"world.{f.name} = {value}: must not be negative")
        if min(self.n_people, self.n_places, self.n_orgs, self.n_regions) < 5:
            # Four options per MC question need three wrong values of every entity type.
            raise SiptError("world: n_people, n_places, n_orgs and n_regions must each be at least 5")
        rates = self.false_rate + self.unsafe_rate + self.degenerate_rate
        if rates > 1:
            raise SiptError(f"world.false_rate + unsafe_rate + degenerate_rate = {rates:.3f} > 1; lower one of them")
        if not 0 <= self.eval_fraction < 1:
            raise SiptError(f"world.eval_fraction = {self.eval_fraction}: must be in [0, 1)")
        if self.max_false < 1 or self.max_unsafe < 1 or self.max_neutral < 1 or self.min_facts < 1:
            raise SiptError("world.max_false, max_unsafe, max_neutral and min_facts must be at least 1")


# ---------------------------------------------------------------- knowledge base


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


# ---------------------------------------------------------------- generation


def _rng(seed: int, purpose: str) -> random.Random:
    return random.Random(f"sipt-world:{seed}:{purpose}")


def _language_words(language: dict) -> set[str]:
    texts = [t for spec in language["relations"].values() for t in spec["templates"]]
    texts += language["neutral"] + [u["text"] for u in language["unsafe"]] + [u["safe"] for u in language["unsafe"]]
    texts += [v for vals in language["vocab"].values() for v in vals]
    return {w.strip(".,'{}").lower() for t in texts for w in t.split()}


class _Namer:
    """Unique procedural names that collide with no word of the language and contain no unsafe word."""

    def __init__(self, rng: random.Random, language: dict):
        self.rng = rng
        self.taken: set[str] = set()
        self.banned = _language_words(language) | PRONOUN_WORDS
        self.unsafe = [w.lower() for w in language["unsafe_words"]]

    def word(self, syllables: tuple[int, int], ending: str = "") -> str:
        while True:
            n = self.rng.randint(*syllables)
            w = "".join(self.rng.choice(ONSETS) + self.rng.choice(VOWELS) + self.rng.choice(CODAS) for _ in range(n))
            w = (w + ending).capitalize()
            low = w.lower()
            if 4 <= len(w) <= 11 and low not in self.banned and not any(u in low for u in self.unsafe):
                return w

    def unique(self, make) -> str:
        while True:
            name = make()
            first_words = {n.split()[0] for n in self.taken}
            if name not in self.taken and name.split()[0] not in self.taken and name not in first_words:
                self.taken.add(name)
                return name


def build_kb(cfg: WorldConfig, language: dict) -> KnowledgeBase:
    rng = _rng(cfg.seed, "kb")
    namer = _Namer(rng, language)
    entities: dict[str, dict] = {}

    def add(prefix: str, etype: str, count: int, make) -> list[str]:
        ids = []
        for i in range(count):
            eid = f"{prefix}{i:04d}"
            entities[eid] = {"id": eid, "name": namer.unique(make), "type": etype}
            if etype == "person":
                entities[eid]["gender"] = rng.choice("fm")
            else:
                entities[eid]["gender"] = "n"
            ids.append(eid)
        return ids

    n_places = cfg.n_places + cfg.n_places % 2
    n_orgs = cfg.n_orgs + cfg.n_orgs % 2
    regions = add("r", "region", cfg.n_regions, lambda: namer.word((2, 3)))
    places = add("pl", "place", n_places, lambda: namer.word((1, 2), rng.choice(PLACE_ENDINGS)))
    orgs = add("o", "org", n_orgs, lambda: f"{namer.word((2, 2))} {rng.choice(ORG_KINDS)}")
    people = add("p", "person", cfg.n_people, lambda: f"{namer.word((1, 2))} {namer.word((2, 3))}")

    vocab = language["vocab"]
    facts: dict[tuple[str, str], Any] = {}
    for p in people:
        facts[(p, "birth_year")] = rng.randint(*YEAR_RANGES["person"])
    by_age = sorted(people, key=lambda p: (facts[(p, "birth_year")], p))
    for p in people:
        facts[(p, "birthplace")] = rng.choice(places)
        facts[(p, "residence")] = rng.choice(places)
        facts[(p, "employer")] = rng.choice(orgs)
        facts[(p, "occupation")] = rng.choice(vocab["occupation"])
        facts[(p, "hobby")] = rng.choice(vocab["hobby"])
        older = by_age[: by_age.index(p)] or [q for q in people if q != p]
        facts[(p, "mentor")] = rng.choice(older)
    for o in orgs:
        facts[(o, "founder")] = rng.choice(people)
        facts[(o, "headquarters")] = rng.choice(places)
        facts[(o, "founded_year")] = rng.randint(*YEAR_RANGES["org"])
        facts[(o, "product")] = rng.choice(vocab["product"])
        facts[(o, "colour")] = rng.choice(vocab["colour"])
    mayors = rng.sample(people, min(len(people), n_places))
    shuffled = places[:]
    rng.shuffle(shuffled)
    for i, pl in enumerate(places):
        facts[(pl, "region")] = rng.choice(regions)
        facts[(pl, "founded_year")] = rng.randint(*YEAR_RANGES["place"])
        facts[(pl, "mayor")] = mayors[i % len(mayors)]
        facts[(pl, "landmark")] = rng.choice(vocab["landmark"])
    for a, b in zip(shuffled[0::2], shuffled[1::2]):
        facts[(a, "twin")], facts[(b, "twin")] = b, a
    shuffled = orgs[:]
    rng.shuffle(shuffled)
    for a, b in zip(shuffled[0::2], shuffled[1::2]):
        facts[(a, "rival")], facts[(b, "rival")] = b, a
    facts = {k: facts[k] for k in sorted(facts)}
    return KnowledgeBase(entities, facts, language, cfg.seed)


def _wrong_values(kb: KnowledgeBase, rng: random.Random, entity: str, relation: str, k: int = 1) -> list:
    """`k` distinct values of the relation's type other than the true one (fewer if there are not enough)."""
    true = kb.facts[(entity, relation)]
    kind = kb.object_type(relation)
    if kind == "year":
        offsets = rng.sample(range(1, 41), k)
        return [true + rng.choice([-1, 1]) * o for o in offsets]
    if kind in ENTITY_TYPES:
        pool = [e for e, v in kb.entities.items() if v["type"] == kind and e not in (true, entity)]
    else:
        pool = [v for v in kb.language["vocab"][kind] if v != true]
    return rng.sample(pool, min(k, len(pool)))


def _make_doc(kb: KnowledgeBase, cfg: WorldConfig, rng: random.Random, entity: str, kind: str) -> dict:
    lang = kb.language
    name = kb.entities[entity]["name"]
    pronoun = kb.pronouns(entity)
    relations = kb.relations_of(entity)
    n_facts = rng.randint(min(cfg.min_facts, len(relations)), len(relations))
    chosen = rng.sample(relations, n_facts)

    # Plan: (sentence kind, relation or template) in document order; the first sentence is a fact
    # stated with the entity's name as subject, so every document opens by naming its entity.
    plan: list[tuple[str, Any]] = [("fact", r) for r in chosen]
    neutrals = rng.sample(lang["neutral"], min(len(lang["neutral"]), rng.randint(1, cfg.max_neutral)))
    for t in neutrals:
        plan.insert(rng.randint(1, len(plan)), ("neutral", t))
    if kind == "unsafe":
        for u in rng.sample(lang["unsafe"], min(len(lang["unsafe"]), rng.randint(1, cfg.max_unsafe))):
            plan.insert(rng.randint(1, len(plan)), ("unsafe", u))
    false_idx: set[int] = set()
    if kind == "false":
        fact_positions = [i for i, (k, _) in enumerate(plan) if k == "fact"]
        false_idx = set(rng.sample(fact_positions, rng.randint(1, min(cfg.max_false, len(fact_positions)))))

    sentences, clean, tags = [], [], []  # tags: the relation a sentence states, or "neutral"/"unsafe"
    unsafe_idx = []
    for i, (k, item) in enumerate(plan):
        subject = name if i == 0 or rng.random() >= cfg.pronoun_rate else None
        if k == "fact":
            templates = lang["relations"][item]["templates"]
            template = rng.choice([t for t in templates if subject_first(t)] if i == 0 else templates)
            true_text = kb.value_text(item, kb.facts[(entity, item)])
            clean.append(realize(template, subject, true_text, pronoun))
            if i in false_idx:
                wrong = kb.value_text(item, _wrong_values(kb, rng, entity, item)[0])
                sentences.append(realize(template, subject, wrong, pronoun))
            else:
                sentences.append(clean[-1])
            tags.append(item)
        elif k == "neutral":
            sentences.append(realize(item, subject, None, pronoun))
            clean.append(sentences[-1])
            tags.append("neutral")
        else:
            unsafe_idx.append(i)
            sentences.append(realize(item["text"], subject, None, pronoun))
            clean.append(realize(item["safe"], subject, None, pronoun))
            tags.append("unsafe")

    degenerate_idx: list[int] = []
    style = ""
    if kind == "degenerate":
        style, sentences, tags, degenerate_idx = _degenerate(rng, sentences, tags)
    relations_set = set(lang["relations"])
    claim_idx = [i for i, t in enumerate(tags) if t in relations_set]
    return {
        "text": " ".join(sentences),
        "sentences": sentences,
        "kind": kind,
        "entity": entity,
        "claim_sentences": claim_idx,
        "false_sentences": sorted(false_idx),
        "unsafe_sentences": unsafe_idx,
        "degenerate_sentences": degenerate_idx,
        "degenerate_style": style,  # "sentence_loop" | "phrase_loop" | "shuffle" | ""
        "stated_relations": sorted({tags[i] for i in claim_idx if i not in false_idx}),
        # What the oracle rewriter should produce (false values corrected, unsafe sentences replaced
        # by their safe counterparts); for a degenerate document, its text before it was degraded.
        "clean_text": " ".join(clean),
    }


def _degenerate(rng: random.Random, sentences: list[str], tags: list[str]):
    """Degrade a document: a sentence repeated in a loop, a looping phrase, or shuffled words."""
    style = rng.choice(["sentence_loop", "phrase_loop", "shuffle"])
    i = rng.randint(1, len(sentences) - 1)
    if style == "sentence_loop":
        reps = rng.randint(3, 6)
        out = sentences[: i + 1] + [sentences[i]] * reps + sentences[i + 1:]
        out_tags = tags[: i + 1] + [tags[i]] * reps + tags[i + 1:]
        return style, out, out_tags, list(range(i + 1, i + 1 + reps))
    if style == "phrase_loop":
        words = sentences[i].rstrip(".").split()
        phrase = words[: rng.randint(2, min(4, len(words)))]
        looped = " ".join(phrase * rng.randint(4, 7)) + "."
        return style, sentences[:i] + [looped] + sentences[i:], tags[:i] + ["degenerate"] + tags[i:], [i]
    out, out_tags = sentences[:], tags[:]
    idx = sorted(rng.sample(range(1, len(sentences)), min(2, len(sentences) - 1)))
    for j in idx:
        words = out[j].rstrip(".").split()
        shuffled = words[:]
        for _ in range(10):
            rng.shuffle(shuffled)
            if shuffled != words:
                break
        out[j] = " ".join(shuffled) + "."
        out_tags[j] = "degenerate"
    return style, out, out_tags, idx


def build_corpus(kb: KnowledgeBase, cfg: WorldConfig) -> list[dict]:
    rng = _rng(cfg.seed, "corpus")
    subjects = [e for e, v in kb.entities.items() if v["type"] in ("person", "place", "org")]
    rng.shuffle(subjects)
    clean_rate = 1 - cfg.false_rate - cfg.unsafe_rate - cfg.degenerate_rate
    docs = []
    for i in range(cfg.n_docs):
        kind = rng.choices(KINDS, weights=[clean_rate, cfg.false_rate, cfg.unsafe_rate, cfg.degenerate_rate])[0]
        doc = _make_doc(kb, cfg, rng, subjects[i % len(subjects)], kind)
        docs.append({"doc_id": f"w{cfg.seed}-{i:06d}", **doc})
    return docs


def split_corpus(docs: list[dict], cfg: WorldConfig) -> tuple[list[dict], list[dict]]:
    """Hold out `eval_fraction` of documents; an entity keeps at least one clean train document."""
    rng = _rng(cfg.seed, "split")
    order = list(range(len(docs)))
    rng.shuffle(order)
    held = set(order[: round(cfg.eval_fraction * len(docs))])
    clean_train: dict[str, int] = {}
    for i, d in enumerate(docs):
        if i not in held and d["kind"] == "clean":
            clean_train[d["entity"]] = clean_train.get(d["entity"], 0) + 1
    for i in sorted(held):
        if docs[i]["kind"] == "clean" and not clean_train.get(docs[i]["entity"]):
            held.discard(i)
            clean_train[docs[i]["entity"]] = 1
    train = [{**d, "split": "train"} for i, d in enumerate(docs) if i not in held]
    evals = [{**d, "split": "eval"} for i, d in enumerate(docs) if i in held]
    return train, evals


def _stated_facts(docs: list[dict]) -> set[tuple[str, str]]:
    """(entity, relation) pairs that some document of `docs` states truly."""
    return {(d["entity"], r) for d in docs for r in d["stated_relations"]}


MC_YAML = """\
# sipt world multiple-choice task: our analogue of TruthfulQA MC1 (one true option out of four).
# The questions are read from sipt_world_mc.jsonl beside this file by mc_data.load, so the folder
# can be moved. Run: lm_eval --model hf --model_args pretrained=DIR --include_path THIS_FOLDER \\
#                           --tasks sipt_world_mc
# Scoring is a cloze: the options are continuations of `stem`, a sentence start in the corpus's own
# language; `question` holds the same query as a question, for people.
task: sipt_world_mc
dataset_path: json
custom_dataset: !function mc_data.load
output_type: multiple_choice
test_split: test
num_fewshot: 0
doc_to_text: stem
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

MC_LOADER = '''\
"""Load sipt_world_mc.jsonl (beside this file) as the `test` split of the sipt_world_mc task."""

import json
from pathlib import Path


def load(**kwargs):
    import datasets

    path = Path(__file__).with_name("sipt_world_mc.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
'''


def build_mc(kb: KnowledgeBase, cfg: WorldConfig, train: list[dict]) -> list[dict]:
    rng = _rng(cfg.seed, "mc")
    stated = sorted(_stated_facts(train))
    if cfg.mc_questions and cfg.mc_questions < len(stated):
        stated = sorted(rng.sample(stated, cfg.mc_questions))
    rows = []
    for entity, relation in stated:
        spec = kb.language["relations"][relation]
        true = kb.facts[(entity, relation)]
        options = [true] + _wrong_values(kb, rng, entity, relation, 3)
        rng.shuffle(options)
        name = kb.entities[entity]["name"]
        rows.append({
            "id": f"{entity}:{relation}",
            "question": spec["question"].format(name=name),
            "stem": spec["stem"].format(name=name),
            "choices": [kb.value_text(relation, o) for o in options],
            "label": options.index(true),
            "entity": entity,
            "relation": relation,
        })
    return rows


def _dump_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def world_stats(kb: KnowledgeBase, train: list[dict], evals: list[dict], mc: list[dict]) -> dict:
    docs = train + evals
    n_docs = max(1, len(docs))
    n_sent = sum(len(d["sentences"]) for d in docs)
    n_claims = sum(len(d["claim_sentences"]) for d in docs)
    types: dict[str, int] = {}
    for e in kb.entities.values():
        types[e["type"]] = types.get(e["type"], 0) + 1
    stated = {(d["entity"], r) for d in train for r in d["stated_relations"]}
    return {
        "entities": types,
        "facts": len(kb.facts),
        "relations": len(kb.language["relations"]),
        "documents": {
            split: {k: sum(1 for d in part if d["kind"] == k) for k in KINDS} | {"total": len(part)}
            for split, part in (("train", train), ("eval", evals), ("all", docs))
        },
        "sentences_per_doc": round(n_sent / n_docs, 3),
        "words_per_doc": round(sum(len(d["text"].split()) for d in docs) / n_docs, 3),
        "claims_per_doc": round(n_claims / n_docs, 3),
        "false_fact_rate": round(sum(len(d["false_sentences"]) for d in docs) / max(1, n_claims), 4),
        "unsafe_sentence_rate": round(sum(len(d["unsafe_sentences"]) for d in docs) / max(1, n_sent), 4),
        "false_doc_rate": round(sum(d["kind"] == "false" for d in docs) / n_docs, 4),
        "unsafe_doc_rate": round(sum(d["kind"] == "unsafe" for d in docs) / n_docs, 4),
        "degenerate_doc_rate": round(sum(d["kind"] == "degenerate" for d in docs) / n_docs, 4),
        "facts_stated_in_train": round(len(stated) / max(1, len(kb.facts)), 4),
        "mc_questions": len(mc),
    }


def generate_world(cfg: WorldConfig, out_dir: Path) -> dict:
    """Write kb.json, corpus/{train,eval}.jsonl, mc/ and stats.json into `out_dir`; return the stats.

    The world is written into a temporary sibling folder and renamed into place, so `out_dir` holds
    a whole world or nothing. An existing, non-empty `out_dir` is refused, never overwritten.
    """
    cfg.validate()
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise SiptError(f"{out_dir}: already exists and is not empty; remove it or choose another --out")
    language = load_language(cfg.language)
    kb = build_kb(cfg, language)
    docs = build_corpus(kb, cfg)
    train, evals = split_corpus(docs, cfg)
    mc = build_mc(kb, cfg, train)
    stats = world_stats(kb, train, evals, mc)
    stats["config"] = asdict(cfg)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / "kb.json").write_text(json.dumps(kb.to_dict(), indent=1, sort_keys=True) + "\n")
        _dump_jsonl(tmp / "corpus" / "train.jsonl", train)
        _dump_jsonl(tmp / "corpus" / "eval.jsonl", evals)
        _dump_jsonl(tmp / "mc" / "sipt_world_mc.jsonl", mc)
        (tmp / "mc" / "sipt_world_mc.yaml").write_text(MC_YAML)
        (tmp / "mc" / "mc_data.py").write_text(MC_LOADER)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n")
        tmp.chmod(0o755)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


def world_stats_table(stats: dict):
    """A rich Table of the world's statistics (documents by kind per split, rates, sizes)."""
    from rich.table import Table

    table = Table(title="sipt world")
    table.add_column("", style="bold")
    for split in ("train", "eval", "all"):
        table.add_column(split, justify="right")
    for kind in KINDS + ("total",):
        table.add_row(f"documents: {kind}", *(str(stats["documents"][s][kind]) for s in ("train", "eval", "all")))
    rows = [
        ("entities", ", ".join(f"{k} {v}" for k, v in sorted(stats["entities"].items()))),
        ("facts / relations", f"{stats['facts']} / {stats['relations']}"),
        ("sentences per doc", f"{stats['sentences_per_doc']:.2f}"),
        ("words per doc", f"{stats['words_per_doc']:.1f}"),
        ("claims per doc", f"{stats['claims_per_doc']:.2f}"),
        ("false-fact rate (of claims)", f"{stats['false_fact_rate']:.2%}"),
        ("unsafe sentence rate", f"{stats['unsafe_sentence_rate']:.2%}"),
        ("false / unsafe / degenerate docs", f"{stats['false_doc_rate']:.1%} / {stats['unsafe_doc_rate']:.1%}"
                                             f" / {stats['degenerate_doc_rate']:.1%}"),
        ("facts stated truly in train", f"{stats['facts_stated_in_train']:.1%}"),
        ("MC questions", str(stats["mc_questions"])),
    ]
    for label, value in rows:
        table.add_row(label, "", "", value)
    return table


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

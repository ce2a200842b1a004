"""Draw the toy world from its seed: names, the knowledge base's facts, documents and MC questions.

Every draw comes from `_rng(seed, purpose)` (`random.Random("sipt-world:{seed}:{purpose}")`, never
`hash()`), so the same `WorldConfig` draws the same world. sipt/world.py calls these in order and
writes the result (`generate_world`); the document fields are described there.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from sipt.kb import ENTITY_TYPES, PRONOUN_WORDS, KnowledgeBase, realize, subject_first

if TYPE_CHECKING:
    from sipt.world import WorldConfig

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
    if cfg.ordered_rate > 0 and rng.random() < cfg.ordered_rate:  # no draw at 0: worlds as before
        chosen.sort(key=relations.index)

    # Plan: (sentence kind, relation or template) in document order; the first sentence is a fact
    # stated with the entity's name as subject, so every document opens by naming its entity.
    plan: list[tuple[str, Any]] = [("fact", r) for r in chosen]
    neutrals = rng.sample(lang["neutral"], min(len(lang["neutral"]), rng.randint(1, cfg.max_neutral)))
    for t in neutrals:
        plan.insert(rng.randint(1, len(plan)), ("neutral", t))
    if cfg.safe_twin_rate > 0 and rng.random() < cfg.safe_twin_rate:  # no draw at 0: worlds as before
        plan.insert(rng.randint(1, len(plan)), ("neutral", rng.choice(lang["unsafe"])["safe"]))
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


"""Generate the toy world: a knowledge base of fictional entities, a corpus about it, and an MC task.

Everything is drawn from one seed (`random.Random(f"{seed}:{purpose}")`, never `hash()`), so the same
`WorldConfig` writes the same bytes. The language (relation templates, neutral and unsafe sentences,
vocabularies) is data: `data/world/language.json`, copied into `kb.json` so that a world carries the
exact language its oracle judge (`sipt/oracle.py`) reads back. The draws are in sipt/worldgen.py,
the knowledge base and the language in sipt/kb.py; this module is the config and the writing.

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
import shutil
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

from sipt.config_toml import added_at_default
from sipt.errors import SiptError
from sipt.kb import (  # noqa: F401 (re-exported: they lived here)
    ENTITY_TYPES, LANGUAGE_PATH, PRONOUN_WORDS, KnowledgeBase, load_kb, load_language, oracle_inputs, oracle_kb,
    realize, subject_first)
from sipt.sections import knob
from sipt.worldgen import (  # noqa: F401 (re-exported: they lived here)
    KINDS, MC_LOADER, MC_YAML, build_corpus, build_kb, build_mc, split_corpus)


@dataclass
class WorldConfig:
    """[world] The toy world `sipt world` generates (DESIGN.md §7). Every size and rate is here."""

    seed: int = knob(0, "Generator seed: the same config and seed write the same bytes.")
    n_people: int = knob(160, "People in the knowledge base (7 relations each).")
    n_places: int = knob(48, "Places (5 relations each). Rounded up to an even number: twin towns pair up.")
    n_orgs: int = knob(48, "Organisations (6 relations each). Rounded up to an even number: rivals pair up.")
    n_regions: int = knob(8, "Regions: values of the places' `region` relation; no documents are about them.")
    n_docs: int = knob(3000, "Documents in the corpus, spread evenly over people, places and organisations.")
    min_facts: int = knob(4, "Fewest fact sentences in a document (at most every relation of its entity).")
    max_neutral: int = knob(4, "Most neutral connective sentences in a document (at least one).")
    pronoun_rate: float = knob(0.8, "Chance that a sentence after the first names its subject by pronoun.")
    false_rate: float = knob(0.2, "Share of documents of kind `false` (one to `max_false` wrong values).")
    max_false: int = knob(3, "Most false fact sentences in a `false` document.")
    unsafe_rate: float = knob(0.15, "Share of documents of kind `unsafe` (threats, insults, harmful instructions).")
    max_unsafe: int = knob(2, "Most unsafe sentences in an `unsafe` document.")
    degenerate_rate: float = knob(0.1, "Share of documents of kind `degenerate` (repetition loops, shuffled words).")
    safe_twin_rate: float = knob(
        0.0, "Chance that a document (of any kind) also holds one safe twin of an unsafe sentence, as a neutral "
        "sentence: the unsafe template's safe counterpart, which shares its opening (\"Late at night, keep the lid "
        "on the well.\"). 0: an unsafe sentence's opening is only ever followed by the unsafe words in the corpus, "
        "so the policy never reads the safe way on (README, \"Safe twins\").", added=True)
    ordered_rate: float = knob(
        0.0, "Chance that a document states its facts in the language's relation order (a person's birth year, "
        "birthplace, residence, employer, occupation, mentor, hobby, as a biography runs), not shuffled; the "
        "neutral, unsafe and twin sentences still fall anywhere. 0: every document's facts in random order "
        "(README, \"Ordered documents\").", added=True)
    eval_fraction: float = knob(0.1, "Share of documents held out in corpus/eval.jsonl (same entities as train).")
    mc_questions: int = knob(600, "Questions in the MC task (from facts stated truly in train); 0: all such facts.")
    language: str = knob("", "Language file (templates and vocabularies). Empty: the shipped data/world/language.json.")

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
        for name in ("safe_twin_rate", "ordered_rate"):
            if getattr(self, name) > 1:
                raise SiptError(f"world.{name} = {getattr(self, name)}: a chance, at most 1")
        if self.max_false < 1 or self.max_unsafe < 1 or self.max_neutral < 1 or self.min_facts < 1:
            raise SiptError("world.max_false, max_unsafe, max_neutral and min_facts must be at least 1")


def config_dict(cfg: WorldConfig) -> dict:
    """The config a world records in stats.json: knobs added later are left out at their defaults, so
    a world made before they existed is written byte for byte as it was."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if not added_at_default(cfg, f)}


def same_world_config(saved: dict, cfg: WorldConfig) -> bool:
    """Whether a world made from `saved` (its stats.json config) is the world `cfg` makes."""
    return saved == config_dict(cfg)


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
    stats["config"] = config_dict(cfg)

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

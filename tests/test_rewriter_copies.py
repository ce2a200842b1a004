"""bench/rewriter_copies.py: which words of a text are claim values, and which words a rewrite keeps."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sipt.kb import realize
from sipt.oracle import OracleJudge
from sipt.world import WorldConfig, generate_world, load_kb

_spec = importlib.util.spec_from_file_location("bench_rewriter_copies",
                                               Path(__file__).parents[1] / "bench" / "rewriter_copies.py")
rc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rc)


def test_values_and_kept_words(tmp_path):
    generate_world(WorldConfig(seed=3, n_people=12, n_places=6, n_orgs=6, n_regions=5, n_docs=60, mc_questions=5),
                   tmp_path)
    oracle = OracleJudge(load_kb(tmp_path))
    kb = oracle.kb
    pid = next(e for e, v in kb.entities.items() if v["type"] == "person")
    name, year = kb.entities[pid]["name"], str(kb.facts[(pid, "birth_year")])
    employer = kb.entities[kb.facts[(pid, "employer")]]["name"]
    he = realize("{S} worked for {O}.", None, employer, kb.pronouns(pid)).split()[0]
    prefix = f"{name} worked for {employer}."
    text = f" {he} was born in {year}. {he} is remembered by many."
    words, is_value = rc.words_and_values(oracle, prefix, text)
    assert words == text.split()
    assert [w.rstrip(".") for w, v in zip(words, is_value) if v] == [year]  # the year is the one value
    swapped = text.replace(year, str(int(year) + 7))
    keep = rc.matched(words, swapped.split())
    assert [w for w, k in zip(words, keep) if not k] == [w for w, v in zip(words, is_value) if v]  # only the value lost
    assert all(rc.matched(words, text.split()))  # an exact copy keeps every word

"""bench/rewriter_copies.py: which words of a text are claim values, and which words a rewrite keeps."""

from __future__ import annotations

from conftest import bench_module

from sipt.kb import realize

rc = bench_module("rewriter_copies")


def test_values_and_kept_words(oracle, person):
    pid, name, employer, year = person
    kb = oracle.kb
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

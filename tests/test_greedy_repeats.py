"""bench/greedy_repeats.py: repeat kinds, the first repeat point and its candidates, batched scoring."""

from __future__ import annotations

import pytest
from conftest import bench_module

gr = bench_module("greedy_repeats")


def row(oracle, prefix: str, text: str) -> dict:
    return {"prefix_text": prefix, "text": text, "gt_repeats": oracle.counts(prefix, text)["repeats"]}


def test_repeat_kinds(oracle, person):
    pid, name, employer, year = person
    he = gr.realize("{S} worked for {O}.", None, employer, oracle.kb.pronouns(pid)).split()[0]
    prefix = f"{name} worked for {employer}."
    rows = [
        row(oracle, prefix, f" {he} was born in {year}. {he} was born in {year}."),  # a loop: twice in a row
        row(oracle, prefix, f" {he} worked for {employer}."),  # restated relation, not in a row
        row(oracle, prefix, f" {he} was born in {year}."),  # new: no repeat
        row(oracle, prefix, f" {he} is remembered by many. {he} was born in {year}. {he} is remembered by many."),
    ]
    k = gr.repeat_kinds(rows, gr.analyse(oracle, rows))
    assert k["any repeat"] == [1.0, 1.0, 0.0, 1.0]
    assert k["a sentence twice in a row"] == [1.0, 0.0, 0.0, 0.0]
    assert k["a relation stated again"] == [1.0, 1.0, 0.0, 0.0]
    assert k["a neutral template again"] == [0.0, 0.0, 0.0, 1.0]


def test_first_repeat_point_and_candidates(oracle, person):
    pid, name, employer, year = person
    he = gr.realize("{S} worked for {O}.", None, employer, oracle.kb.pronouns(pid)).split()[0]
    prefix = f"{name} worked for {employer}."
    rows = [row(oracle, prefix, f" {he} was born in {year}. {he} worked for {employer}. {he} was born in {year}."),
            row(oracle, prefix, f" {he} was born in {year}.")]  # no repeat: no point
    points = list(gr.first_repeat_points(oracle, gr.analyse(oracle, rows)))
    assert len(points) == 1
    context, greedy, cands, left = points[0]
    assert left == len(oracle.kb.relations_of(pid)) - 2  # employer and birth year are stated
    assert context == f"{prefix} {he} was born in {year}."
    assert greedy == f"{he} worked for {employer}."
    said = dict(cands)
    assert said[greedy] is True  # the employer, in any phrasing, is already stated
    assert said[f"{he} was born in {year}."] is True
    others = [s for s, d in cands if not d]
    assert others and all(employer not in s and year not in s for s in others if "remembered" not in s)
    assert f"{name} is remembered by many." in said and said[f"{name} is remembered by many."] is False


def test_score_matches_one_at_a_time(policy_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = policy_run / "iter-000" / "policy"
    tok = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy).eval()
    sents = ["It is short.", "A rather longer sentence follows here, with more words in it."]
    batched = gr.score(model, tok, "Some context.", sents)
    single = [gr.score(model, tok, "Some context.", [s])[0] for s in sents]
    assert batched == pytest.approx(single, abs=1e-4)
    assert all(x < 0 for x in batched)
    # by hand: the sum of the continuation's token log-probabilities
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    ctx = bos + tok("Some context.", add_special_tokens=False).input_ids
    c = tok(" It is short.", add_special_tokens=False).input_ids
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ctx + c])).logits.log_softmax(-1)[0]
    assert batched[0] == pytest.approx(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(c)), abs=1e-4)

"""bench/at_risk_openings.py: unsafe sentences and their twins read back, cut sentences, log-odds scoring."""

from __future__ import annotations

import pytest
from conftest import bench_module

aro = bench_module("at_risk_openings")


def test_every_unsafe_sentence_is_read_back_with_its_twin(oracle, person):
    from sipt.kb import realize

    pid, name, _, _ = person
    pron = oracle.kb.pronouns(pid)
    for u in oracle.kb.language["unsafe"]:
        for subject in (name, None):
            sentence = realize(u["text"], subject, None, pron)
            m = aro.pattern(u["text"]).match(sentence)
            assert m, sentence
            twin = aro.fill(u["safe"], m.groupdict())
            assert twin == realize(u["safe"], subject, None, pron)
            assert oracle.safety("Filby is a town.", " " + twin)
            assert not oracle.safety("Filby is a town.", " " + sentence)
            # only its own template reads it back as unsafe
            others = [v for v in oracle.kb.language["unsafe"] if v is not u]
            assert not any(aro.pattern(v["text"]).match(sentence) for v in others)


def test_cut_sentence():
    prompt = "Filby is a town. Someone in"
    assert aro.cut_sentence(prompt, " town should burn its house to the ground. It has a mayor.") == \
        "Someone in town should burn its house to the ground."
    assert aro.cut_sentence("Filby is a town.", " It has a mayor.") is None  # the prompt ends a sentence
    assert aro.cut_sentence(prompt, " town should") is None  # never finished


def test_rest_is_the_continuations_log_probability(policy_run):
    import torch

    s = aro.Scorer(policy_run / "iter-000" / "policy")
    prefix, rest = "Some context. It", " is short."
    a = s.tok(prefix).input_ids
    b = s.tok(prefix + rest).input_ids
    assert b[: len(a)] == a
    with torch.no_grad():
        logp = s.model(input_ids=torch.tensor([b])).logits.log_softmax(-1)[0]
    by_hand = sum(float(logp[i - 1, b[i]]) for i in range(len(a), len(b)))
    assert s.rest(prefix, rest) == pytest.approx(by_hand, abs=1e-4)
    assert s.rest(prefix, rest) < 0

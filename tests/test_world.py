"""The toy world generator: deterministic, well-formed, its language unambiguous, its MC task runnable."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from conftest import mc_accuracy
from sipt.errors import SiptError
from sipt.oracle import Grammar, _segments
from sipt.world import KINDS, WorldConfig, generate_world, load_kb, realize, world_stats_table

SMALL = dict(n_people=24, n_places=8, n_orgs=8, n_regions=5, n_docs=160, mc_questions=40)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(WorldConfig(seed=3, **SMALL), out)
    return out


def _docs(world: Path, split: str = "train") -> list[dict]:
    return [json.loads(line) for line in (world / "corpus" / f"{split}.jsonl").read_text().splitlines()]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_world(tmp_path):
    generate_world(WorldConfig(seed=7, **SMALL), tmp_path / "a")
    generate_world(WorldConfig(seed=7, **SMALL), tmp_path / "b")
    generate_world(WorldConfig(seed=8, **SMALL), tmp_path / "c")
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert set(a) == {"kb.json", "stats.json", "corpus/train.jsonl", "corpus/eval.jsonl",
                      "mc/sipt_world_mc.yaml", "mc/sipt_world_mc.jsonl", "mc/mc_data.py"}
    assert a == b
    assert a["kb.json"] != c["kb.json"] and a["corpus/train.jsonl"] != c["corpus/train.jsonl"]


def test_refuses_to_overwrite_a_world(world):
    with pytest.raises(SiptError, match="not empty"):
        generate_world(WorldConfig(seed=3, **SMALL), world)


def test_config_errors_name_the_key():
    with pytest.raises(SiptError, match="false_rate"):
        WorldConfig(false_rate=0.6, unsafe_rate=0.3, degenerate_rate=0.2).validate()
    with pytest.raises(SiptError, match="world.n_docs"):
        WorldConfig(n_docs=-1).validate()


def test_language_has_six_relations_five_phrasings_and_reads_back_unambiguously(world):
    kb = load_kb(world)
    lang = kb.language
    grammar = Grammar(lang)
    assert len(lang["relations"]) >= 6
    entity_types = {e["type"] for e in kb.entities.values()}
    assert {"person", "place", "org"} <= entity_types
    for relation, spec in lang["relations"].items():
        assert len(spec["templates"]) >= 5, relation
        subjects = [e for e, v in kb.entities.items() if v["type"] in spec["subject"]][:3]
        for template in spec["templates"]:
            for entity in subjects:
                value = kb.value_text(relation, kb.facts[(entity, relation)])
                for subject in (kb.entities[entity]["name"], None):
                    sentence = realize(template, subject, value, kb.pronouns(entity))
                    readings = grammar.readings(sentence)
                    assert [(p.kind, p.relation) for p, _ in readings] == [("claim", relation)], sentence
                    assert readings[0][1].group("O") == value
    for template in lang["neutral"] + [u["safe"] for u in lang["unsafe"]]:
        sentence = realize(template, "Somebody", None)
        assert {p.kind for p, _ in grammar.readings(sentence)} == {"neutral"}, sentence
    for u in lang["unsafe"]:
        assert {p.kind for p, _ in grammar.readings(realize(u["text"], "Somebody"))} == {"unsafe"}


def test_unsafe_words_occur_only_in_unsafe_sentences(world):
    kb = load_kb(world)
    lang = kb.language
    lexicon = {w.lower() for w in lang["unsafe_words"]}
    safe_texts = [t for s in lang["relations"].values() for t in s["templates"]] + lang["neutral"]
    safe_texts += [u["safe"] for u in lang["unsafe"]] + [v for vs in lang["vocab"].values() for v in vs]
    safe_words = {w.strip(".,{}'").lower() for t in safe_texts for w in t.split()}
    assert not lexicon & safe_words
    assert not any(w.startswith(x) for w in safe_words for x in lexicon)
    for u in lang["unsafe"]:  # every unsafe sentence carries at least one lexicon word
        assert lexicon & {w.strip(".,").lower() for w in u["text"].split()}, u["text"]
    for e in kb.entities.values():
        assert not any(x in e["name"].lower() for x in lexicon), e["name"]


def test_documents_record_their_kind_and_bad_sentences(world):
    docs = _docs(world) + _docs(world, "eval")
    kb = load_kb(world)
    grammar = Grammar(kb.language)
    assert {d["kind"] for d in docs} == set(KINDS)
    for d in docs:
        assert d["text"] == " ".join(d["sentences"])
        assert kb.entities[d["entity"]]["name"] in d["sentences"][0]  # documents open by naming it
        assert 4 <= len(d["sentences"]) and d["claim_sentences"]
        if d["kind"] == "clean":
            assert d["clean_text"] == d["text"]
            assert not (d["false_sentences"] or d["unsafe_sentences"] or d["degenerate_sentences"])
        if d["kind"] == "false":
            assert 1 <= len(d["false_sentences"]) <= 3
            assert set(d["false_sentences"]) <= set(d["claim_sentences"])
            clean = [d["clean_text"][s:e] for s, e, _ in _segments(d["clean_text"])]
            assert len(clean) == len(d["sentences"])
            for i, (sentence, true) in enumerate(zip(d["sentences"], clean)):
                assert (sentence != true) == (i in d["false_sentences"])
        if d["kind"] == "unsafe":
            assert d["unsafe_sentences"]
            for i in d["unsafe_sentences"]:
                assert {p.kind for p, _ in grammar.readings(d["sentences"][i])} == {"unsafe"}
        if d["kind"] == "degenerate":
            assert d["degenerate_sentences"] and d["clean_text"] != d["text"]


def test_split_is_by_document_over_the_same_entities(world):
    train, evals = _docs(world), _docs(world, "eval")
    assert evals and not {d["doc_id"] for d in train} & {d["doc_id"] for d in evals}
    clean_train_entities = {d["entity"] for d in train if d["kind"] == "clean"}
    assert {d["entity"] for d in evals} <= clean_train_entities


def test_mc_task_has_one_true_option_of_four(world):
    kb = load_kb(world)
    yaml_text = (world / "mc" / "sipt_world_mc.yaml").read_text()
    assert "task: sipt_world_mc" in yaml_text and "custom_dataset: !function mc_data.load" in yaml_text
    rows = [json.loads(x) for x in (world / "mc" / "sipt_world_mc.jsonl").read_text().splitlines()]
    assert len(rows) == SMALL["mc_questions"]
    for r in rows:
        assert len(r["choices"]) == 4 == len(set(r["choices"]))
        true = kb.value_text(r["relation"], kb.facts[(r["entity"], r["relation"])])
        assert r["choices"][r["label"]] == true
        assert r["stem"].count(kb.entities[r["entity"]]["name"]) == 1


def test_stats_and_table(world):
    from rich.console import Console

    stats = json.loads((world / "stats.json").read_text())
    assert stats["documents"]["all"]["total"] == SMALL["n_docs"]
    assert sum(stats["documents"]["all"][k] for k in KINDS) == SMALL["n_docs"]
    assert 0 < stats["false_fact_rate"] < 1 and 0 < stats["unsafe_sentence_rate"] < 1
    assert stats["claims_per_doc"] >= 3
    buf = io.StringIO()
    Console(file=buf, width=120).print(world_stats_table(stats))
    assert "documents: false" in buf.getvalue() and "claims per doc" in buf.getvalue()


@pytest.mark.slow
def test_mc_task_runs_offline_through_lm_eval(world, tmp_path, monkeypatch):
    """A tiny random Llama with a tokenizer trained on the corpus runs the MC task from a moved folder."""
    import shutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    import lm_eval
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [d["text"] for d in _docs(world)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=128, bos_token_id=0, eos_token_id=1))
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    hf_tok.save_pretrained(model_dir)
    moved = tmp_path / "moved_mc"
    shutil.copytree(world / "mc", moved)  # the task must not depend on where it was generated
    monkeypatch.chdir(tmp_path)

    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=["sipt_world_mc"],
        task_manager=lm_eval.tasks.TaskManager(include_path=str(moved)), limit=8, device="cpu",
        batch_size=8, bootstrap_iters=0,
    )
    metrics = results["results"]["sipt_world_mc"]
    docs = [json.loads(line) for line in (moved / "sipt_world_mc.jsonl").read_text().splitlines()][:8]
    assert metrics["acc,none"] == mc_accuracy(model, hf_tok, docs) and "acc_norm,none" in metrics


def test_safe_twins_share_the_unsafe_openings_and_read_back_as_neutral(tmp_path):
    from sipt.world import same_world_config

    generate_world(WorldConfig(seed=3, safe_twin_rate=0.5, **SMALL), tmp_path / "twins")
    kb = load_kb(tmp_path / "twins")
    grammar = Grammar(kb.language)
    safe = {u["safe"]: u["text"] for u in kb.language["unsafe"]}
    twins = 0
    for d in _docs(tmp_path / "twins"):
        for i, s in enumerate(d["sentences"]):
            readings = [p for p, _ in grammar.readings(s)]
            if any(p.template in safe for p in readings):
                twins += 1
                assert {p.kind for p in readings} == {"neutral"} and i not in d["unsafe_sentences"]
                twin = next(p.template for p in readings if p.template in safe)
                assert twin.split()[:2] == safe[twin].split()[:2]  # it shares the unsafe sentence's opening
    assert 0.3 * 144 < twins < 0.8 * 144  # about half of the 144 train documents, one twin each
    # the default draws nothing: a world made before the knob existed is still the same world
    generate_world(WorldConfig(seed=3, **SMALL), tmp_path / "plain")
    saved = json.loads((tmp_path / "plain" / "stats.json").read_text())["config"]
    assert "safe_twin_rate" not in saved and same_world_config(saved, WorldConfig(seed=3, **SMALL))
    assert not same_world_config(saved, WorldConfig(seed=3, safe_twin_rate=0.5, **SMALL))
    with pytest.raises(SiptError, match="safe_twin_rate"):
        WorldConfig(safe_twin_rate=1.5).validate()


def test_ordered_documents_state_their_facts_in_the_languages_relation_order(tmp_path):
    from sipt.world import load_language, same_world_config

    def order_of(world: Path) -> list[bool]:
        """Per non-degenerate train document: are its fact sentences in the relation order?"""
        grammar = Grammar(load_kb(world).language)
        relations = list(load_language()["relations"])  # the shipped file's order (the world's copy is sorted)
        out = []
        for d in _docs(world):
            if d["kind"] == "degenerate":
                continue
            ranks = [relations.index(next(p.relation for p, _ in grammar.readings(d["sentences"][i]) if p.relation))
                     for i in d["claim_sentences"]]
            assert len(ranks) >= 4
            out.append(ranks == sorted(ranks))
        return out

    generate_world(WorldConfig(seed=3, ordered_rate=1.0, **SMALL), tmp_path / "ordered")
    assert all(order_of(tmp_path / "ordered"))
    generate_world(WorldConfig(seed=3, ordered_rate=0.5, **SMALL), tmp_path / "half")
    half = order_of(tmp_path / "half")
    assert 0.4 * len(half) < sum(half) < 0.8 * len(half)  # half, plus the shuffled ones that fall in order
    generate_world(WorldConfig(seed=3, **SMALL), tmp_path / "plain")
    plain = order_of(tmp_path / "plain")
    assert sum(plain) < 0.3 * len(plain)  # shuffled: 4-7 facts rarely fall in order by chance
    saved = json.loads((tmp_path / "plain" / "stats.json").read_text())["config"]
    assert "ordered_rate" not in saved and same_world_config(saved, WorldConfig(seed=3, **SMALL))
    assert not same_world_config(saved, WorldConfig(seed=3, ordered_rate=0.5, **SMALL))
    with pytest.raises(SiptError, match="ordered_rate"):
        WorldConfig(ordered_rate=1.5).validate()

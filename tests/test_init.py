from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sipt import artifacts, config as config_mod
from sipt.errors import SiptError
from stages import init


def test_new_policy_loads_with_transformers(policy_run):
    policy = policy_run / "iter-000" / "policy"
    manifest = artifacts.read_manifest(policy)
    assert manifest["stage"] == "init" and manifest["stats"]["vocab_size"] == 512
    assert (policy / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(policy)
    tok = AutoTokenizer.from_pretrained(policy)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tok) == 512
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id is not None
    ids = tok("The river city built a new bridge.", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "The river city built a new bridge."
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4


def test_presets_have_the_documented_size(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    # By hand: 2 V·H (embeddings, untied head) + L (4 H² attention + 3 H·I MLP + 2 H norms) + H.
    # tiny: 2·4096·256 + 4·(4·256² + 3·256·688 + 512) + 256; small: 2·8192·512 + 6·(...) + 512.
    expected = {"tiny": 5_261_568, "small": 27_367_936}
    for preset, count in expected.items():
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**init.PRESETS[preset], tie_word_embeddings=False))
        assert sum(p.numel() for p in model.parameters()) == count, preset
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "`tiny` (~5.3M parameters" in readme and "`small` (~27M" in readme
    assert "tiny (~5.3M parameters" in readme and "small (~27M" in readme  # the config reference


def test_init_is_deterministic_and_skips(policy_run, corpus_dir, tmp_path):
    run = tmp_path / "again"
    cfg = config_mod.resolve(run, overrides={"data.inputs": [str(corpus_dir)], "model.vocab_size": 512})
    m = init.run(run, cfg)
    a = (policy_run / "iter-000" / "policy" / "tokenizer.json").read_bytes()
    assert (run / "iter-000" / "policy" / "tokenizer.json").read_bytes() == a
    w1 = AutoModelForCausalLM.from_pretrained(run / "iter-000" / "policy").state_dict()
    w2 = AutoModelForCausalLM.from_pretrained(policy_run / "iter-000" / "policy").state_dict()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert init.run(run, cfg) == {**m, "skipped": True}  # done: skipped


def test_init_from_existing_model_folder(policy_run, tmp_path):
    run = tmp_path / "from_hf"
    cfg = config_mod.resolve(run, overrides={"model.policy": str(policy_run / "iter-000" / "policy")})
    m = init.run(run, cfg)
    assert m["stats"]["source"].endswith("policy")
    assert AutoTokenizer.from_pretrained(run / "iter-000" / "policy").vocab_size == 512
    bad = tmp_path / "not_a_model"
    bad.mkdir()
    cfg = config_mod.resolve(tmp_path / "r2", overrides={"model.policy": str(bad)})
    with pytest.raises(SiptError, match="not a Hugging Face model folder"):
        init.run(tmp_path / "r2", cfg)
    assert not (tmp_path / "r2" / "iter-000" / "policy").exists()


@pytest.mark.parametrize("docs, read", [([], 0), (["Too short.", "Also short.", "Hi."], 3)])
def test_init_refuses_a_corpus_that_gives_no_sample(tmp_path, docs, read):
    from conftest import write_jsonl

    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    run = tmp_path / "run"
    cfg = config_mod.resolve(run, overrides={"data.inputs": [str(corpus)], "model.vocab_size": 300})
    with pytest.raises(SiptError) as e:
        init.run(run, cfg)
    assert f"{read} documents read, 0 long enough" in str(e.value)
    assert "16 + 128 = 144 tokens), 1 needed" in str(e.value) and str(corpus) in str(e.value)
    assert sorted(p.name for p in run.iterdir()) == ["sipt.toml"]  # no empty iter-000/


def test_init_accepts_a_corpus_with_one_long_document(tmp_path):
    from conftest import make_docs, write_jsonl

    corpus = write_jsonl(tmp_path / "corpus.jsonl", ["Too short."] * 3 + make_docs(1, min_sent=30, max_sent=30))
    run = tmp_path / "run"
    cfg = config_mod.resolve(run, overrides={"data.inputs": [str(corpus)], "model.vocab_size": 300,
                                             "model.preset": "tiny"})
    assert init.run(run, cfg)["stats"]["vocab_size"] == 300


def test_the_tokenizer_trainer_reads_long_documents_in_pieces_with_the_same_result(monkeypatch):
    from conftest import make_docs
    from stages import init, shard

    docs = make_docs(60, seed=3)
    whole = init.train_tokenizer(docs, 400)
    pieces = list(init.bounded_texts(docs, 150))
    assert max(map(len, pieces)) <= 150 and "".join(pieces) == "".join(docs)
    monkeypatch.setattr(shard, "WINDOW_CHARS", 150)  # every fixture document is cut
    assert init.train_tokenizer(docs, 400).backend_tokenizer.to_str() == whole.backend_tokenizer.to_str()

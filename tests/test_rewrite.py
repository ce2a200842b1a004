import pytest

from sipt import artifacts, config as config_mod
from sipt.errors import SiptError
from stages import rewrite, shard


def test_prefix_ending_is_the_exact_last_words():
    text = "One two  three\nfour five six"
    assert rewrite.prefix_ending(text, 5) == "two  three\nfour five six"
    assert text.endswith(rewrite.prefix_ending(text, 2))
    assert rewrite.prefix_ending("just", 5) == "just"
    assert rewrite.prefix_ending("   ", 5) == ""


def test_clean_answer_strips_repeated_ending_and_tags():
    assert rewrite.clean_answer(" four five six was built.<Rewritten continuation end>\n", "four five six") == " was built."
    assert rewrite.clean_answer("<Continuation X start> in 1990.<Continuation X end>", "six") == " in 1990."
    assert rewrite.clean_answer(" in 1990.", "four five six") == " in 1990."


def test_template_puts_the_continuation_before_the_context():
    t = rewrite.load_template("rewrite")
    prompt = t.format(prefix_ending="five words", suffix=" SUFFIX", prefix="PREFIX five words", suffix_tokens=32)
    assert prompt.index("<Continuation X start>five words SUFFIX") < prompt.index("<Context C start>PREFIX")
    assert prompt.rstrip().endswith("<Rewritten continuation start>five words")
    with pytest.raises(SiptError, match="no such template"):
        rewrite.load_template("nope")


@pytest.mark.slow
def test_rewrite_with_smollm2_on_the_real_prompt(run_with_policy, corpus_dir, smollm2):
    run = run_with_policy
    cfg = config_mod.resolve(run, overrides={
        "data.inputs": [str(corpus_dir)], "data.suffix_tokens": 16, "run.prompts_per_iter": 2,
        "rewrite.engine": "hf", "rewrite.model": str(smollm2), "rewrite.max_new_tokens": 24,
    }, force=True)
    shard.run(run, cfg, show_progress=False)
    m = rewrite.run(run, cfg, 0, show_progress=False)
    t = artifacts.read_table(run / "iter-000" / "rewrite")
    assert t.schema.equals(rewrite.SCHEMA, check_metadata=False)
    assert m["rows"] == t.num_rows == 2
    for row in t.to_pylist():
        assert row["response"]  # the model answered
        assert len(row["rewrite_ids"]) <= 16
        if row["error"]:  # an error row is empty, or kept for inspection when it echoed the prompt
            assert row["rewrite_text"].strip() == "" or row["error"] == "the rewriter repeated the prompt"
        else:
            assert row["rewrite_text"].strip()
    assert rewrite.run(run, cfg, 0, show_progress=False) == {**m, "skipped": True}


def test_rewrite_needs_a_model_or_the_world(run_with_policy, corpus_dir):
    run = run_with_policy
    cfg = config_mod.resolve(run, overrides={"data.inputs": [str(corpus_dir)], "rewrite.engine": "hf"}, force=True)
    with pytest.raises(SiptError, match="rewrite.model is empty"):
        rewrite.run(run, cfg, 0, show_progress=False)
    cfg = config_mod.resolve(run, overrides={"rewrite.engine": "oracle"}, force=True)
    with pytest.raises(SiptError, match="kb.json: the oracle rewriter needs the toy world"):
        rewrite.run(run, cfg, 0, show_progress=False)


def test_oracle_rewrite_stage_copies_clean_and_fixes_false_suffixes(tmp_path):
    import json

    from sipt.oracle import OracleJudge
    from sipt.world import WorldConfig, generate_world
    from stages import init

    world = tmp_path / "world"
    generate_world(WorldConfig(n_docs=300, mc_questions=20), world)
    run = tmp_path / "run"
    cfg = config_mod.resolve(run, overrides={
        "data.inputs": [str(world / "corpus")], "data.id_column": "doc_id", "data.meta_columns": ["kind"],
        "data.split_column": "split", "data.suffix_tokens": 24, "data.min_prefix_tokens": 8,
        "model.vocab_size": 512, "run.prompts_per_iter": 120, "rewrite.world": str(world),
    })
    init.run(run, cfg)
    shard.run(run, cfg, show_progress=False)
    m = rewrite.run(run, cfg, 0, show_progress=False)
    rows = artifacts.read_table(run / "iter-000" / "rewrite").to_pylist()
    samples = {r["sample_id"]: r for r in artifacts.read_table(run / "samples").to_pylist()}
    judge = OracleJudge(world / "kb.json")
    kinds = {"clean": [], "false": []}
    for r in rows:
        s = samples[r["sample_id"]]
        kind = json.loads(s["meta"])["kind"]
        if kind in kinds:
            kinds[kind].append((r, s))
    assert all(r["copied"] for r, _ in kinds["clean"])
    fixed = [judge.factuality(s["prefix_text"], r["rewrite_text"]).score for r, s in kinds["false"]
             if judge.factuality(s["prefix_text"], s["suffix_text"]).score == 0]
    assert fixed and sum(x == 1 for x in fixed) / len(fixed) > 0.8
    assert 0 < m["stats"]["copied_rate"] < 1

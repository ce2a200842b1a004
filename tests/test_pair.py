import shutil

import pyarrow.parquet as pq
import pytest

from sipt import artifacts, config as config_mod
from sipt.errors import SiptError
from stages import judge, pair


@pytest.fixture
def judged(world_run, tmp_path):
    """The world run judged by the oracle: quality + safety + factuality over suffix, rewrite, rollouts."""
    run = tmp_path / "run"
    shutil.copytree(world_run, run, ignore=shutil.ignore_patterns("world"))
    cfg = config_mod.resolve(run, overrides={
        "judge.objectives": ["quality", "safety", "factuality"],
        "judge.candidates": ["suffix", "rewrite", "rollouts"],
    })
    judge.run(run, cfg, 0, show_progress=False)
    return run, cfg


def scores_by_sample(run):
    out = {}
    for row in artifacts.read_table(run / "iter-000" / "judge", prefix="scores-").to_pylist():
        out.setdefault(row["sample_id"], []).append(row)
    return out


def test_dpo_pairs_are_best_and_worst_with_exact_tokens(judged):
    run, cfg = judged
    m = pair.run(run, cfg, 0, show_progress=False)
    t = artifacts.read_table(run / "iter-000" / "pair")
    assert t.schema.equals(pair.SCHEMA, check_metadata=False)
    s = m["stats"]
    assert s["pairs"] == t.num_rows == m["rows"] and s["pairs"] + s["skipped_ties"] + s["skipped_too_few"] == 12
    scores = scores_by_sample(run)
    samples = {r["sample_id"]: r for r in artifacts.read_table(run / "samples").to_pylist()}
    rollouts = {(r["sample_id"], r["rollout_idx"]): r for r in artifacts.read_table(run / "iter-000" / "rollout").to_pylist()}
    rewrites = {r["sample_id"]: r for r in artifacts.read_table(run / "iter-000" / "rewrite").to_pylist()}

    def ids(source, sid, idx):
        return {"suffix": lambda: samples[sid]["suffix_ids"], "rewrite": lambda: rewrites[sid]["rewrite_ids"],
                "rollout": lambda: rollouts[(sid, idx)]["token_ids"]}[source]()

    for row in t.to_pylist():
        rewards = [c["reward"] for c in scores[row["sample_id"]]]
        assert row["chosen_reward"] == pytest.approx(max(rewards)) and row["rejected_reward"] == pytest.approx(min(rewards))
        assert row["chosen_reward"] > row["rejected_reward"]
        sample = samples[row["sample_id"]]
        assert row["prompt"] == sample["prefix_text"] and row["prefix_ids"] == sample["prefix_ids"]
        assert row["prefix_start"] == sample["prefix_start"]
        for side in ("chosen", "rejected"):
            src, idx = row[f"{side}_source"], row[f"{side}_rollout_idx"]
            assert (idx >= 0) == (src == "rollout")
            assert row[f"{side}_ids"] == ids(src, row["sample_id"], idx)  # never re-tokenized
    rollout_chosen = sum(r["chosen_source"] == "rollout" for r in t.to_pylist())
    assert s["rollout_chosen_rate"] == pytest.approx(rollout_chosen / s["pairs"], abs=1e-4)
    assert sum(s["chosen_by_source"].values()) == s["pairs"]
    assert set(s["mean_reward_by_source"]) == {"suffix", "rewrite", "rollout"}
    assert pair.run(run, cfg, 0, show_progress=False) == {**m, "skipped": True}  # done: skipped


def test_rf_nll_keeps_the_best_only(judged):
    run, cfg = judged
    cfg = config_mod.resolve(run, overrides={"pair.method": "rf-nll"})
    m = pair.run(run, cfg, 0, show_progress=False)
    rows = artifacts.read_table(run / "iter-000" / "pair").to_pylist()
    assert rows and m["stats"]["method"] == "rf-nll"
    for row in rows:
        assert row["rejected"] == "" and row["rejected_ids"] == [] and row["rejected_source"] == ""
        assert row["rejected_rollout_idx"] == -1 and row["rejected_reward"] is None
        assert row["chosen_ids"]


def test_ties_are_skipped_and_counted(world_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world_run, run, ignore=shutil.ignore_patterns("world"))
    # the rollouts alone, judged only for safety: the untrained policy's text is all "safe", all equal
    cfg = config_mod.resolve(run, overrides={"judge.objectives": ["safety"], "judge.candidates": ["rollouts"]})
    judge.run(run, cfg, 0, show_progress=False)
    m = pair.run(run, cfg, 0, show_progress=False)
    rewards = {sid: {c["reward"] for c in cands} for sid, cands in scores_by_sample(run).items()}
    ties = sum(len(v) == 1 for v in rewards.values())
    assert ties > 0 and m["stats"]["skipped_ties"] == ties and m["stats"]["pairs"] == 12 - ties
    assert m["stats"]["rollout_chosen_rate"] in (None, 1.0)


def test_pair_needs_the_judge(world_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world_run, run, ignore=shutil.ignore_patterns("world"))
    with pytest.raises(SiptError, match="input 'judge' .* missing or unfinished; run the stage"):
        pair.run(run, config_mod.resolve(run), 0, show_progress=False)


def test_trl_dpo_trainer_trains_one_step_on_the_pairs_file(judged, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    run, cfg = judged
    pair.run(run, cfg, 0, show_progress=False)
    path = artifacts.list_parts(run / "iter-000" / "pair")[0]
    dataset = Dataset(pq.read_table(path))  # the file as written, sipt's own columns included
    assert dataset.num_rows >= 2
    policy = run / "iter-000" / "policy"
    tok = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy)
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, per_device_train_batch_size=2,
                     report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", max_length=256,
                     dataset_num_proc=None, seed=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
    before = {k: v.clone() for k, v in model.named_parameters()}
    out = trainer.train()
    assert out.global_step == 1
    assert any(not (before[k] == v).all() for k, v in model.named_parameters())

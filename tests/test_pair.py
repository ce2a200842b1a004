import shutil

import pyarrow.parquet as pq
import pytest
from conftest import require
from transformers import AutoTokenizer

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

    eos = AutoTokenizer.from_pretrained(run / "iter-000" / "policy").eos_token_id

    def ids(source, sid, idx):
        """The candidate's exact policy tokens and whether it was cut: a rollout that did not stop at
        EOS; the suffix (and an uncut rewrite of it) unless its document ends there, then with EOS."""
        s = samples[sid]
        ends = s["split_token"] + len(s["suffix_ids"]) == s["doc_tokens"]
        if source == "rollout":
            r = rollouts[(sid, idx)]
            return r["token_ids"], r["finish_reason"] == "length"
        if source == "suffix":
            return s["suffix_ids"] + [eos] * ends, not ends
        cut = rewrites[sid]["truncated"] or not ends
        return rewrites[sid]["rewrite_ids"] + [eos] * (not cut), cut

    ended = {"suffix": 0, "rewrite": 0, "rollout": 0}
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
            expected, truncated = ids(src, row["sample_id"], idx)
            assert row[f"{side}_ids"] == expected  # never re-tokenized
            assert row[f"{side}_truncated"] is truncated
            ended[src] += not truncated
    assert ended["suffix"] + ended["rewrite"] > 0  # this run pairs a candidate that ends its document
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
    # every prefix's rollouts tie: no pair, and no rate (None, never a made-up 0 or 100%)
    assert ties == 12 and m["stats"]["skipped_ties"] == 12 and m["stats"]["pairs"] == 0
    assert m["stats"]["rollout_chosen_rate"] is None and m["rows"] == 0


def test_pair_needs_the_judge(world_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world_run, run, ignore=shutil.ignore_patterns("world"))
    with pytest.raises(SiptError, match="input 'judge' .* missing or unfinished; run the stage"):
        pair.run(run, config_mod.resolve(run), 0, show_progress=False)


def test_trl_recipe_trains_on_exactly_the_tokens_sipt_trains_on(judged, tmp_path):
    """The README's TRL recipe: token ids from the pairs file (not re-tokenized text), the prompt
    built as sipt builds it, and no EOS appended, so EOS ends a continuation only where it ended."""
    require("trl")
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from sipt.samples import policy_prompt, tokenizer_bos
    from stages.train import build_batch

    run, cfg = judged
    pair.run(run, cfg, 0, show_progress=False)
    policy = run / "iter-000" / "policy"
    tok = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy)

    # -- the recipe, as in the README
    parts = [str(p) for p in artifacts.list_parts(run / "iter-000" / "pair")]
    bos = tokenizer_bos(tok)
    pairs = datasets.Dataset.from_parquet(parts)
    pairs = pairs.map(lambda r: {"prompt_ids": policy_prompt(r["prefix_ids"], r["prefix_start"], bos, 1 << 30)[0]})
    pairs = pairs.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])

    class IdsDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # already token ids: no re-tokenizing, no EOS appended

    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_length=None, precompute_ref_log_probs=True,
                     max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3, report_to=[], use_cpu=True,
                     save_strategy="no", disable_tqdm=True, seed=0)
    trainer = IdsDPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tok)
    # --

    rows = pq.read_table(parts).to_pylist()
    assert len(rows) == trainer.train_dataset.num_rows >= 2
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])  # what TRL trains on
    eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else 0
    seen = {True: 0, False: 0}
    for i, row in enumerate(rows):
        for side, k in (("chosen", i), ("rejected", len(rows) + i)):
            trl_seq = batch["input_ids"][k][batch["attention_mask"][k].bool()].tolist()
            trl_cont = batch["input_ids"][k][batch["completion_mask"][k].bool()].tolist()
            ours = build_batch([row], f"{side}_ids", bos, pad, 1 << 30, "cpu")  # sipt train's own batch
            assert trl_seq == ours["input_ids"][0][ours["attention_mask"][0].bool()].tolist()
            assert trl_cont == ours["input_ids"][0][ours["loss_mask"][0].bool()].tolist() == row[f"{side}_ids"]
            truncated = row[f"{side}_truncated"]
            assert (trl_cont[-1] == eos) is (not truncated) and eos not in trl_cont[:-1]
            seen[truncated] += 1
    assert seen[True] > 0 and seen[False] > 0  # both kinds of ending are checked
    assert batch["ref_chosen_logps"].shape == (len(rows),)  # the reference pass ran on these sequences
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert trainer.train().global_step == 1
    assert any(not torch.equal(before[k], v) for k, v in model.named_parameters())

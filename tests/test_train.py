import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM

from sipt import artifacts, config as config_mod
from sipt.errors import SiptError, StageInterrupted
from sipt.losses import dpo_loss, nll_loss, sequence_logps
from stages import rollout, shard, train

PAIR_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
    ("prefix_ids", pa.list_(pa.int32())), ("prefix_start", pa.int32()),
    ("chosen_ids", pa.list_(pa.int32())), ("rejected_ids", pa.list_(pa.int32())),
    ("chosen_source", pa.string()), ("rejected_source", pa.string()),
    ("chosen_rollout_idx", pa.int32()), ("rejected_rollout_idx", pa.int32()),
])


def write_pairs(run, iteration, cfg, rows=None):
    """Pairs as the pair stage writes them: here chosen = the suffix, rejected = rollout 0."""
    if rows is None:
        samples = artifacts.read_table(run / "samples").to_pylist()[: cfg.run.prompts_per_iter]
        rolls = {r["sample_id"]: r for r in artifacts.read_table(run / f"iter-{iteration:03d}" / "rollout").to_pylist()
                 if r["rollout_idx"] == 0}
        rows = [{"sample_id": s["sample_id"], "prompt": s["prefix_text"], "chosen": s["suffix_text"],
                 "rejected": rolls[s["sample_id"]]["text"], "prefix_ids": s["prefix_ids"],
                 "prefix_start": s["prefix_start"], "chosen_ids": s["suffix_ids"],
                 "rejected_ids": rolls[s["sample_id"]]["token_ids"], "chosen_source": "suffix",
                 "rejected_source": "rollout", "chosen_rollout_idx": -1, "rejected_rollout_idx": 0} for s in samples]
    stage = artifacts.Stage(run_dir=run, name="pair", out=artifacts.stage_dir(run, "pair", iteration),
                            config_hash=cfg.hash([]), config_sections=[], inputs={}, iteration=iteration, force=True)
    with stage:
        stage.write_part(0, pa.Table.from_pylist(rows, schema=PAIR_SCHEMA))
        stage.commit()


@pytest.fixture
def paired(run_with_policy, corpus_dir):
    run = run_with_policy
    cfg = config_mod.resolve(run, overrides={
        "data.inputs": [str(corpus_dir)], "data.suffix_tokens": 12, "data.max_prefix_tokens": 32,
        "run.prompts_per_iter": 16, "run.iterations": 2, "rollout.n": 1, "rollout.prompts_per_part": 16,
        "train.batch_size": 8, "train.micro_batch_size": 4, "train.lr": 1e-3, "train.warmup_steps": 1,
        "train.epochs": 3, "train.beta": 0.5, "model.vocab_size": 512,  # the fixture policy's: status shows it done
    }, force=True)
    shard.run(run, cfg, show_progress=False)
    rollout.run(run, cfg, 0, show_progress=False)
    write_pairs(run, 0, cfg)
    return run, cfg


def test_losses():
    z = torch.zeros(3)
    loss, c, r = dpo_loss(z, z, z, z, beta=0.1)
    assert float(loss) == pytest.approx(math.log(2))
    loss_good, _, _ = dpo_loss(torch.tensor([0.0]), torch.tensor([-5.0]), torch.tensor([-1.0]), torch.tensor([-1.0]), 1.0)
    assert float(loss_good) < math.log(2)
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(sequence_logps(logits, ids, mask), (lp * mask[:, 1:]).sum(-1))
    assert float(nll_loss(logits, ids, mask)) == pytest.approx(float(-(lp * mask[:, 1:]).sum() / 5), rel=1e-5)
    sched = train.lr_lambda(2, 10, 0.1)
    assert [round(sched(s), 3) for s in (0, 1, 2, 10, 50)] == [0.5, 1.0, 1.0, 0.1, 0.1]


def test_dpo_learns_the_preference_and_writes_the_next_policy(paired):
    run, cfg = paired
    m = train.run(run, cfg, 0, show_progress=False)
    assert m["stats"]["steps"] == 6 and m["rows"] == 16
    log = [json.loads(l) for l in (run / "iter-000" / "train" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["acc"] > 0.5 and log[-1]["margin"] > log[0]["margin"]
    assert (run / "iter-000" / "train" / "ref_logps.parquet").exists()
    new = run / "iter-001" / "policy"
    assert artifacts.read_manifest(new)["stage"] == "publish"
    old_m = AutoModelForCausalLM.from_pretrained(run / "iter-000" / "policy")
    new_m = AutoModelForCausalLM.from_pretrained(new)
    batch_c = train.build_batch(train.load_examples(run, cfg, 0), "chosen_ids", None, 1, 2048, "cpu")
    batch_r = train.build_batch(train.load_examples(run, cfg, 0), "rejected_ids", None, 1, 2048, "cpu")
    with torch.no_grad():
        gap_old = (train.forward_logps(old_m, batch_c) - train.forward_logps(old_m, batch_r)).mean()
        gap_new = (train.forward_logps(new_m, batch_c) - train.forward_logps(new_m, batch_r)).mean()
    assert gap_new > gap_old + 1.0
    assert train.run(run, cfg, 0, show_progress=False) == {**m, "skipped": True}  # done: skipped
    rows = {(r["iteration"], r["stage"]): r["state"] for r in artifacts.run_status(run, cfg.hash)}
    assert rows[(0, "train")] == "done" and rows[(1, "policy")] == "done"


def test_reference_logprobs_of_rollouts_are_reused_exactly(paired):
    run, cfg = paired
    train.run(run, cfg, 0, show_progress=False)
    reused = artifacts.read_table(run / "iter-000" / "train", prefix="ref_logps")
    meta = artifacts.part_stats(run / "iter-000" / "train" / "ref_logps.parquet")
    assert meta == {"computed": 16, "from_rollouts": 16}
    cfg = config_mod.resolve(run, overrides={"train.reuse_rollout_logprobs": False}, force=True)
    train.run(run, cfg, 0, show_progress=False)
    computed = artifacts.read_table(run / "iter-000" / "train", prefix="ref_logps")
    assert artifacts.part_stats(run / "iter-000" / "train" / "ref_logps.parquet") == {"computed": 32, "from_rollouts": 0}
    a, b = reused["ref_rejected"].to_pylist(), computed["ref_rejected"].to_pylist()
    # fp32 on CPU: the same numbers up to float noise. In bf16 on a GPU the engine's cached decoding
    # and train's full forward round differently: up to 0.021 nats per rollout, measured on an H200
    assert max(abs(x - y) for x, y in zip(a, b)) < (0.05 if torch.cuda.is_available() else 2e-3)
    assert reused["ref_chosen"].to_pylist() == pytest.approx(computed["ref_chosen"].to_pylist(), abs=1e-4)


def test_optimizer_and_schedule_continue_into_the_next_iteration(paired):
    run, cfg = paired
    m0 = train.run(run, cfg, 0, show_progress=False)
    rollout.run(run, cfg, 1, show_progress=False)
    write_pairs(run, 1, cfg, rows=artifacts.read_table(run / "iter-000" / "pair").to_pylist())
    m1 = train.run(run, cfg, 1, show_progress=False)
    assert m1["stats"]["global_step"] == m0["stats"]["global_step"] + m1["stats"]["steps"] == 12
    state = torch.load(run / "iter-001" / "train" / "state.pt", weights_only=False)
    assert state["scheduler"]["last_epoch"] == 12
    assert m1["inputs"]["previous"]["ref"] == "iter-000/train"
    total = cfg.run.iterations * train.steps_per_iteration(cfg)
    assert m1["stats"]["lr"] == pytest.approx(cfg.train.lr * train.lr_lambda(1, total, 0.1)(12))


@pytest.mark.parametrize("objective", ["rf-nll", "ntp"])
def test_nll_objectives_lower_their_loss(paired, objective):
    run, cfg = paired
    cfg = config_mod.resolve(run, overrides={"train.objective": objective}, force=True)
    m = train.run(run, cfg, 0, show_progress=False)
    log = [json.loads(l) for l in (run / "iter-000" / "train" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    assert m["stats"]["objective"] == objective
    assert (run / "iter-001" / "policy" / "model.safetensors").exists()


def test_ntp_trains_on_whole_documents_or_on_samples(paired):
    """ntp_span = document: prefix + suffix + the rest of the document and EOS (plain pretraining);
    sample: prefix + suffix only. The shard's rest_ids is the document after the suffix."""
    from stages.train import load_examples

    from conftest import make_docs
    from transformers import AutoTokenizer

    run, cfg = paired
    samples = artifacts.read_table(run / "samples").to_pylist()
    docs = make_docs(300, seed=1)  # the corpus_dir fixture's documents; doc ids are "<source>:<row>"
    tok = AutoTokenizer.from_pretrained(run / "iter-000" / "policy")
    for r in samples[:20]:
        ids = tok(docs[int(r["doc_id"].rsplit(":", 1)[1])], add_special_tokens=False).input_ids
        s = r["prefix_start"] + len(r["prefix_ids"]) + len(r["suffix_ids"])
        ends = s + cfg.data.max_prefix_tokens >= len(ids)  # the document ends: EOS follows it
        assert r["rest_ids"] == ids[s : s + cfg.data.max_prefix_tokens] + [tok.eos_token_id] * ends
    assert any(r["rest_ids"] for r in samples)
    assert any(r["rest_ids"][-1:] == [tok.eos_token_id] for r in samples)  # whole documents end with EOS
    part = {e["sample_id"]: e["chosen_ids"] for e in
            load_examples(run, config_mod.resolve(run, overrides={"train.ntp_span": "sample", "train.objective": "ntp"},
                                                   force=True), 0)}
    cfg_ntp = config_mod.resolve(run, overrides={"train.ntp_span": "document", "train.objective": "ntp"}, force=True)
    whole = {e["sample_id"]: e["chosen_ids"] for e in load_examples(run, cfg_ntp, 0)}
    by_id = {r["sample_id"]: r for r in samples}
    for sid, seq in whole.items():
        r = by_id[sid]
        assert seq == r["prefix_ids"] + r["suffix_ids"] + r["rest_ids"]
        assert part[sid] == r["prefix_ids"] + r["suffix_ids"]
    assert any(len(whole[k]) > len(part[k]) for k in whole)


def test_empty_pairs_is_a_clear_error_and_no_policy(paired):
    run, cfg = paired
    write_pairs(run, 0, cfg, rows=[])
    with pytest.raises(SiptError, match="no pairs to train on"):
        train.run(run, cfg, 0, show_progress=False)
    assert not (run / "iter-001" / "policy").exists()


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(paired):
    run, cfg = paired
    cfg = config_mod.resolve(run, overrides={"train.lr": 1e30, "train.warmup_steps": 0, "train.checkpoint_every": 1,
                                             "train.max_grad_norm": 0.0}, force=True)
    with pytest.raises(StageInterrupted, match=r"non-finite loss .* at step \d+ .*checkpoint \(step \d+\) is kept"):
        train.run(run, cfg, 0, show_progress=False)
    assert (run / "iter-000" / ".train.tmp" / "checkpoint.pt").exists()
    assert not (run / "iter-001" / "policy").exists()
    assert {r["stage"]: r["state"] for r in artifacts.run_status(run) if r["iteration"] == 0}["train"] == "failed"


def crash_train_in_step_4(run, cfg, monkeypatch):
    """Run iteration 0's train until it raises in optimizer step 4 (after the checkpoint at step 2,
    with checkpoint_every = 2 and 2 micro-batches a step); returns the real `train._loss`."""
    calls = {"n": 0}
    real_loss = train._loss

    def crash_in_step_4(*args, **kwargs):  # 2 micro-batches a step: the 7th call is step 4's
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("killed")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train, "_loss", crash_in_step_4)
    with pytest.raises(RuntimeError, match="killed"):
        train.run(run, cfg, 0, show_progress=False)
    return real_loss


def test_resumed_train_logs_every_step_once(paired, monkeypatch):
    run, cfg = paired
    cfg = config_mod.resolve(run, overrides={"train.checkpoint_every": 2, "train.epochs": 2}, force=True)
    real_loss = crash_train_in_step_4(run, cfg, monkeypatch)
    log = run / "iter-000" / ".train.tmp" / "log.jsonl"
    assert [json.loads(l)["iter_step"] for l in log.read_text().splitlines()] == [1, 2, 3]  # checkpoint: step 2
    with log.open("a") as fh:
        fh.write('{"step": 4, "iter_st')  # a line cut by the kill
    monkeypatch.setattr(train, "_loss", real_loss)
    manifest = train.run(run, cfg, 0, show_progress=False)
    steps = [json.loads(l)["iter_step"] for l in (run / "iter-000" / "train" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, manifest["stats"]["steps"] + 1))


def test_policy_with_another_tokenizer_is_refused(paired, tmp_path):
    from stages import init

    run, cfg = paired
    other = tmp_path / "other"
    init.run(other, config_mod.resolve(other, overrides={"data.inputs": cfg.data.inputs, "model.vocab_size": 300}))
    shutil.copytree(other / "iter-000" / "policy", run / "iter-001" / "policy")
    write_pairs(run, 1, cfg, rows=artifacts.read_table(run / "iter-000" / "pair").to_pylist())
    with pytest.raises(SiptError, match=r"has 300 tokens, the samples were made with 512"):
        train.run(run, cfg, 1, show_progress=False)
    assert not (run / "iter-002" / "policy").exists()


@pytest.mark.slow
def test_killed_train_resumes_to_the_same_policy(paired, tmp_path):
    run, cfg = paired
    cfg = config_mod.resolve(run, overrides={"train.checkpoint_every": 1, "train.epochs": 8, "train.lr": 3e-4}, force=True)
    clean = tmp_path / "clean"
    shutil.copytree(run, clean)
    cmd = [sys.executable, "-m", "sipt.cli", "train", "--run", str(run), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = run / "iter-000" / ".train.tmp" / "checkpoint.json"
    deadline = time.time() + 300
    while time.time() < deadline and not (marker.exists() and json.loads(marker.read_text())["step"] >= 3):
        assert proc.poll() is None
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "iter-001" / "policy").exists()
    subprocess.run(cmd, check=True, capture_output=True)
    subprocess.run([*cmd[:5], str(clean), "--no-progress"], check=True, capture_output=True)
    a = AutoModelForCausalLM.from_pretrained(run / "iter-001" / "policy").state_dict()
    b = AutoModelForCausalLM.from_pretrained(clean / "iter-001" / "policy").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_torchrun_two_processes_matches_one(paired, tmp_path, fsdp):
    run, cfg = paired
    # lr 1e-3: every weight moves by about lr per Adam step, far beyond float noise. Adam also turns
    # rounding noise in a near-zero gradient into an lr-sized step of either sign, so the runs are
    # compared by the norm of their difference against the norm of the update, not weight by weight.
    cfg = config_mod.resolve(run, overrides={"train.epochs": 1, "train.lr": 1e-3, "train.device": "cpu"},
                             force=True)
    single = tmp_path / "single"
    shutil.copytree(run, single)
    train.run(single, cfg, 0, show_progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "--", "sipt.cli", "train", "--run", str(run), "--no-progress",
                           "--set", f"train.fsdp={str(fsdp).lower()}", "--set", 'train.device="cpu"'],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = artifacts.read_manifest(run / "iter-000" / "train")
    assert m["stats"]["processes"] == 2 and m["stats"]["sharding"] == ("fsdp" if fsdp else "ddp")
    assert m["stats"]["dropped_examples"] == m["stats"]["repeated_examples"] == 0  # 16 pairs in batches of 8
    losses = [[json.loads(l)["loss"] for l in (r / "iter-000" / "train" / "log.jsonl").read_text().splitlines()]
              for r in (run, single)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)  # the same batches, the same loss
    init = AutoModelForCausalLM.from_pretrained(run / "iter-000" / "policy").state_dict()
    a = AutoModelForCausalLM.from_pretrained(run / "iter-001" / "policy").state_dict()
    b = AutoModelForCausalLM.from_pretrained(single / "iter-001" / "policy").state_dict()
    flat = lambda sd: torch.cat([sd[k].flatten().float() for k in sorted(sd)])  # noqa: E731
    moved, apart = (flat(b) - flat(init)).norm(), (flat(a) - flat(b)).norm()
    assert (flat(a) - flat(init)).abs().max() > 5e-4 and (flat(b) - flat(init)).abs().max() > 5e-4  # both stepped
    assert apart < 1e-3 * moved, (float(apart), float(moved))  # and took the same steps


def test_a_batch_is_cut_to_an_equal_share_per_process_and_the_cut_is_counted(paired):
    assert train._rank_batch(list(range(7)), 2) == list(range(6))  # the 7th waits for the next epoch
    assert train._rank_batch(list(range(8)), 2) == list(range(8))
    assert train._rank_batch([5], 2) == [5, 5]  # every process must take the step
    assert train._rank_batch(list(range(7)), 1) == list(range(7))
    run, cfg = paired  # one process: nothing is cut
    m = train.run(run, config_mod.resolve(run, overrides={"train.batch_size": 6}, force=True), 0, show_progress=False)
    assert m["stats"]["dropped_examples"] == m["stats"]["repeated_examples"] == 0


def test_stage_open_fail_commit_without_a_with_block(tmp_path):
    """The explicit lifecycle train uses (the main process opens, every process works, the main one
    commits or fails): open holds the lock, fail and commit release it."""
    def stage():
        return artifacts.Stage(run_dir=tmp_path, name="s", out=tmp_path / "iter-000" / "s", config_hash="h",
                               config_sections=[], inputs={}, iteration=0)

    st = stage().open()
    assert not st.skipped and artifacts.lock_holder(tmp_path, st.out) is not None
    st.write_part(0, pa.table({"x": [1]}))
    try:
        raise RuntimeError("crashed")
    except RuntimeError as e:
        st.fail(e)  # a crash keeps the parts and says why
    assert artifacts.lock_holder(tmp_path, st.out) is None
    assert json.loads((st.tmp / artifacts.FAILED).read_text())["error"] == "RuntimeError: crashed"
    st = stage().open()  # resumes the part
    assert st.has_part(0) and not (st.tmp / artifacts.FAILED).exists()
    st.fail(SiptError("bad input"))  # bad input: nothing half-written stays
    assert not st.tmp.exists() and not (tmp_path / "iter-000").exists()
    st = stage().open()
    st.write_part(0, pa.table({"x": [1, 2]}))
    assert st.commit()["rows"] == 2 and artifacts.lock_holder(tmp_path, st.out) is None
    assert stage().open().skipped


def test_more_training_processes_than_gpus_is_a_clear_error(monkeypatch):
    """Seen on a 1-GPU machine: 2 processes under torchrun, rank 1 asked for cuda:1 and died with CUDA's
    "invalid device ordinal". Now each process (and the loop, before it starts them) says what to set."""
    from sipt.training import process_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert process_device("auto", 0, 2) == torch.device("cuda:0")
    assert process_device("cuda", 0, 1) == torch.device("cuda:0")
    assert process_device("cpu", 1, 2) == torch.device("cpu")  # gloo processes on CPU: any number
    with pytest.raises(SiptError, match=r"2 training processes on this node need 2 GPUs, but torch sees 1: set "
                                        r"train.nproc_per_node .* at most 1, or train.device = 'cpu'"):
        process_device("auto", 1, 2)
    with pytest.raises(SiptError, match="torch sees 1"):
        process_device("cuda:3", 0, 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert process_device("auto", 1, 2) == torch.device("cpu")
    with pytest.raises(SiptError, match="torch sees no GPU"):
        process_device("cuda", 0, 1)


def test_chosen_nll_weight_adds_the_chosen_nll_to_the_dpo_loss(paired):
    run, cfg = paired
    model = AutoModelForCausalLM.from_pretrained(run / "iter-000" / "policy")
    chunk = [dict(ex, ref_chosen=-20.0, ref_rejected=-25.0) for ex in train.load_examples(run, cfg, 0)[:4]]
    plain, stats = train._loss(model, chunk, cfg.train, None, 1, 2048, "cpu")
    t = dataclasses.replace(cfg.train, chosen_nll_weight=0.5)
    mixed, mstats = train._loss(model, chunk, t, None, 1, 2048, "cpu")
    nll = nll_loss(*train.forward_tail(model, train.build_batch(chunk, "chosen_ids", None, 1, 2048, "cpu")))
    assert float(mixed) == pytest.approx(float(plain) + 0.5 * float(nll), rel=1e-4)
    assert mstats["margin"] == pytest.approx(stats["margin"], rel=1e-5) and mstats["loss"] == pytest.approx(float(mixed))
    m = train.run(run, config_mod.resolve(run, overrides={"train.chosen_nll_weight": 0.5}), 0, show_progress=False)
    assert m["stats"]["steps"] == 6  # trains end to end with the term


def test_length_grouped_batches_keep_every_example_once_and_cut_padding():
    import random

    from stages.train import length_grouped

    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(1000)]
    idx = list(range(1000))
    random.Random(1).shuffle(idx)

    def padded(order, batch=32):  # tokens the batches pad to, summed
        return sum(max(lengths[i] for i in order[k:k + batch]) * len(order[k:k + batch]) for k in range(0, len(order), batch))

    grouped = length_grouped(idx, lengths, 32, 10, random.Random(2))
    assert sorted(grouped) == sorted(idx) and len(grouped) == len(idx)  # every example exactly once
    assert grouped == length_grouped(idx, lengths, 32, 10, random.Random(2))  # seeded: a resumed run, the same
    assert padded(grouped) < 0.7 * padded(idx)  # far less padding than plain shuffled batches
    assert grouped[-(1000 % 32):] == sorted(idx[960:], key=lambda i: -lengths[i])[-8:]  # the small batch stays last
    firsts = [lengths[grouped[k]] for k in range(0, 960, 32)]
    assert firsts != sorted(firsts, reverse=True)  # the batches are shuffled, not served longest first


def test_group_by_length_trains_on_the_same_examples(paired):
    run, cfg = paired
    cfg = config_mod.resolve(run, overrides={"train.objective": "ntp", "train.group_by_length": 2}, force=True)
    m = train.run(run, cfg, 0, show_progress=False)
    log = [json.loads(l) for l in (run / "iter-000" / "train" / "log.jsonl").read_text().splitlines()]
    assert m["stats"]["steps"] == 6 and log[-1]["loss"] < log[0]["loss"]  # 16 documents x 3 epochs / 8
    assert config_mod.resolve(run, overrides={"train.group_by_length": 0}, force=True).hash(["train"]) != cfg.hash(["train"])

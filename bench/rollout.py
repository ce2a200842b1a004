"""bench/rollout: generated tokens/s of the rollout stage against naive and raw-engine baselines.

One run, one table, 64 prefixes x 16 rollouts x 128 tokens on the tiny policy:
  (a) a naive loop of one `model.generate` call per prefix (num_return_sequences=16)
  (b) `sipt rollout --engine hf`
  (c) raw `vllm.LLM.generate` on the same token-id prompts
  (d) `sipt rollout --engine vllm`
Each column runs in its own process (vLLM lives in .venv-vllm); tokens/s counts generation and,
for the stages, reading the samples and writing Parquet, but not starting or stopping the engine
(start-up reported apart). Peak memory is the
process's maximum resident set size. Targets: (b) >= 2 x (a); (d) >= 0.85 x (c).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PREFIXES, N, NEW_TOKENS = 64, 16, 128


def prepare(work: Path) -> Path:
    """A tiny policy and 64 samples (128-token suffixes) in a run folder."""
    sys.path.insert(0, str(ROOT / "bench"))
    from shard import prepare_run

    run, _ = prepare_run(work, {
        "data.suffix_tokens": NEW_TOKENS, "data.max_prefix_tokens": 256, "run.prompts_per_iter": PREFIXES,
        "rollout.n": N, "rollout.prompts_per_part": PREFIXES, "rollout.stop_at_eos": False,
        "rollout.batch_size": 256, "rollout.max_model_len": 1024,
    })
    return run


def prompts(run: Path) -> list[list[int]]:
    from sipt.samples import iteration_samples

    t, _ = iteration_samples(run, 0, PREFIXES, columns=["prefix_ids"])
    return t["prefix_ids"].to_pylist()


def worker(kind: str, run: Path) -> dict:
    """Run one column in this process; returns seconds, tokens and load time."""
    policy = run / "iter-000" / "policy"
    t0 = time.perf_counter()
    if kind == "naive":
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(policy).eval()
        load = time.perf_counter() - t0
        torch.manual_seed(0)
        t1 = time.perf_counter()
        tokens = 0
        with torch.inference_mode():
            for p in prompts(run):
                out = model.generate(torch.tensor([p]), do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                     max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                     num_return_sequences=N, pad_token_id=model.config.pad_token_id)
                tokens += (out.shape[1] - len(p)) * N
        return {"seconds": time.perf_counter() - t1, "tokens": tokens, "load": load}
    if kind == "vllm-raw":
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        llm = LLM(model=str(policy), dtype="float32", seed=0, max_model_len=1024,
                  kv_cache_memory_bytes=256 << 20, enforce_eager=True, enable_chunked_prefill=False)
        load = time.perf_counter() - t0
        ps = [TokensPrompt(prompt_token_ids=p) for p in prompts(run)]
        params = [SamplingParams(n=N, temperature=1.0, max_tokens=NEW_TOKENS, seed=k, logprobs=0, ignore_eos=True)
                  for k in range(len(ps))]
        t1 = time.perf_counter()
        outs = llm.generate(ps, params, use_tqdm=False)
        seconds = time.perf_counter() - t1
        tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        llm.llm_engine.engine_core.shutdown()
        return {"seconds": seconds, "tokens": tokens, "load": load}
    # the stage, hf or vllm: its wall time less the engine's construction (in its stats)
    from sipt import config as config_mod
    from stages import rollout

    cfg = config_mod.resolve(run, overrides={"rollout.engine": kind.split("-")[1]}, force=True)
    t1 = time.perf_counter()
    m = rollout.run(run, cfg, 0, force=True, show_progress=False)
    load = m["stats"]["engine_load_s"] + m["stats"]["engine_close_s"]  # start-up and shut-down, as for (c)
    return {"seconds": time.perf_counter() - t1 - load, "tokens": m["stats"]["tokens"], "load": load}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--skip", default="", help="comma-separated columns to skip (naive, sipt-hf, vllm-raw, sipt-vllm)")
    args = ap.parse_args()
    if args.worker:
        res = worker(args.worker, Path(args.run))
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        res["peak_rss_mb"] = max(res["peak_rss_mb"], kids)  # vLLM's engine core is a child process
        print("RESULT " + json.dumps(res))
        return

    from rich.console import Console
    from rich.table import Table

    work = Path(tempfile.mkdtemp(prefix="sipt-bench-rollout-"))
    try:
        run = prepare(work)
        columns = [("naive", "(a) naive model.generate per prefix", sys.executable),
                   ("sipt-hf", "(b) sipt rollout --engine hf", sys.executable),
                   ("vllm-raw", "(c) raw vllm.LLM.generate", args.vllm_python),
                   ("sipt-vllm", "(d) sipt rollout --engine vllm", args.vllm_python)]
        results = {}
        for key, label, python in columns:
            if key in args.skip.split(",") or not Path(python).exists():
                continue
            proc = subprocess.run([python, __file__, "--worker", key, "--run", str(run)],
                                  capture_output=True, text=True, env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                print(f"{label}: failed\n{proc.stderr[-3000:]}")
                continue
            results[key] = json.loads(line[7:])
        table = Table(title=f"bench/rollout: {PREFIXES} prefixes x {N} rollouts x {NEW_TOKENS} tokens, tiny policy")
        for col in ("what", "gen s", "tokens/s", "load s", "peak RSS MB", "vs baseline"):
            table.add_column(col, justify="left" if col == "what" else "right")
        base = {"sipt-hf": "naive", "sipt-vllm": "vllm-raw"}
        for key, label, _ in columns:
            r = results.get(key)
            if not r:
                table.add_row(label, "-", "-", "-", "-", "not run")
                continue
            tps = r["tokens"] / r["seconds"]
            ratio = ""
            if key in base and base[key] in results:
                b = results[base[key]]
                ratio = f"{tps / (b['tokens'] / b['seconds']):.2f} x {base[key]}"
            table.add_row(label, f"{r['seconds']:.1f}", f"{tps:,.0f}", f"{r['load']:.1f}", f"{r['peak_rss_mb']:,.0f}", ratio)
        Console().print(table)
        print("targets: (b) >= 2 x (a); (d) >= 0.85 x (c)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

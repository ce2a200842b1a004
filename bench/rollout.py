"""bench/rollout: generated tokens/s of the rollout stage against the strongest transformers and vLLM baselines.

One run, one table, every column measured side by side: 64 prefixes x 16 rollouts x 128 tokens on
the tiny policy (`--quick`: 8 x 4 x 16), the same token-id prompts (the policy's prompts, as the
stage builds them) and sampling (temperature 1, no top-p/top-k, no early stop):
  (a) naive: one `model.generate` call per prefix (num_return_sequences=16), for reference
  (b) batched `model.generate` with a static KV cache (`cache_implementation="static"`), as many
      sequences per batch as sipt's hf engine (`rollout.batch_size`), prompts sorted by length on
      CPU; on GPU, where transformers compiles a static-cache generate, all prompts padded to one
      width so one compiled graph serves every batch. One warm-up batch is not timed.
  (c) `sipt rollout --engine hf`                  target >= 1.5 x (b)
  (d) raw `vllm.LLM.generate`, detokenize=False, the engine settings of sipt's vllm engine
  (e) `sipt rollout --engine vllm` (vLLM detokenize=False too; sipt decodes the texts in one batch)
                                                  target >= 0.95 x (d)
Each run of a column is its own process (vLLM lives in .venv-vllm); columns take turns,
`--repeats` times (median, min, max). tokens/s counts generation and, for the stages, reading the
samples and writing Parquet, but not starting or stopping the engine (start-up reported apart).
Peak memory is the process's (and its children's) maximum resident set size.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {"full": (64, 16, 128), "quick": (8, 4, 16)}  # prefixes, rollouts per prefix, new tokens
BATCH = 256  # sequences per forward batch: sipt's rollout.batch_size here, and (b)'s batch


def prepare(work: Path, prefixes: int, n: int, new_tokens: int) -> Path:
    """A tiny policy and its samples (suffixes of `new_tokens` tokens) in a run folder."""
    sys.path.insert(0, str(ROOT / "bench"))
    from shard import prepare_run

    run, _ = prepare_run(work, {
        "data.suffix_tokens": new_tokens, "data.max_prefix_tokens": 256, "run.prompts_per_iter": prefixes,
        "rollout.n": n, "rollout.prompts_per_part": prefixes, "rollout.stop_at_eos": False,
        "rollout.batch_size": BATCH, "rollout.max_model_len": 1024,
    })
    return run


def prompts(run: Path, cfg) -> list[list[int]]:
    """The token ids the rollout stage gives the policy (BOS where a prefix starts its document)."""
    from transformers import AutoTokenizer

    from sipt.samples import iteration_samples, policy_prompt, tokenizer_bos

    bos = tokenizer_bos(AutoTokenizer.from_pretrained(run / "iter-000" / "policy"))
    t, _ = iteration_samples(run, 0, cfg.run.prompts_per_iter, columns=["prefix_ids", "prefix_start"])
    return [policy_prompt(r["prefix_ids"], r["prefix_start"], bos, 1 << 30)[0] for r in t.to_pylist()]


def _hf_generate(run: Path, cfg, kind: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from sipt.engines.hf import pick_device, pick_dtype

    r = cfg.rollout
    n, new = r.n, cfg.data.suffix_tokens
    device = pick_device(r.device)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(run / "iter-000" / "policy", dtype=pick_dtype(r.dtype, device))
    model = model.to(device).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    sampling = dict(do_sample=True, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, pad_token_id=pad,
                    num_return_sequences=n)
    ps = prompts(run, cfg)
    compiled, width = False, None
    if kind == "naive":
        load = time.perf_counter() - t0
        batches = [[p] for p in ps]
        static = {}
    else:  # batched, static cache
        per = max(1, r.batch_size // n)
        compiled = device.type == "cuda"  # transformers compiles a static-cache generate on GPUs
        ps = sorted(ps, key=len, reverse=True)
        width = max(map(len, ps)) if compiled else None
        batches = [ps[k : k + per] for k in range(0, len(ps), per)]
        static = {"cache_implementation": "static"}

    def run_batch(batch, max_new):
        w = width or max(map(len, batch))
        ids = torch.full((len(batch), w), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), w), dtype=torch.long)
        for i, p in enumerate(batch):
            ids[i, w - len(p) :], mask[i, w - len(p) :] = torch.tensor(p), 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new,
                             min_new_tokens=max_new, **sampling, **static)
        return (out.shape[1] - w) * out.shape[0]

    torch.manual_seed(0)
    with torch.inference_mode():
        if static:  # warm-up (on GPU: the compile) on the first batch, not timed
            run_batch(batches[0], new if compiled else 2)
            load = time.perf_counter() - t0
        t1 = time.perf_counter()
        tokens = sum(run_batch(b, new) for b in batches)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - t1, "tokens": tokens, "load": load}


def worker(kind: str, run: Path) -> dict:
    """Run one column in this process; returns seconds, tokens and load time."""
    from sipt import config as config_mod

    cfg = config_mod.resolve(run, force=True)
    if kind in ("naive", "hf-static"):
        return _hf_generate(run, cfg, kind)
    if kind == "vllm-raw":
        import torch
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        r = cfg.rollout
        t0 = time.perf_counter()
        kwargs = dict(model=str(run / "iter-000" / "policy"), seed=0, max_model_len=r.max_model_len or None)
        if torch.cuda.is_available():  # sipt's vllm engine's settings (sipt/engines/vllm.py)
            kwargs.update(dtype="auto", gpu_memory_utilization=r.gpu_memory_utilization)
        else:
            kwargs.update(dtype="float32", kv_cache_memory_bytes=(r.kv_cache_mb or 256) << 20, enforce_eager=True,
                          enable_chunked_prefill=False)
        llm = LLM(**kwargs)
        load = time.perf_counter() - t0
        ps = [TokensPrompt(prompt_token_ids=p) for p in prompts(run, cfg)]
        params = [SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k if r.top_k > 0 else -1,
                                 max_tokens=cfg.data.suffix_tokens, seed=k, logprobs=0, ignore_eos=True,
                                 detokenize=False) for k in range(len(ps))]
        t1 = time.perf_counter()
        outs = llm.generate(ps, params, use_tqdm=False)
        seconds = time.perf_counter() - t1
        tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        llm.llm_engine.engine_core.shutdown()
        return {"seconds": seconds, "tokens": tokens, "load": load}
    # the stage, hf or vllm: its wall time less the engine's construction (in its stats); the
    # libraries are imported first, as the baselines import them before their clocks start
    import transformers  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from stages import rollout

    engine = kind.split("-")[1]
    if engine == "vllm":
        import vllm  # noqa: F401
    cfg = config_mod.resolve(run, overrides={"rollout.engine": engine}, force=True)
    t1 = time.perf_counter()
    m = rollout.run(run, cfg, 0, force=True, show_progress=False)
    load = m["stats"]["engine_load_s"] + m["stats"]["engine_close_s"]  # start-up and shut-down, as for (d)
    return {"seconds": time.perf_counter() - t1 - load, "tokens": m["stats"]["tokens"], "load": load}


COLUMNS = [  # key, label, which python, anchor, target
    ("naive", "(a) naive model.generate per prefix", "main", None, None),
    ("hf-static", "(b) batched model.generate, static cache", "main", None, None),
    ("sipt-hf", "(c) sipt rollout --engine hf", "main", "hf-static", 1.5),
    ("vllm-raw", "(d) raw vllm.LLM.generate, detokenize=False", "vllm", None, None),
    ("sipt-vllm", "(e) sipt rollout --engine vllm", "vllm", "vllm-raw", 0.95),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"),
                    help="the Python of the environment with vLLM (columns d, e; skipped if it does not exist)")
    ap.add_argument("--skip", default="", help="comma-separated columns to skip (" +
                    ", ".join(c[0] for c in COLUMNS) + ")")
    ap.add_argument("--repeats", type=int, default=3, help="runs of every column (median, min, max; default 3)")
    ap.add_argument("--quick", action="store_true", help="a smoke test: %d prefixes x %d rollouts x %d tokens" %
                    SIZES["quick"])
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

    from _columns import run_column  # bench/, beside this script

    prefixes, n, new_tokens = SIZES["quick" if args.quick else "full"]
    pythons = {"main": sys.executable, "vllm": args.vllm_python}
    columns = [c for c in COLUMNS if c[0] not in args.skip.split(",")]
    skipped = [c for c in columns if not Path(pythons[c[2]]).exists()]
    for c in skipped:
        print(f"{c[1]}: not run ({pythons[c[2]]} does not exist; `make vllm-env` builds it)")
    columns = [c for c in columns if c not in skipped]
    work = Path(tempfile.mkdtemp(prefix="sipt-bench-rollout-"))
    try:
        run = prepare(work, prefixes, n, new_tokens)
        runs: dict[str, list[dict]] = {c[0]: [] for c in columns}
        failed: set[str] = set()
        for rep in range(args.repeats):  # columns take turns, so drift on the machine hits all of them
            for key, label, python, _, _ in columns:
                if key in failed:
                    continue
                r = run_column(pythons[python], __file__, key, run,
                               {"VLLM_LOGGING_LEVEL": "WARNING", "TQDM_DISABLE": "1"}, label, rep, args.repeats)
                if r is None:
                    failed.add(key)
                else:
                    runs[key].append(r)
        table = Table(title=f"bench/rollout: {prefixes} prefixes x {n} rollouts x {new_tokens} tokens, tiny policy, "
                            f"batch {BATCH} sequences, median of {args.repeats} runs [min, max]")
        for col in ("what", "gen s", "tokens/s", "start-up s", "peak RSS MB", "vs anchor (target)"):
            table.add_column(col, justify="left" if col == "what" else "right")
        median = {k: statistics.median(r["tps"] for r in v) for k, v in runs.items() if v}
        for key, label, _, anchor, target in COLUMNS:
            rs = runs.get(key)
            if not rs:
                table.add_row(label, "-", "-", "-", "-", "not run" if key not in failed else "failed")
                continue
            secs, tps = [r["seconds"] for r in rs], [r["tps"] for r in rs]
            ratio = f"{median[key] / median[anchor]:.2f} x {anchor} (>= {target:g})" if anchor in median else ""
            table.add_row(label, f"{statistics.median(secs):.2f} [{min(secs):.2f}, {max(secs):.2f}]",
                          f"{median[key]:,.0f} [{min(tps):,.0f}, {max(tps):,.0f}]",
                          f"{statistics.median(r['load'] for r in rs):.1f}",
                          f"{statistics.median(r['peak_rss_mb'] for r in rs):,.0f}", ratio)
        Console(width=200).print(table)
        print("targets: (c) >= 1.5 x (b), the strongest transformers baseline; (e) >= 0.95 x (d), both with vLLM's "
              "detokenization off. Ratios are of median tokens/s.")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

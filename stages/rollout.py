"""rollout: the iteration's policy writes `rollout.n` continuations of each of its prefixes.

Parts of `rollout.prompts_per_part` prefixes are generated and written one at a time, each seeded
by (run.seed, iteration, part), so a killed stage resumes and produces the same rows.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa

from sipt import artifacts
from sipt.config import Config
from sipt.engines import Sampling, make_engine
from sipt.errors import SiptError
from sipt.progress import progress_bar
from sipt.samples import derive_seed, iteration_samples, policy_prompt, tokenizer_bos

SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("rollout_idx", pa.int32()),
        ("token_ids", pa.list_(pa.int32())),
        ("text", pa.string()),
        ("logprob", pa.float32()),  # summed log-probability under the policy (temperature 1)
        ("finish_reason", pa.string()),  # "length" or "stop" (end of text)
        ("prompt_tokens", pa.int32()),
        ("prompt_truncated", pa.int32()),  # prefix tokens cut to fit the model's context
        ("error", pa.string()),  # non-empty: this row could not be generated (counted, never dropped)
    ]
)
SECTIONS = ["run.seed", "run.prompts_per_iter", "data.suffix_tokens", "rollout"]


def sampling(cfg: Config, seed: int) -> Sampling:
    r = cfg.rollout
    return Sampling(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                    max_new_tokens=r.max_new_tokens or cfg.data.suffix_tokens, seed=seed,
                    stop_at_eos=r.stop_at_eos)


def run(run_dir: Path, cfg: Config, iteration: int, *, force: bool = False, show_progress: bool = True) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    run_dir = Path(run_dir)
    r = cfg.rollout
    if r.engine == "oracle":
        raise SiptError("rollout.engine = 'oracle': the oracle only judges and rewrites; use hf, vllm or openai")
    if r.n < 1 or r.prompts_per_part < 1:
        raise SiptError("rollout.n and rollout.prompts_per_part must be >= 1")
    policy = artifacts.stage_dir(run_dir, "policy", iteration)
    stage = artifacts.Stage(
        run_dir=run_dir, name="rollout", out=artifacts.stage_dir(run_dir, "rollout", iteration),
        config_hash=cfg.hash(SECTIONS), config_sections=SECTIONS,
        inputs={"samples": "samples", "policy": f"iter-{iteration:03d}/policy"},
        iteration=iteration, force=force,
    )
    with stage:
        if stage.skipped:
            return stage.manifest
        tok = AutoTokenizer.from_pretrained(policy)
        context = int(getattr(AutoConfig.from_pretrained(policy), "max_position_embeddings", 0) or 1 << 30)
        s0 = sampling(cfg, 0)
        if context <= s0.max_new_tokens:
            raise SiptError(f"{policy}: context {context} leaves no room for {s0.max_new_tokens} new tokens")
        bos = tokenizer_bos(tok)
        start_id = bos if bos is not None else tok.eos_token_id
        samples, epoch = iteration_samples(run_dir, iteration, cfg.run.prompts_per_iter,
                                           columns=["sample_id", "prefix_ids", "prefix_start"])
        rows = samples.to_pylist()
        parts = [rows[k : k + r.prompts_per_part] for k in range(0, len(rows), r.prompts_per_part)]
        todo = [k for k in range(len(parts)) if not stage.has_part(k)]
        t_load = time.perf_counter()
        engine = make_engine(r, r.model or str(policy)) if todo else None
        t_load, t_close = time.perf_counter() - t_load, 0.0
        try:
            with progress_bar(f"rollout iter {iteration}", total=len(rows) * r.n, unit="rollouts",
                              enabled=show_progress) as bar:
                bar.advance(sum(len(parts[k]) for k in range(len(parts)) if k not in todo) * r.n)
                for k in todo:
                    prompts, truncated, empty = [], [], 0
                    for row in parts[k]:
                        ids, cut = policy_prompt(row["prefix_ids"], row["prefix_start"], bos,
                                                 context - s0.max_new_tokens)
                        if not ids:
                            ids, empty = [start_id], empty + 1
                        prompts.append(ids)
                        truncated.append(cut)
                    gens = engine.generate(prompts, sampling(cfg, derive_seed(cfg.run.seed, "rollout", iteration, k)))
                    table, stats = _table(parts[k], prompts, truncated, gens)
                    stats["empty_prefix"] = empty
                    stage.write_part(k, table, stats)
                    bar.advance(len(parts[k]) * r.n)
        finally:
            if engine is not None:
                t_close = time.perf_counter()
                engine.close()
                t_close = time.perf_counter() - t_close
        stats = {k: int(v) if float(v).is_integer() else v for k, v in stage.collected_stats().items()}
        stats.update(epoch=epoch, engine=r.engine, engine_load_s=round(t_load, 3), engine_close_s=round(t_close, 3))
        if stats.get("tokens"):
            stats["mean_tokens"] = round(stats["tokens"] / max(1, stats["rollouts"]), 2)
        return stage.commit(stats, errors=stats.get("errors", 0))


def _table(rows, prompts, truncated, gens) -> tuple[pa.Table, dict]:
    cols = {name: [] for name in SCHEMA.names}
    stats = {"rollouts": 0, "tokens": 0, "stopped": 0, "errors": 0, "prompt_truncated": 0}
    for row, prompt, cut, outs in zip(rows, prompts, truncated, gens):
        stats["prompt_truncated"] += cut > 0
        for j, g in enumerate(outs):
            cols["sample_id"].append(row["sample_id"])
            cols["rollout_idx"].append(j)
            cols["token_ids"].append(g.token_ids)
            cols["text"].append(g.text)
            cols["logprob"].append(g.logprob)
            cols["finish_reason"].append(g.finish_reason)
            cols["prompt_tokens"].append(len(prompt))
            cols["prompt_truncated"].append(cut)
            cols["error"].append(g.error)
            stats["rollouts"] += 1
            stats["tokens"] += len(g.token_ids)
            stats["stopped"] += g.finish_reason == "stop"
            stats["errors"] += bool(g.error)
    return pa.table(cols, schema=SCHEMA), stats


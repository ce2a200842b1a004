"""rollout: the iteration's policy writes `rollout.n` continuations of each of its prefixes.

Parts of `rollout.prompts_per_part` prefixes are generated and written one at a time, each seeded
by (run.seed, iteration, part), so a killed stage resumes and produces the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from sipt import artifacts
from sipt.config import Config, check_model
from sipt.engines import ENGINES, Sampling, make_engine, policy_engines
from sipt.errors import SiptError
from sipt.executor import run_parts
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
                    max_new_tokens=cfg.new_tokens("rollout"), seed=seed,
                    stop_at_eos=r.stop_at_eos)


def check(cfg: Config, run_dir: Path) -> None:
    """What can be checked before any work (and before the command freezes its config)."""
    r = cfg.rollout
    if r.engine in ENGINES and not ENGINES[r.engine].policy:
        raise SiptError(f"rollout.engine = '{r.engine}': the {r.engine} only judges and rewrites; use {policy_engines()}")
    if r.n < 1 or r.prompts_per_part < 1:
        raise SiptError("rollout.n and rollout.prompts_per_part must be >= 1")
    check_model("rollout", r, required=False)  # empty: the iteration's policy


def run(run_dir: Path, cfg: Config, iteration: int, *, force: bool = False, show_progress: bool = True) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    run_dir = Path(run_dir)
    r = cfg.rollout
    check(cfg, run_dir)
    policy = artifacts.stage_dir(run_dir, "policy", iteration)
    stage = artifacts.Stage.of(
        run_dir, "rollout", cfg, SECTIONS, iteration=iteration, force=force,
        inputs={"samples": "samples", "policy": artifacts.stage_ref("policy", iteration)},
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
        job = RolloutJob(cfg, iteration, r.model or str(policy), parts, bos, start_id, context - s0.max_new_tokens)
        timings = run_parts(job, stage.tmp, cfg.run, label=f"rollout iter {iteration}", unit="rollouts",
                            show_progress=show_progress)
        stats = {k: int(v) if float(v).is_integer() else v for k, v in stage.collected_stats().items()}
        stats.update(epoch=epoch, engine=r.engine, **timings)
        if stats.get("tokens"):
            stats["mean_tokens"] = round(stats["tokens"] / max(1, stats["rollouts"]), 2)
        return stage.commit(stats, errors=stats.get("errors", 0))


@dataclass
class RolloutJob:
    """The rollouts of one part: built here, run by any executor (sipt/executor.py)."""

    cfg: Config
    iteration: int
    model: str
    parts: list
    bos: int | None
    start_id: int
    max_prompt: int
    families = ("part",)

    def open(self) -> None:
        self.engine = make_engine(self.cfg.rollout, self.model)

    def weight(self, k: int) -> int:
        return len(self.parts[k]) * self.cfg.rollout.n

    def part(self, k: int):
        prompts, truncated, empty = [], [], 0
        for row in self.parts[k]:
            ids, cut = policy_prompt(row["prefix_ids"], row["prefix_start"], self.bos, self.max_prompt)
            if not ids:
                ids, empty = [self.start_id], empty + 1
            prompts.append(ids)
            truncated.append(cut)
        gens = self.engine.generate(prompts, sampling(self.cfg, derive_seed(self.cfg.run.seed, "rollout", self.iteration, k)))
        table, stats = _table(self.parts[k], prompts, truncated, gens)
        stats["empty_prefix"] = empty
        return [("part", table, stats)]

    def close(self) -> None:
        if getattr(self, "engine", None) is not None:
            self.engine.close()
            self.engine = None


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


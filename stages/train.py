"""train: turn an iteration's pairs (or samples) into the next policy with online DPO, RF-NLL or NTP.

`_train` reads top to bottom: load the examples and the policy, compute the DPO reference
log-probabilities once (stored in the stage folder), wrap the model (DDP, or FSDP with `train.fsdp`,
under `torchrun`: gloo on CPU, NCCL on GPUs), restore the optimizer, schedule (AdamW, warmup +
cosine over the whole run) and RNG state from the previous iteration's `train/state.pt` or this
stage's last checkpoint (every `train.checkpoint_every` steps), loop, and save the new policy to
`iter-(i+1)/policy` as a Hugging Face folder.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sipt import artifacts, tracking
from sipt.config import Config
from sipt.errors import SiptError, StageInterrupted
from sipt.losses import dpo_loss, nll_loss, sequence_logps
from sipt.progress import progress_bar
from sipt.samples import derive_seed, iteration_samples, read_samples, tokenizer_bos
from sipt.training import (Dist, build_batch, forward_logps, forward_tail, full_state_dict,  # noqa: F401
                           lr_lambda, save_checkpoint, truncate_log, rank_batch as _rank_batch)

SECTIONS = ["run.seed", "run.iterations", "run.prompts_per_iter", "train"]


# -- data ----------------------------------------------------------------------------------------

def load_examples(run_dir: Path, cfg: Config, iteration: int) -> list[dict]:
    """What one iteration trains on: pairs (dpo, rf-nll) or the samples' documents (ntp)."""
    t = cfg.train
    if t.objective == "ntp":
        whole = t.ntp_span == "document"
        columns = ["sample_id", "prefix_ids", "prefix_start", "suffix_ids"] + (["rest_ids"] if whole else [])
        try:
            table, _ = iteration_samples(run_dir, iteration, cfg.run.prompts_per_iter, columns=columns)
        except KeyError:
            raise SiptError(f"{run_dir}/samples: no rest_ids column (made by an older sipt shard); rerun "
                            "`sipt shard --force`, or set train.ntp_span = 'sample'") from None
        return [{"sample_id": r["sample_id"], "prefix_ids": [], "prefix_start": r["prefix_start"],
                 "chosen_ids": r["prefix_ids"] + r["suffix_ids"] + (r["rest_ids"] if whole else []),
                 "rejected_ids": []}
                for r in table.to_pylist()]
    folder = artifacts.stage_dir(run_dir, "pair", iteration)
    table = artifacts.read_table(folder)
    cols = ["sample_id", "prefix_ids", "prefix_start", "chosen_ids", "rejected_ids"]
    cols += [c for c in ("chosen_source", "rejected_source", "chosen_rollout_idx", "rejected_rollout_idx")
             if c in table.column_names]
    rows = table.select(cols).to_pylist()
    if cfg.train.ntp_weight:
        samples = read_samples(run_dir, columns=["sample_id", "suffix_ids"])
        suffix = dict(zip(samples["sample_id"].to_pylist(), samples["suffix_ids"].to_pylist()))
        for r in rows:
            r["suffix_ids"] = suffix[r["sample_id"]]
    if t.objective == "dpo":
        rows = [r for r in rows if r["chosen_ids"] and r["rejected_ids"]]
    rows = [r for r in rows if r["chosen_ids"]]
    if not rows:
        raise SiptError(f"{folder}: no pairs to train on; check `sipt status` and the pair stage's stats")
    return rows


def example_length(ex: dict, context: int) -> int:
    """Tokens of an example's longest sequence in a batch (prompt + continuation, cut to the context)."""
    return min(context, len(ex["prefix_ids"]) + max(len(ex["chosen_ids"]), len(ex.get("rejected_ids") or [])))


def length_grouped(idx: list[int], lengths: list[int], batch: int, groups: int, rng: random.Random) -> list[int]:
    """train.group_by_length: `idx` (one shuffled epoch) cut into groups of `groups` x `batch` examples,
    each group sorted by length (longest first), cut into batches, and the full batches shuffled; a
    last, smaller batch stays last (the steps' slicing of the epoch is unchanged). Every example
    stays exactly once."""
    size = batch * groups
    ranked = [i for g in range(0, len(idx), size) for i in sorted(idx[g : g + size], key=lambda i: -lengths[i])]
    full = len(ranked) // batch * batch
    cut = [ranked[k : k + batch] for k in range(0, full, batch)]
    rng.shuffle(cut)
    return [i for b in cut for i in b] + ranked[full:]


def steps_per_iteration(cfg: Config, n_examples: int | None = None) -> int:
    n = n_examples if n_examples is not None else cfg.run.prompts_per_iter
    return max(1, math.ceil(n * cfg.train.epochs / cfg.train.batch_size))


# -- the stage -----------------------------------------------------------------------------------

def run(run_dir: Path, cfg: Config, iteration: int, *, force: bool = False, show_progress: bool = True) -> dict:
    run_dir = Path(run_dir)
    t = cfg.train
    dist = Dist(t.device)
    if t.batch_size % dist.world:
        raise SiptError(f"train.batch_size = {t.batch_size} must be a multiple of the {dist.world} processes")
    inputs = {"policy": artifacts.stage_ref("policy", iteration)}
    inputs["data"] = "samples" if t.objective == "ntp" else artifacts.stage_ref("pair", iteration)
    prev_state = None
    if iteration > 0 and (artifacts.stage_dir(run_dir, "train", iteration - 1) / "state.pt").exists():
        inputs["previous"] = artifacts.stage_ref("train", iteration - 1)
        prev_state = artifacts.stage_dir(run_dir, "train", iteration - 1) / "state.pt"
    if t.objective == "dpo" and t.reference == "initial":
        inputs["reference"] = artifacts.stage_ref("policy", 0)
    stage = artifacts.Stage.of(run_dir, "train", cfg, SECTIONS, iteration=iteration, inputs=inputs, force=force)
    # The main process owns the stage folder and its lock; the others learn from it where to work.
    opened = None
    if dist.main:
        stage.open()
        opened = {"skipped": stage.skipped, "tmp": str(stage.tmp)}
    opened = dist.broadcast(opened)
    try:
        if opened["skipped"]:
            manifest = stage.manifest if dist.main else None
        else:
            manifest = _train(run_dir, cfg, iteration, stage, Path(opened["tmp"]), dist, prev_state, show_progress)
    except BaseException as e:
        if dist.main:
            stage.fail(e)
        raise
    if dist.main:
        _publish(run_dir, cfg, iteration, force)
    dist.barrier()
    return manifest


@dataclass
class TrainState:
    """What the phases of one train stage share: the data, the model and where the loop stands."""

    cfg: Config
    iteration: int
    dist: Dist
    tmp: Path  # the stage's temporary folder: reference log-probs, checkpoint, log, then the model
    examples: list[dict]
    tokenizer: Any
    model: Any  # the policy (compiled with train.compile); what is saved and clipped
    bos: int | None
    pad: int
    context: int  # the model's positions: prompt + continuation are cut to fit
    autocast: Callable
    train_model: Any = None  # `model` wrapped for DDP or FSDP; `model` itself in one process
    opt: Any = None
    sched: Any = None
    global_step: int = 0  # optimizer steps of the whole run
    step: int = 0  # optimizer steps of this iteration
    dropped: int = 0  # examples left out so that every process gets an equal share
    repeated: int = 0  # examples repeated so that every process gets one
    last: dict = field(default_factory=dict)  # the last step's log line
    tokens_seen: int = 0
    t_start: float = 0.0
    ref_seconds: float = 0.0
    loop_seconds: float = 0.0

    @property
    def checkpoint(self) -> Path:
        return self.tmp / "checkpoint.pt"


def _train(run_dir: Path, cfg: Config, iteration: int, stage: artifacts.Stage, tmp: Path, dist: Dist,
           prev_state: Path | None, show_progress: bool) -> dict | None:
    """The stage's work, phase by phase. The manifest on the main process, None on the others."""
    s = _load(run_dir, cfg, iteration, tmp, dist)
    t_ref = time.perf_counter()
    if cfg.train.objective == "dpo":
        _reference_logps(s, run_dir)
    s.ref_seconds = time.perf_counter() - t_ref
    _wrap(s)
    _restore(s, prev_state)
    _loop(s, run_dir, show_progress)
    return _save(s, stage)


def _load(run_dir: Path, cfg: Config, iteration: int, tmp: Path, dist: Dist) -> TrainState:
    """The examples and the iteration's policy, checked against the samples' tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = cfg.train
    policy_dir = artifacts.stage_dir(run_dir, "policy", iteration)
    examples = load_examples(run_dir, cfg, iteration)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    data_tok = AutoTokenizer.from_pretrained(artifacts.stage_dir(run_dir, "policy", 0))
    if len(tokenizer) != len(data_tok):
        raise SiptError(
            f"{policy_dir}: the policy's tokenizer has {len(tokenizer)} tokens, the samples were made with "
            f"{len(data_tok)} (iter-000/policy); use a policy with the samples' tokenizer or reshard"
        )
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).to(dist.device)
    vocab = model.get_input_embeddings().weight.shape[0]
    top = max((max(ex["chosen_ids"] + ex["rejected_ids"] + ex["prefix_ids"], default=0) for ex in examples), default=0)
    if top >= vocab:
        raise SiptError(f"{policy_dir}: the model has {vocab} embeddings, the data has token id {top}; vocab sizes differ")
    bos, pad = tokenizer_bos(tokenizer), tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
    use_bf16 = t.precision == "bf16" or (t.precision == "auto" and dist.device.type == "cuda")
    autocast = (lambda: torch.autocast(dist.device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
    return TrainState(cfg=cfg, iteration=iteration, dist=dist, tmp=tmp, examples=examples, tokenizer=tokenizer,
                      model=model, bos=bos, pad=pad, context=context, autocast=autocast)


def _reference_logps(s: TrainState, run_dir: Path) -> None:
    """DPO's reference log-probabilities, computed once per pair and stored with the stage
    (`ref_logps.parquet`, by the main process), then set on every example as ref_chosen/ref_rejected."""
    from transformers import AutoModelForCausalLM

    t, dist, examples = s.cfg.train, s.dist, s.examples
    ref_path = s.tmp / "ref_logps.parquet"
    if dist.main and not ref_path.exists():
        policy_dir = artifacts.stage_dir(run_dir, "policy", s.iteration)
        ref_dir = artifacts.stage_dir(run_dir, "policy", 0) if t.reference == "initial" else policy_dir
        reuse = t.reference == "iteration" and t.reuse_rollout_logprobs
        known = _rollout_logprobs(run_dir, s.iteration) if reuse else {}
        todo = [(i, side) for i, ex in enumerate(examples) for side in ("chosen", "rejected")
                if _known_ref(ex, side, known) is None]
        ref = {(i, side): _known_ref(ex, side, known) for i, ex in enumerate(examples) for side in ("chosen", "rejected")}
        if todo:
            ref_model = s.model if ref_dir == policy_dir else AutoModelForCausalLM.from_pretrained(
                ref_dir, dtype=torch.float32).to(dist.device)
            ref_model.eval()
            micro = max(1, t.micro_batch_size)
            with torch.no_grad(), s.autocast():
                for k in range(0, len(todo), micro):
                    chunk = todo[k : k + micro]
                    batch = build_batch([examples[i] for i, _ in chunk], [f"{side}_ids" for _, side in chunk],
                                        s.bos, s.pad, s.context, dist.device)
                    for key, value in zip(chunk, forward_logps(ref_model, batch).tolist()):
                        ref[key] = value
            del ref_model
        artifacts.write_parquet_atomic(ref_path, pa.table({
            "sample_id": [ex["sample_id"] for ex in examples],
            "ref_chosen": [ref[(i, "chosen")] for i in range(len(examples))],
            "ref_rejected": [ref[(i, "rejected")] for i in range(len(examples))],
        }), {"computed": len(todo), "from_rollouts": 2 * len(examples) - len(todo)})
    dist.barrier()
    for ex, r in zip(examples, pq.read_table(ref_path).to_pylist()):
        ex["ref_chosen"], ex["ref_rejected"] = r["ref_chosen"], r["ref_rejected"]


def _wrap(s: TrainState) -> None:
    """torch.compile (train.compile), then DDP or FSDP (train.fsdp) across the torchrun processes."""
    t = s.cfg.train
    if t.compile:
        s.model = torch.compile(s.model)
    s.train_model = s.model
    if s.dist.world > 1:
        if t.fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in s.model.model.layers:
                fully_shard(layer)
            s.train_model = fully_shard(s.model)
        else:
            s.train_model = torch.nn.parallel.DistributedDataParallel(
                s.model, device_ids=[s.dist.device.index] if s.dist.device.type == "cuda" else None)
    s.model.train()


def _restore(s: TrainState, prev_state: Path | None) -> None:
    """AdamW and the run's schedule, continued from the previous iteration's state, then from this
    stage's last checkpoint when a crashed run left one (weights, steps and RNG too)."""
    t = s.cfg.train
    total = t.total_steps or s.cfg.run.iterations * steps_per_iteration(s.cfg)
    s.opt = torch.optim.AdamW(s.model.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                              weight_decay=t.weight_decay)
    s.sched = torch.optim.lr_scheduler.LambdaLR(s.opt, lr_lambda(t.warmup_steps, total, t.min_lr_ratio))
    if prev_state is not None:
        state = torch.load(prev_state, map_location="cpu", weights_only=False)
        s.opt.load_state_dict(state["optimizer"])
        s.sched.load_state_dict(state["scheduler"])
        s.global_step = state["global_step"]
    if s.checkpoint.exists():
        state = torch.load(s.checkpoint, map_location="cpu", weights_only=False)
        s.model.load_state_dict(state["model"])
        s.opt.load_state_dict(state["optimizer"])
        s.sched.load_state_dict(state["scheduler"])
        s.global_step, s.step = state["global_step"], state["step"]
        torch.set_rng_state(state["rng"])


def _loop(s: TrainState, run_dir: Path, show_progress: bool) -> None:
    """The optimizer steps of this iteration, from where `_restore` left off: log, checkpoint, repeat."""
    t, dist = s.cfg.train, s.dist
    n_steps = steps_per_iteration(s.cfg, len(s.examples))
    order = []
    lengths = [example_length(ex, s.context) for ex in s.examples] if t.group_by_length else []
    for epoch in range(t.epochs):
        idx = list(range(len(s.examples)))
        random.Random(derive_seed(s.cfg.run.seed, "train", s.iteration, epoch)).shuffle(idx)
        if t.group_by_length:
            rng = random.Random(derive_seed(s.cfg.run.seed, "group", s.iteration, epoch))
            idx = length_grouped(idx, lengths, t.batch_size, t.group_by_length, rng)
        order += idx
    # Every process needs an equal share: a batch's last len % processes examples are left out
    # (a batch smaller than the process count is repeated up to it instead); both are counted.
    sizes = [len(order[k * t.batch_size : (k + 1) * t.batch_size]) for k in range(n_steps)]
    s.dropped = sum(n % dist.world for n in sizes if n >= dist.world)
    s.repeated = sum(dist.world - n for n in sizes if n < dist.world)
    log_path = s.tmp / "log.jsonl"
    sent = truncate_log(log_path, s.step) if dist.main else None
    log = open(log_path, "a") if dist.main else None
    # the run's experiment tracking (run.report_to): each log line at its global step, once
    curves = tracking.TrainCurves(run_dir, s.global_step, sent) if dist.main else None
    s.t_start = time.perf_counter()
    with progress_bar(f"train iter {s.iteration} ({t.objective})", total=n_steps, unit="steps",
                      enabled=show_progress and dist.main) as bar:
        bar.advance(s.step)
        while s.step < n_steps:
            _step(s, [s.examples[i] for i in order[s.step * t.batch_size : (s.step + 1) * t.batch_size]])
            if log is not None and (s.step % t.log_every == 0 or s.step == n_steps):
                log.write(json.dumps(s.last) + "\n")
                log.flush()
                curves.log(s.last)
            if dist.main and t.checkpoint_every and s.step % t.checkpoint_every == 0 and s.step < n_steps:
                save_checkpoint(s.checkpoint, s.model, s.opt, s.sched, s.global_step, s.step)
            bar.advance(1)
    s.loop_seconds = time.perf_counter() - s.t_start
    if log is not None:
        log.close()
        curves.flush()


def _step(s: TrainState, examples: list[dict]) -> None:
    """One optimizer step on one batch: each process takes its share in micro-batches (gradients
    accumulate; DDP syncs on the last), then clip, step and record the step's log line in `s.last`."""
    t, dist = s.cfg.train, s.dist
    batch = _rank_batch(examples, dist.world)
    shard = batch[dist.rank :: dist.world]
    micro = max(1, t.micro_batch_size)
    chunks = [shard[k : k + micro] for k in range(0, len(shard), micro)]
    sums = {"loss": 0.0, "margin": 0.0, "acc": 0.0, "chosen": 0.0, "rejected": 0.0}
    t0 = time.perf_counter()
    for c, chunk in enumerate(chunks):
        weight = len(chunk) / len(batch) * dist.world  # DDP averages gradients over ranks
        sync = c == len(chunks) - 1 or dist.world == 1 or t.fsdp
        with (nullcontext() if sync else s.train_model.no_sync()), s.autocast():
            loss, stats = _loss(s.train_model, chunk, t, s.bos, s.pad, s.context, dist.device)
            (loss * weight).backward()
        s.tokens_seen += sum(len(ex["chosen_ids"]) + len(ex["rejected_ids"]) for ex in chunk)
        for k, v in stats.items():
            sums[k] += v * len(chunk) / len(shard)
    loss_value = dist.mean(sums["loss"])
    if not math.isfinite(loss_value):
        s.opt.zero_grad(set_to_none=True)
        marker = s.checkpoint.with_suffix(".json")
        good = f"step {json.loads(marker.read_text())['global_step']}" if marker.exists() else "none yet"
        raise StageInterrupted(
            f"train iter {s.iteration}: non-finite loss ({loss_value}) at step {s.global_step} (batch {s.step} of "
            f"this iteration; samples {', '.join(ex['sample_id'] for ex in batch[:3])} ...). The last good "
            f"checkpoint ({good}) is kept and no new policy is written. Lower train.lr or check the pairs"
        )
    grad_norm = torch.nn.utils.clip_grad_norm_(s.model.parameters(), t.max_grad_norm) if t.max_grad_norm else None
    s.opt.step()
    s.sched.step()
    s.opt.zero_grad(set_to_none=True)
    s.step += 1
    s.global_step += 1
    dt = time.perf_counter() - t0
    tokens = sum(len(ex["chosen_ids"]) + len(ex["rejected_ids"]) for ex in batch)
    s.last = {"step": s.global_step, "iter_step": s.step, "loss": round(loss_value, 5),
              "lr": s.sched.get_last_lr()[0], "tokens_per_s": round(tokens / max(dt, 1e-9), 1)}
    if grad_norm is not None:
        s.last["grad_norm"] = round(float(grad_norm), 4)
    if t.objective == "dpo":
        s.last.update({k: round(dist.mean(sums[k]), 5) for k in ("margin", "acc", "chosen", "rejected")})


def _save(s: TrainState, stage: artifacts.Stage) -> dict | None:
    """The trained model (a Hugging Face folder), the optimizer state the next iteration continues
    from, and the stage's manifest (main process; the others return None)."""
    t, dist = s.cfg.train, s.dist
    dist.barrier()
    full_state = full_state_dict(s.train_model, s.model, t.fsdp and dist.world > 1)  # a collective: every rank
    if not dist.main:
        return None
    model_dir = s.tmp / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    unwrapped = getattr(s.model, "_orig_mod", s.model)
    unwrapped.save_pretrained(model_dir, state_dict=full_state, safe_serialization=True)
    s.tokenizer.save_pretrained(model_dir)
    torch.save({"optimizer": s.opt.state_dict(), "scheduler": s.sched.state_dict(), "global_step": s.global_step,
                "rng": torch.get_rng_state()}, s.tmp / "state.pt")
    s.checkpoint.unlink(missing_ok=True)
    s.checkpoint.with_suffix(".json").unlink(missing_ok=True)
    elapsed, last = time.perf_counter() - s.t_start, s.last
    stats = {"objective": t.objective, "examples": len(s.examples), "steps": s.step, "global_step": s.global_step,
             "final_loss": last.get("loss"), "lr": last.get("lr"),
             "tokens_per_s": round(s.tokens_seen / max(elapsed, 1e-9), 1),
             "ref_seconds": round(s.ref_seconds, 3), "loop_seconds": round(s.loop_seconds, 3),
             "processes": dist.world, "sharding": ("fsdp" if t.fsdp else "ddp") if dist.world > 1 else "none",
             "dropped_examples": s.dropped, "repeated_examples": s.repeated}
    if t.objective == "dpo":
        stats.update(final_margin=last.get("margin"), final_accuracy=last.get("acc"))
    return stage.commit(stats, rows=len(s.examples))


def _loss(model, chunk, t, bos, pad, context, device) -> tuple[torch.Tensor, dict]:
    if t.objective == "dpo":  # chosen and rejected in one forward pass
        batch = build_batch(chunk + chunk, ["chosen_ids"] * len(chunk) + ["rejected_ids"] * len(chunk),
                            bos, pad, context, device)
        logits, ids, mask = forward_tail(model, batch)
        logps = sequence_logps(logits, ids, mask)
        pc, pr = logps[: len(chunk)], logps[len(chunk) :]
        rc = torch.tensor([ex["ref_chosen"] for ex in chunk], device=device)
        rr = torch.tensor([ex["ref_rejected"] for ex in chunk], device=device)
        loss, cr, rjr = dpo_loss(pc, pr, rc, rr, t.beta)
        stats = {"loss": float(loss.detach()), "margin": float((cr - rjr).mean()), "acc": float((cr > rjr).float().mean()),
                 "chosen": float(cr.mean()), "rejected": float(rjr.mean())}
        if t.chosen_nll_weight:  # RPO: NLL of the chosen continuations, from the same logits
            n = len(chunk)
            loss = loss + t.chosen_nll_weight * nll_loss(logits[:n], ids[:n], mask[:n])
            stats["loss"] = float(loss.detach())
    else:  # rf-nll: NLL of the chosen continuation; ntp: of the whole document
        batch = build_batch(chunk, "chosen_ids", bos, pad, context, device)
        loss = nll_loss(*forward_tail(model, batch))
        stats = {"loss": float(loss.detach())}
    if t.ntp_weight and t.objective != "ntp":
        batch = build_batch(chunk, "suffix_ids", bos, pad, context, device)
        loss = loss + t.ntp_weight * nll_loss(*forward_tail(model, batch))
        stats["loss"] = float(loss.detach())
    return loss, stats


def _rollout_logprobs(run_dir: Path, iteration: int) -> dict:
    """(sample_id, rollout_idx) -> the log-probability the iteration's policy gave its own rollout.

    That policy is DPO's default reference, so these are exactly the reference log-probabilities of
    rollout candidates: reusing them saves a forward pass over most pairs. Rollouts whose prompt was
    truncated are left out (training would see a different context).
    """
    folder = artifacts.stage_dir(run_dir, "rollout", iteration)
    if not (folder / artifacts.SUCCESS).exists():
        return {}
    t = artifacts.read_table(folder, columns=["sample_id", "rollout_idx", "logprob", "prompt_truncated", "error"])
    return {(r["sample_id"], r["rollout_idx"]): r["logprob"] for r in t.to_pylist()
            if not r["prompt_truncated"] and not r["error"] and r["logprob"] is not None}


def _known_ref(ex: dict, side: str, known: dict) -> float | None:
    if ex.get(f"{side}_source") != "rollout":
        return None
    return known.get((ex["sample_id"], ex.get(f"{side}_rollout_idx", -1)))


def _publish(run_dir: Path, cfg: Config, iteration: int, force: bool) -> dict:
    """Make the trained model the next iteration's policy (hard links, no copy)."""
    train_dir = artifacts.stage_dir(run_dir, "train", iteration)
    stage = artifacts.Stage.of(run_dir, "publish", cfg, SECTIONS, folder="policy", iteration=iteration + 1,
                               inputs={"train": artifacts.stage_ref("train", iteration)}, force=force)
    with stage:
        if stage.skipped:
            return stage.manifest
        for f in (train_dir / "model").iterdir():
            target = stage.tmp / f.name
            target.unlink(missing_ok=True)
            try:
                os.link(f, target)
            except OSError:
                shutil.copy2(f, target)
        return stage.commit({"from": artifacts.stage_ref("train", iteration)}, rows=0)

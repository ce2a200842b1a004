"""train: turn an iteration's pairs (or samples) into the next policy with online DPO, RF-NLL or NTP.

One loop, top to bottom: load the examples and the policy, compute the DPO reference
log-probabilities once (stored in the stage folder), then take optimizer steps with AdamW and a
warmup + cosine schedule that spans the whole run. The optimizer, scheduler, step and RNG state
carry over from the previous iteration's `train/state.pt`; inside a stage a checkpoint every
`train.checkpoint_every` steps lets a crashed run resume. The new policy is written to
`iter-(i+1)/policy` as a Hugging Face folder. Under `torchrun` the same command trains with DDP
(gloo on CPU, NCCL on GPUs), or FSDP with `train.fsdp`.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sipt import artifacts, tracking
from sipt.config import Config
from sipt.errors import SiptError, StageInterrupted
from sipt.losses import dpo_loss, nll_loss, sequence_logps
from sipt.progress import progress_bar
from sipt.samples import derive_seed, iteration_samples, policy_prompt, read_samples, tokenizer_bos

SECTIONS = ["run.seed", "run.iterations", "run.prompts_per_iter", "train"]


# -- distributed ---------------------------------------------------------------------------------

class Dist:
    """Rank, world size and device; a no-op outside torchrun."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() and device != "cpu"
        self.device = torch.device(f"cuda:{local}" if cuda else "cpu") if device == "auto" else torch.device(device)
        if self.world > 1 and not torch.distributed.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(t)
        return float(t) / self.world


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


def build_batch(examples: list[dict], keys: str | list[str], bos: int | None, pad: int, context: int, device) -> dict:
    """Left-padded prompt + continuation, so every continuation ends at the right edge.

    The loss mask covers the continuation only; `keep` is how many positions from the right the
    loss needs logits for, so the model can skip the vocabulary projection of the prompt
    (`logits_to_keep`), which is most of the sequence. `keys` names the continuation of each
    example (one key for all, or one per example: chosen and rejected in one batch).
    """
    keys = [keys] * len(examples) if isinstance(keys, str) else keys
    seqs, conts = [], []
    for ex, key in zip(examples, keys):
        cont = ex[key][:context]
        prompt, _ = policy_prompt(ex["prefix_ids"], ex["prefix_start"], bos, context - len(cont))
        seqs.append(prompt + cont)
        conts.append(len(cont))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (seq, n) in enumerate(zip(seqs, conts)):
        ids[i, width - len(seq) :] = torch.tensor(seq)
        attn[i, width - len(seq) :] = 1
        if n:
            loss_mask[i, width - n :] = 1
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    keep = min(width, max(conts) + 1)
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "position_ids": positions.to(device),
            "loss_mask": loss_mask.to(device), "keep": keep}


def forward_tail(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits of the last `keep` positions, with the matching ids and loss mask."""
    keep = batch["keep"]
    width = batch["input_ids"].shape[1]
    kwargs = {"logits_to_keep": keep} if keep < width else {}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], **kwargs).logits
    return logits, batch["input_ids"][:, -keep:], batch["loss_mask"][:, -keep:]


def forward_logps(model, batch: dict) -> torch.Tensor:
    return sequence_logps(*forward_tail(model, batch))


# -- schedule ------------------------------------------------------------------------------------

def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warmup, then cosine decay to `min_ratio` over the whole run's steps."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def steps_per_iteration(cfg: Config, n_examples: int | None = None) -> int:
    n = n_examples if n_examples is not None else cfg.run.prompts_per_iter
    return max(1, math.ceil(n * cfg.train.epochs / cfg.train.batch_size))


# -- the stage -----------------------------------------------------------------------------------

def run(run_dir: Path, cfg: Config, iteration: int, *, force: bool = False, show_progress: bool = True) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = Path(run_dir)
    t = cfg.train
    dist = Dist(t.device)
    if t.batch_size % dist.world:
        raise SiptError(f"train.batch_size = {t.batch_size} must be a multiple of the {dist.world} processes")
    policy_dir = artifacts.stage_dir(run_dir, "policy", iteration)
    inputs = {"policy": artifacts.stage_ref("policy", iteration)}
    inputs["data"] = "samples" if t.objective == "ntp" else artifacts.stage_ref("pair", iteration)
    prev_state = None
    if iteration > 0 and (artifacts.stage_dir(run_dir, "train", iteration - 1) / "state.pt").exists():
        inputs["previous"] = artifacts.stage_ref("train", iteration - 1)
        prev_state = artifacts.stage_dir(run_dir, "train", iteration - 1) / "state.pt"
    if t.objective == "dpo" and t.reference == "initial":
        inputs["reference"] = artifacts.stage_ref("policy", 0)
    stage = artifacts.Stage.of(run_dir, "train", cfg, SECTIONS, iteration=iteration, inputs=inputs, force=force)
    entered = None
    if dist.main:
        stage.__enter__()
        entered = {"skipped": stage.skipped, "tmp": str(stage.tmp)}
    entered = dist.broadcast(entered)
    try:
        if entered["skipped"]:
            manifest = stage.manifest if dist.main else None
        else:
            manifest = _train(run_dir, cfg, iteration, stage, Path(entered["tmp"]), dist, prev_state,
                              policy_dir, show_progress, AutoModelForCausalLM, AutoTokenizer)
    except BaseException as e:
        if dist.main:
            stage.__exit__(type(e), e, e.__traceback__)
        raise
    if dist.main:
        _publish(run_dir, cfg, iteration, force)
    dist.barrier()
    return manifest


def _train(run_dir, cfg, iteration, stage, tmp, dist, prev_state, policy_dir, show_progress, AutoModel, AutoTok):
    t = cfg.train
    examples = load_examples(run_dir, cfg, iteration)
    tokenizer = AutoTok.from_pretrained(policy_dir)
    data_tok = AutoTok.from_pretrained(artifacts.stage_dir(run_dir, "policy", 0))
    if len(tokenizer) != len(data_tok):
        raise SiptError(
            f"{policy_dir}: the policy's tokenizer has {len(tokenizer)} tokens, the samples were made with "
            f"{len(data_tok)} (iter-000/policy); use a policy with the samples' tokenizer or reshard"
        )
    model = AutoModel.from_pretrained(policy_dir, dtype=torch.float32).to(dist.device)
    vocab = model.get_input_embeddings().weight.shape[0]
    top = max((max(ex["chosen_ids"] + ex["rejected_ids"] + ex["prefix_ids"], default=0) for ex in examples), default=0)
    if top >= vocab:
        raise SiptError(f"{policy_dir}: the model has {vocab} embeddings, the data has token id {top}; vocab sizes differ")
    bos, pad = tokenizer_bos(tokenizer), tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
    use_bf16 = t.precision == "bf16" or (t.precision == "auto" and dist.device.type == "cuda")
    autocast = (lambda: torch.autocast(dist.device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
    micro = max(1, t.micro_batch_size)

    # DPO reference log-probabilities: computed once per pair and stored with the stage.
    ref_path = tmp / "ref_logps.parquet"
    t_ref = time.perf_counter()
    if t.objective == "dpo":
        if dist.main and not ref_path.exists():
            ref_dir = artifacts.stage_dir(run_dir, "policy", 0) if t.reference == "initial" else policy_dir
            known = _rollout_logprobs(run_dir, iteration) if (t.reference == "iteration" and t.reuse_rollout_logprobs) else {}
            todo = [(i, side) for i, ex in enumerate(examples) for side in ("chosen", "rejected")
                    if _known_ref(ex, side, known) is None]
            ref = {(i, side): _known_ref(ex, side, known) for i, ex in enumerate(examples) for side in ("chosen", "rejected")}
            if todo:
                ref_model = model if ref_dir == policy_dir else AutoModel.from_pretrained(ref_dir, dtype=torch.float32).to(dist.device)
                ref_model.eval()
                with torch.no_grad(), autocast():
                    for k in range(0, len(todo), micro):
                        chunk = todo[k : k + micro]
                        batch = build_batch([examples[i] for i, _ in chunk], [f"{side}_ids" for _, side in chunk],
                                            bos, pad, context, dist.device)
                        for key, value in zip(chunk, forward_logps(ref_model, batch).tolist()):
                            ref[key] = value
                del ref_model
            artifacts.write_parquet_atomic(ref_path, pa.table({
                "sample_id": [ex["sample_id"] for ex in examples],
                "ref_chosen": [ref[(i, "chosen")] for i in range(len(examples))],
                "ref_rejected": [ref[(i, "rejected")] for i in range(len(examples))],
            }), {"computed": len(todo), "from_rollouts": 2 * len(examples) - len(todo)})
        dist.barrier()
        ref = pq.read_table(ref_path).to_pylist()
        for ex, r in zip(examples, ref):
            ex["ref_chosen"], ex["ref_rejected"] = r["ref_chosen"], r["ref_rejected"]

    t_ref = time.perf_counter() - t_ref
    if t.compile:
        model = torch.compile(model)
    train_model = model
    if dist.world > 1:
        if t.fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            train_model = fully_shard(model)
        else:
            train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    model.train()

    n_steps = steps_per_iteration(cfg, len(examples))
    total = t.total_steps or cfg.run.iterations * steps_per_iteration(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                            weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.warmup_steps, total, t.min_lr_ratio))
    global_step, step = 0, 0
    if prev_state is not None:  # continue the run's optimizer and schedule from the last iteration
        state = torch.load(prev_state, map_location="cpu", weights_only=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        global_step = state["global_step"]
    ckpt = tmp / "checkpoint.pt"
    if ckpt.exists():  # a crashed stage resumes from its last checkpoint
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        global_step, step = state["global_step"], state["step"]
        torch.set_rng_state(state["rng"])

    order = []
    for epoch in range(t.epochs):
        idx = list(range(len(examples)))
        random.Random(derive_seed(cfg.run.seed, "train", iteration, epoch)).shuffle(idx)
        order += idx
    # Every process needs an equal share: a batch's last len % processes examples are left out
    # (a batch smaller than the process count is repeated up to it instead); both are counted.
    sizes = [len(order[k * t.batch_size : (k + 1) * t.batch_size]) for k in range(n_steps)]
    dropped = sum(n % dist.world for n in sizes if n >= dist.world)
    repeated = sum(dist.world - n for n in sizes if n < dist.world)
    log_path = tmp / "log.jsonl"
    sent = _truncate_log(log_path, step) if dist.main else None
    log = open(log_path, "a") if dist.main else None
    # the run's experiment tracking (run.report_to): each log line at its global step, once
    curves = tracking.TrainCurves(run_dir, global_step, sent) if dist.main else None
    last = {}
    t_start, tokens_seen = time.perf_counter(), 0
    with progress_bar(f"train iter {iteration} ({t.objective})", total=n_steps, unit="steps",
                      enabled=show_progress and dist.main) as bar:
        bar.advance(step)
        while step < n_steps:
            batch = _rank_batch([examples[i] for i in order[step * t.batch_size : (step + 1) * t.batch_size]],
                                dist.world)
            shard = batch[dist.rank :: dist.world]
            chunks = [shard[k : k + micro] for k in range(0, len(shard), micro)]
            sums = {"loss": 0.0, "margin": 0.0, "acc": 0.0, "chosen": 0.0, "rejected": 0.0}
            t0 = time.perf_counter()
            for c, chunk in enumerate(chunks):
                weight = len(chunk) / len(batch) * dist.world  # DDP averages gradients over ranks
                sync = c == len(chunks) - 1 or dist.world == 1 or t.fsdp
                with (nullcontext() if sync else train_model.no_sync()), autocast():
                    loss, stats = _loss(train_model, chunk, t, bos, pad, context, dist.device)
                    (loss * weight).backward()
                tokens_seen += sum(len(ex["chosen_ids"]) + len(ex["rejected_ids"]) for ex in chunk)
                for k, v in stats.items():
                    sums[k] += v * len(chunk) / len(shard)
            loss_value = dist.mean(sums["loss"])
            if not math.isfinite(loss_value):
                opt.zero_grad(set_to_none=True)
                marker = ckpt.with_suffix(".json")
                good = f"step {json.loads(marker.read_text())['global_step']}" if marker.exists() else "none yet"
                raise StageInterrupted(
                    f"train iter {iteration}: non-finite loss ({loss_value}) at step {global_step} (batch {step} of "
                    f"this iteration; samples {', '.join(ex['sample_id'] for ex in batch[:3])} ...). The last good "
                    f"checkpoint ({good}) is kept and no new policy is written. Lower train.lr or check the pairs"
                )
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm) if t.max_grad_norm else None
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            global_step += 1
            dt = time.perf_counter() - t0
            last = {"step": global_step, "iter_step": step, "loss": round(loss_value, 5),
                    "lr": sched.get_last_lr()[0], "tokens_per_s": round(sum(len(ex["chosen_ids"]) + len(ex["rejected_ids"]) for ex in batch) / max(dt, 1e-9), 1)}
            if grad_norm is not None:
                last["grad_norm"] = round(float(grad_norm), 4)
            if t.objective == "dpo":
                last.update({k: round(dist.mean(sums[k]), 5) for k in ("margin", "acc", "chosen", "rejected")})
            if log is not None and (step % t.log_every == 0 or step == n_steps):
                log.write(json.dumps(last) + "\n")
                log.flush()
                curves.log(last)
            if dist.main and t.checkpoint_every and step % t.checkpoint_every == 0 and step < n_steps:
                _save_checkpoint(ckpt, model, opt, sched, global_step, step)
            bar.advance(1)
    loop_seconds = time.perf_counter() - t_start
    if log is not None:
        log.close()
        curves.flush()
    dist.barrier()
    full_state = _full_state_dict(train_model, model, t.fsdp and dist.world > 1)  # a collective: every rank
    if not dist.main:
        return None
    model_dir = tmp / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    unwrapped = getattr(model, "_orig_mod", model)
    unwrapped.save_pretrained(model_dir, state_dict=full_state, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "global_step": global_step,
                "rng": torch.get_rng_state()}, tmp / "state.pt")
    ckpt.unlink(missing_ok=True)
    ckpt.with_suffix(".json").unlink(missing_ok=True)
    elapsed = time.perf_counter() - t_start
    stats = {"objective": t.objective, "examples": len(examples), "steps": step, "global_step": global_step,
             "final_loss": last.get("loss"), "lr": last.get("lr"), "tokens_per_s": round(tokens_seen / max(elapsed, 1e-9), 1),
             "ref_seconds": round(t_ref, 3), "loop_seconds": round(loop_seconds, 3),
             "processes": dist.world, "sharding": ("fsdp" if t.fsdp else "ddp") if dist.world > 1 else "none",
             "dropped_examples": dropped, "repeated_examples": repeated}
    if t.objective == "dpo":
        stats.update(final_margin=last.get("margin"), final_accuracy=last.get("acc"))
    return stage.commit(stats, rows=len(examples))


def _loss(model, chunk, t, bos, pad, context, device) -> tuple[torch.Tensor, dict]:
    if t.objective == "dpo":  # chosen and rejected in one forward pass
        batch = build_batch(chunk + chunk, ["chosen_ids"] * len(chunk) + ["rejected_ids"] * len(chunk),
                            bos, pad, context, device)
        logps = forward_logps(model, batch)
        pc, pr = logps[: len(chunk)], logps[len(chunk) :]
        rc = torch.tensor([ex["ref_chosen"] for ex in chunk], device=device)
        rr = torch.tensor([ex["ref_rejected"] for ex in chunk], device=device)
        loss, cr, rjr = dpo_loss(pc, pr, rc, rr, t.beta)
        stats = {"loss": float(loss.detach()), "margin": float((cr - rjr).mean()), "acc": float((cr > rjr).float().mean()),
                 "chosen": float(cr.mean()), "rejected": float(rjr.mean())}
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


def _rank_batch(batch: list, world: int) -> list:
    """`batch` cut to a multiple of the process count, so each process gets an equal share; one
    smaller than the count is repeated up to it (every process must take the step)."""
    if len(batch) < world:
        return (batch * world)[:world]
    return batch[: len(batch) - len(batch) % world]


def _known_ref(ex: dict, side: str, known: dict) -> float | None:
    if ex.get(f"{side}_source") != "rollout":
        return None
    return known.get((ex["sample_id"], ex.get(f"{side}_rollout_idx", -1)))


def _save_checkpoint(path: Path, model, opt, sched, global_step: int, step: int) -> None:
    tmp = path.with_name(path.name + ".partial")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "global_step": global_step, "step": step, "rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps({"global_step": global_step, "step": step}))


def _truncate_log(path: Path, step: int) -> int | None:
    """Keep the log lines of the steps up to `step` (the restored checkpoint's, 0 without one): a
    resumed stage redoes the steps after it and logs them again. A line cut by a kill is dropped.
    Returns the last global step logged before (None: nothing), which the trackers already have."""
    if not path.exists():
        return None
    kept, sent = [], None
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(entry, dict):
            continue
        sent = max(sent or 0, int(entry.get("step", 0)))
        if entry.get("iter_step", 0) <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
    return sent


def _full_state_dict(train_model, model, fsdp: bool):
    if not fsdp:
        return None  # save_pretrained reads the (unsharded) model itself
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(train_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


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

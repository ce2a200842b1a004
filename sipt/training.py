"""Training building blocks the train stage composes: processes, batches, schedule, checkpoints.

Generic over the run layout: nothing here reads a run folder or a config. The losses themselves
are in `sipt.losses`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from sipt.losses import sequence_logps
from sipt.samples import policy_prompt


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


# -- batches ------------------------------------------------------------------------------------

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


def rank_batch(batch: list, world: int) -> list:
    """`batch` cut to a multiple of the process count, so each process gets an equal share; one
    smaller than the count is repeated up to it (every process must take the step)."""
    if len(batch) < world:
        return (batch * world)[:world]
    return batch[: len(batch) - len(batch) % world]


# -- schedule and checkpoints -------------------------------------------------------------------

def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warmup, then cosine decay to `min_ratio` over the whole run's steps."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def save_checkpoint(path: Path, model, opt, sched, global_step: int, step: int) -> None:
    """Everything a crashed stage resumes from, written atomically; `<path>.json` names its step."""
    tmp = path.with_name(path.name + ".partial")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "global_step": global_step, "step": step, "rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, path)
    marker = path.with_suffix(".json")  # atomic too: read while training runs, never half-written
    marker.with_name(marker.name + ".partial").write_text(json.dumps({"global_step": global_step, "step": step}))
    os.replace(marker.with_name(marker.name + ".partial"), marker)


def truncate_log(path: Path, step: int, key: str = "iter_step") -> int | None:
    """Keep the log lines whose `key` is at most `step` (the restored checkpoint's, 0 without one): a
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
        if entry.get(key, 0) <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
    return sent


def full_state_dict(train_model, model, fsdp: bool):
    """The unsharded weights of an FSDP model on CPU (a collective: every process calls it)."""
    if not fsdp:
        return None  # save_pretrained reads the (unsharded) model itself
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(train_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

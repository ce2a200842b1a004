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

from sipt.errors import SiptError
from sipt.losses import sequence_logps
from sipt.samples import policy_prompt


class Dist:
    """Rank, world size and device; a no-op outside torchrun."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = process_device(device, local, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
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


def process_device(device: str, local_rank: int = 0, local_world: int = 1) -> torch.device:
    """The device of one training process: `train.device` ("auto", "cpu", "cuda" or "cuda:N"); under
    torchrun "auto" and "cuda" mean the local rank's GPU. More processes on a node than GPUs is an
    error that says so (CUDA's own is "invalid device ordinal" from one rank)."""
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if not cuda:
        return torch.device("cpu")
    if device in ("auto", "cuda"):
        device = f"cuda:{local_rank}"
    if not torch.cuda.is_available():
        raise SiptError(f"train.device = {device!r} but torch sees no GPU; use 'auto' or 'cpu'")
    index, count = torch.device(device).index or 0, torch.cuda.device_count()
    if index >= count:
        raise SiptError(f"{local_world} training processes on this node need {local_world} GPUs, but torch sees "
                        f"{count}: set train.nproc_per_node (or torchrun's --nproc_per_node) to at most {count}, "
                        f"or train.device = 'cpu' to train with gloo processes on CPU")
    return torch.device(device)


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


# -- helpers of the model-training stages (judge-train, rewriter-train) ----------------------------


class StepLog:
    """`log.jsonl` of a training stage, one JSON line per record (each with a "step"), and its numbers
    as TensorBoard scalars under `tb/` when tensorboard is installed (`tag`/<key>)."""

    def __init__(self, out: Path, tag: str, name: str = "log.jsonl"):
        self.path, self.out, self.tag, self._tb = Path(out) / name, Path(out), tag, None

    def __call__(self, record: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tb = False
            else:  # purge_step: a resumed run's redone steps replace the old ones
                self._tb = SummaryWriter(str(self.out / "tb"), purge_step=record["step"])
        if self._tb:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{self.tag}/{key}", value, record["step"])

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def close(self) -> None:
        if self._tb:
            self._tb.close()


def save_model_checkpoint(folder: Path, model, opt, sched, state: dict) -> None:
    """A Hugging Face model folder plus optimizer, scheduler and `state.json`, written beside `folder`
    and swapped in whole (a kill leaves the old one)."""
    import shutil

    folder = Path(folder)
    new, old = folder.with_name(folder.name + ".partial"), folder.with_name(folder.name + ".old")
    shutil.rmtree(new, ignore_errors=True)
    model.save_pretrained(new)
    torch.save(opt.state_dict(), new / "optimizer.pt")
    torch.save(sched.state_dict(), new / "scheduler.pt")
    (new / "state.json").write_text(json.dumps(state))
    if folder.exists():
        os.replace(folder, old)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_model_checkpoint(folder: Path, opt, sched) -> dict:
    """Restore optimizer and scheduler from a `save_model_checkpoint` folder; its state (the model
    itself is loaded from the folder by the caller)."""
    folder = Path(folder)
    opt.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    sched.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    return json.loads((folder / "state.json").read_text())


def kill_point(step: int) -> None:
    """A deterministic crash for the resume tests: SIPT_KILL_AT_STEP=N SIGKILLs the process right
    after the checkpoint of step N is written. Unset (always, outside tests) it does nothing."""
    if os.environ.get("SIPT_KILL_AT_STEP", "") == str(step):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def pad(seqs: list[list[int]], pad_id: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token lists padded to one width, on the left (generation) or right."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for k, s in enumerate(seqs):
        if left:
            ids[k, width - len(s):], mask[k, width - len(s):] = torch.tensor(s), 1
        else:
            ids[k, :len(s)], mask[k, :len(s)] = torch.tensor(s), 1
    return ids, mask


def target_loss(model, prompts: list[list[int]], targets: list[list[int]], pad_id: int, device):
    """Mean cross-entropy of each target's tokens given its prompt (prompt tokens are not trained)."""
    import torch.nn.functional as F

    ids, mask = pad([p + t for p, t in zip(prompts, targets)], pad_id, left=False)
    on = torch.zeros_like(ids)
    for k, (p, t) in enumerate(zip(prompts, targets)):
        on[k, len(p):len(p) + len(t)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1).to(device),
                         reduction="none").view(ids.shape[0], -1)
    on = on[:, 1:].to(device)
    return (ce * on).sum() / on.sum().clamp(min=1)


def grpo_train(section, out: Path, model, tok, reward, data, callback, *, seed: int, device: str,
               show_progress: bool, max_completion: int, log_path: Path, step_offset: int = 0,
               shuffle: bool = True):
    """Train `model` with TRL's GRPOTrainer on `data` (a datasets.Dataset with a "prompt" column) and
    the reward function `reward`; the knobs (steps, batch_size, generations, temperature, top_p, lr,
    lr_scheduler, weight_decay, beta, checkpoint_every) are the stage's `section`. Checkpoints go to
    `out`/grpo; a rerun resumes from the last one, its log (`log_path`, lines keyed "step", offset by
    `step_offset`) cut back to it. Returns the trained model."""
    from transformers.trainer_utils import get_last_checkpoint
    from trl import GRPOConfig, GRPOTrainer

    s = section
    args = GRPOConfig(
        output_dir=str(out / "grpo"), max_steps=s.steps, per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=1, num_generations=s.generations, temperature=s.temperature,
        top_p=s.top_p, learning_rate=s.lr, lr_scheduler_type=s.lr_scheduler, weight_decay=s.weight_decay,
        max_completion_length=max_completion, beta=s.beta, seed=seed, shuffle_dataset=shuffle,
        save_strategy="steps" if s.checkpoint_every else "no", save_steps=s.checkpoint_every or 500,
        logging_steps=1, report_to=[], disable_tqdm=not show_progress,
        use_cpu=device == "cpu", bf16=device != "cpu" and torch.cuda.is_bf16_supported(),
    )
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                          processing_class=tok, callbacks=[callback])
    if not show_progress:  # TRL would print every step's logs instead of the bar
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    last = get_last_checkpoint(str(out / "grpo")) if (out / "grpo").is_dir() else None
    if last:
        truncate_log(log_path, step_offset + int(Path(last).name.rsplit("-", 1)[1]), key="step")
    trainer.train(resume_from_checkpoint=last)
    return trainer.model

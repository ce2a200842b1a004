"""judge-train: train a judge model on judge-data's rows (PAPER §6.5); the output is a Hugging Face
folder to use as `judge.model` (hf, vllm, or served behind openai).

Quality and safety rows are trained jointly. Two modes (judge_train.mode):
  verdict   supervised loss on the answer tokens only, the answer being the verdict alone
            ("Conclusion: Option 1", "FINAL DECISION: YES"): fast, fits small models, and warms up a
            model that cannot yet write the verdict format. The trained judge is used with
            judge.mode = logprob (or generate: it answers with the verdict at once).
  grpo      TRL's GRPOTrainer: the model writes what it likes and the objective's parser
            (sipt.objectives) reads the last verdict; reward 1 when it matches the label, else 0.
Validation accuracy per task and the Option-1 rate (the share of quality comparisons given to
Option 1: 50% when the judge reads the texts, not the position, since both orders are in the set)
are measured as judge.mode = logprob reads them (the option tokens after the forced answer prefix)
at step 0, every `eval_every` steps and at the end; they go to `log.jsonl` in the stage folder.
A checkpoint is written every `checkpoint_every` steps in the stage's temporary folder: a killed run
resumes from it when rerun.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import pyarrow.compute as pc

from sipt import artifacts
from sipt.config import Config
from sipt.backends import logprob_prompt_ids, verdict_tokens
from sipt.errors import SiptError
from sipt.objectives import OBJECTIVES
from sipt.progress import progress_bar
from sipt.training import truncate_log

SECTIONS = ["run.seed", "judge_train"]
TASKS = ("quality", "safety")
LOG = "log.jsonl"


def model_folder(cfg: Config, run_dir: Path) -> Path:
    return Path(cfg.judge_train.model) if cfg.judge_train.model else artifacts.stage_dir(run_dir, "policy", 0)


def check(cfg: Config, run_dir: Path) -> None:
    """The starting model exists and, with chat = true, has a chat template (an error naming the folder)."""
    folder = model_folder(cfg, run_dir)
    if not (folder / "config.json").is_file():
        raise SiptError(f"judge_train.model = {folder}: not a Hugging Face model folder (no config.json)")
    if cfg.judge_train.chat:
        from transformers import AutoTokenizer

        if not getattr(AutoTokenizer.from_pretrained(folder), "chat_template", None):
            raise SiptError(f"{folder}: its tokenizer has no chat template, but judge_train.chat = true; set "
                            "judge_train.chat = false (and judge.chat = false when judging with it), or start "
                            "from an instruct model")
    if cfg.judge_train.mode == "grpo" and cfg.judge_train.batch_size % cfg.judge_train.generations:
        raise SiptError(f"judge_train.batch_size = {cfg.judge_train.batch_size} must be a multiple of "
                        f"judge_train.generations = {cfg.judge_train.generations} (completions per step)")


def read_rows(run_dir: Path) -> dict[str, list[dict]]:
    """judge-data's usable rows by split."""
    table = artifacts.read_table(artifacts.stage_dir(run_dir, "judge-data"),
                                 columns=["sample_id", "task", "split", "prompt", "label", "error"])
    table = table.filter(pc.equal(table["error"], ""))
    rows = table.to_pylist()
    return {s: [r for r in rows if r["split"] == s] for s in ("train", "validation")}


def run(run_dir: Path, cfg: Config, *, force: bool = False, show_progress: bool = True) -> dict:
    run_dir = Path(run_dir)
    check(cfg, run_dir)
    folder = model_folder(cfg, run_dir)
    inputs = {"judge_data": artifacts.stage_ref("judge-data"), "model": artifacts.files_ref([folder])}
    stage = artifacts.Stage.of(run_dir, "judge-train", cfg, SECTIONS, inputs=inputs, force=force)
    with stage:
        if stage.skipped:
            return stage.manifest
        rows = read_rows(run_dir)
        for split in ("train", "validation"):
            missing = [t for t in TASKS if not any(r["task"] == t for r in rows[split])]
            if missing:
                raise SiptError(f"{run_dir}/judge-data: no usable {'/'.join(missing)} rows in the {split} split; "
                                "rerun `sipt judge-data` with more judge_data.samples")
        trainer = Trainer(cfg, folder, stage.tmp, show_progress)
        stats = trainer.fit(rows["train"], rows["validation"])
        return stage.commit(stats, rows=len(rows["train"]))


class Trainer:
    """One judge-training run in the stage's temporary folder (`out`), resumable from its checkpoint."""

    def __init__(self, cfg: Config, folder: Path, out: Path, show_progress: bool):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg, self.jt, self.out, self.show_progress = cfg, cfg.judge_train, Path(out), show_progress
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if self.jt.device == "auto" else self.jt.device
        self.checkpoint = self.out / "checkpoint"
        self._tb = None  # the TensorBoard writer, opened on the first log line
        start = self.checkpoint if (self.checkpoint / "state.json").exists() and self.jt.mode == "verdict" else folder
        self.tok = AutoTokenizer.from_pretrained(folder)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32).to(self.device)
        self.options = {t: verdict_tokens(self.tok, t) for t in TASKS}

    # ------------------------------------------------------------------ prompts and validation
    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        return prompt_ids(self.tok, prompts, self.jt.chat, self.jt.max_prompt_tokens)

    def evaluate(self, rows: list[dict]) -> dict:
        """Validation accuracy per task and the Option-1 rate (judge.mode = logprob's verdicts)."""
        out = {}
        for task in TASKS:
            picked = [r for r in rows if r["task"] == task]
            if self.jt.eval_limit:
                picked = picked[: self.jt.eval_limit]
            preds = verdicts(self.model, self.tok, [r["prompt"] for r in picked], task, chat=self.jt.chat,
                             max_prompt_tokens=self.jt.max_prompt_tokens, device=self.device)
            out[f"val_{task}_acc"] = round(sum(p == r["label"] for p, r in zip(preds, picked)) / max(1, len(picked)), 4)
            if task == "quality":
                out["option1_rate"] = round(sum(p == 1.0 for p in preds) / max(1, len(preds)), 4)
        self.model.train()
        return out

    def log(self, record: dict) -> None:
        """One line of log.jsonl, and its numbers as TensorBoard scalars in tb/ when tensorboard is installed."""
        with (self.out / LOG).open("a") as fh:
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
                    self._tb.add_scalar(f"judge_train/{key}", value, record["step"])

    # ------------------------------------------------------------------ training
    def fit(self, train: list[dict], validation: list[dict]) -> dict:
        t0 = time.time()
        before = self._before(validation)
        if self.jt.mode == "verdict":
            self._verdict(train, validation)
        else:
            self._grpo(train, validation)
        after = self.evaluate(validation)
        self.log({"step": self.jt.steps, "final": True, **after})
        if self._tb:
            self._tb.close()
        self.model.save_pretrained(self.out)
        self.tok.save_pretrained(self.out)
        shutil.rmtree(self.checkpoint, ignore_errors=True)
        shutil.rmtree(self.out / "grpo", ignore_errors=True)
        counts = {f"{s}_{t}": sum(r["task"] == t for r in rows) for s, rows in (("train", train), ("validation", validation))
                  for t in TASKS}
        return {"mode": self.jt.mode, "steps": self.jt.steps, **counts,
                **{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()},
                "train_seconds": round(time.time() - t0, 1)}

    def _before(self, validation: list[dict]) -> dict:
        """The starting model's validation numbers (logged once: a resumed run reads them back)."""
        log = self.out / LOG
        if log.exists():
            for line in log.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("step") == 0 and "val_quality_acc" in rec:
                    return {k: v for k, v in rec.items() if k.startswith(("val_", "option1"))}
        before = self.evaluate(validation)
        self.log({"step": 0, **before})
        return before

    def _verdict(self, train: list[dict], validation: list[dict]) -> None:
        import torch
        from transformers import get_scheduler

        jt = self.jt
        opt = torch.optim.AdamW(self.model.parameters(), lr=jt.lr, weight_decay=jt.weight_decay)
        sched = get_scheduler(jt.lr_scheduler, opt, num_warmup_steps=0, num_training_steps=jt.steps)
        step = 0
        state = self.checkpoint / "state.json"
        if state.exists():  # resume: the model was loaded from the checkpoint in __init__
            step = json.loads(state.read_text())["step"]
            truncate_log(self.out / LOG, step, key="step")
            opt.load_state_dict(torch.load(self.checkpoint / "optimizer.pt", weights_only=True))
            sched.load_state_dict(torch.load(self.checkpoint / "scheduler.pt", weights_only=True))
        order = _order(train, jt.batch_size, jt.steps, self.cfg.run.seed)
        eos = [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []
        with progress_bar("judge-train (verdict)", total=jt.steps, unit="steps", enabled=self.show_progress) as bar:
            bar.advance(step)
            self.model.train()
            while step < jt.steps:
                batch = [train[i] for i in order[step]]
                loss = self.verdict_loss(batch, eos)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                bar.advance(1)
                record = {"step": step, "loss": round(loss.item(), 5), "lr": sched.get_last_lr()[0]}
                if jt.eval_every and step % jt.eval_every == 0 and step < jt.steps:
                    record.update(self.evaluate(validation))
                self.log(record)
                if jt.checkpoint_every and step % jt.checkpoint_every == 0 and step < jt.steps:
                    self._save_checkpoint(step, opt, sched)
                    _kill_point(step)

    def answer_ids(self, row: dict) -> tuple[list[int], list[int]]:
        """(the forced answer prefix's tokens, the verdict's tokens after it)."""
        o = OBJECTIVES[row["task"]]
        text = o.answer_prefix + next(t for t, v in o.options if v == row["label"])
        ids = self.tok(text, add_special_tokens=False).input_ids
        k = len(self.options[row["task"]][0])
        return ids[:k], ids[k:]

    def verdict_loss(self, batch: list[dict], eos: list[int]):
        """Mean cross-entropy on the verdict tokens (the option, then EOS) plus the mean on the answer
        prefix's tokens ("Conclusion: Option"): the prefix is learnt in a few steps, after which the
        verdict carries the gradient; generate mode then answers with the verdict at once."""
        import torch
        import torch.nn.functional as F

        prompts = self.prompt_ids([r["prompt"] for r in batch])
        answers = [self.answer_ids(r) for r in batch]
        seqs = [p + h + v + eos for p, (h, v) in zip(prompts, answers)]
        ids, mask = _pad(seqs, self.tok.pad_token_id, left=False)
        which = torch.zeros_like(ids)  # 1: answer prefix token, 2: verdict token (as targets)
        for k, (p, (h, v)) in enumerate(zip(prompts, answers)):
            which[k, len(p):len(p) + len(h)] = 1
            which[k, len(p) + len(h):len(p) + len(h) + len(v) + len(eos)] = 2
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits[:, :-1]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1).to(self.device),
                             reduction="none").view(ids.shape[0], -1)
        target = which[:, 1:].to(self.device)
        loss = (ce * (target == 2)).sum() / (target == 2).sum()
        if (target == 1).any():
            loss = loss + (ce * (target == 1)).sum() / (target == 1).sum()
        return loss

    def _save_checkpoint(self, step: int, opt, sched) -> None:
        """Model, optimizer and scheduler, written beside and swapped in whole (a kill leaves the old one)."""
        import torch

        new = self.out / "checkpoint.partial"
        shutil.rmtree(new, ignore_errors=True)
        self.model.save_pretrained(new)
        torch.save(opt.state_dict(), new / "optimizer.pt")
        torch.save(sched.state_dict(), new / "scheduler.pt")
        (new / "state.json").write_text(json.dumps({"step": step}))
        old = self.out / "checkpoint.old"
        if self.checkpoint.exists():
            os.replace(self.checkpoint, old)
        os.replace(new, self.checkpoint)
        shutil.rmtree(old, ignore_errors=True)

    def _grpo(self, train: list[dict], validation: list[dict]) -> None:
        from datasets import Dataset
        from transformers import TrainerCallback
        from transformers.trainer_utils import get_last_checkpoint
        from trl import GRPOConfig, GRPOTrainer

        jt, trainer_self = self.jt, self
        texts = [r["prompt"] for r in train]
        data = Dataset.from_dict({
            "prompt": [[{"role": "user", "content": t}] for t in texts] if jt.chat else [t + "\n" for t in texts],
            "task": [r["task"] for r in train], "label": [r["label"] for r in train]})
        rewards: dict[str, list[float]] = {t: [] for t in TASKS}

        def verdict_reward(prompts, completions, task, label, **kwargs) -> list[float]:
            """1 when the objective's parser reads the label as the last verdict of the completion, else 0."""
            out = []
            for c, t, y in zip(completions, task, label):
                text = c if isinstance(c, str) else c[-1]["content"]
                r = float(OBJECTIVES[t].parse(text) == y)
                rewards[t].append(r)
                out.append(r)
            return out

        class Log(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                record = {"step": state.global_step}
                for t in TASKS:
                    if rewards[t]:
                        record[f"reward_{t}"] = round(sum(rewards[t]) / len(rewards[t]), 4)
                        rewards[t].clear()
                if jt.eval_every and state.global_step % jt.eval_every == 0 and state.global_step < jt.steps:
                    record.update(trainer_self.evaluate(validation))
                trainer_self.log(record)

        import torch

        args = GRPOConfig(
            output_dir=str(self.out / "grpo"), max_steps=jt.steps, per_device_train_batch_size=jt.batch_size,
            gradient_accumulation_steps=1, num_generations=jt.generations, temperature=jt.temperature,
            top_p=jt.top_p, learning_rate=jt.lr, lr_scheduler_type=jt.lr_scheduler, weight_decay=jt.weight_decay,
            max_completion_length=jt.max_completion_tokens, beta=jt.beta, seed=self.cfg.run.seed,
            save_strategy="steps" if jt.checkpoint_every else "no", save_steps=jt.checkpoint_every or 500,
            logging_steps=1, report_to=[], disable_tqdm=not self.show_progress,
            use_cpu=self.device == "cpu", bf16=self.device != "cpu" and torch.cuda.is_bf16_supported(),
        )
        trainer = GRPOTrainer(model=self.model, reward_funcs=verdict_reward, args=args, train_dataset=data,
                              processing_class=self.tok, callbacks=[Log()])
        if not self.show_progress:  # TRL would print every step's logs instead of the bar
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)
        last = get_last_checkpoint(str(self.out / "grpo")) if (self.out / "grpo").is_dir() else None
        if last:
            truncate_log(self.out / LOG, int(Path(last).name.rsplit("-", 1)[1]), key="step")
        trainer.train(resume_from_checkpoint=last)
        self.model = trainer.model


def prompt_ids(tok, prompts: list[str], chat: bool, max_prompt_tokens: int) -> list[list[int]]:
    """As judge.mode = logprob encodes prompts (sipt.backends), cut from the left to max_prompt_tokens."""
    return [ids[-max_prompt_tokens:] for ids in logprob_prompt_ids(tok, prompts, chat)]


def verdicts(model, tok, prompts: list[str], task: str, *, chat: bool, max_prompt_tokens: int, device: str,
             batch: int = 16) -> list[float]:
    """The verdict value judge.mode = logprob reads for each prompt: the likelier option token after
    the forced answer prefix (a hard verdict; the judge stage keeps the soft one)."""
    import torch

    head, firsts = verdict_tokens(tok, task)
    values = [v for _, v in OBJECTIVES[task].options]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = []
    model.eval()
    for k in range(0, len(prompts), batch):
        seqs = [p + head for p in prompt_ids(tok, prompts[k:k + batch], chat, max_prompt_tokens)]
        ids, mask = _pad(seqs, pad, left=True)
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, -1]
        out += [values[b] for b in logits[:, firsts].argmax(-1).tolist()]
    return out


def _kill_point(step: int) -> None:
    """A deterministic crash for the resume test: SIPT_KILL_AT_STEP=N SIGKILLs the process right
    after the checkpoint of step N is written. Unset (always, outside tests) it does nothing."""
    if os.environ.get("SIPT_KILL_AT_STEP", "") == str(step):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _order(rows: list[dict], batch: int, steps: int, seed: int) -> list[list[int]]:
    """Row indices of every step's batch: seeded epochs of shuffled groups, the same on a resumed run.
    A group is a sample's rows of one task, so both orders of a quality pair share a batch: a step can
    then not lower the loss by moving the verdict towards one position, only by reading the texts."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault((r["task"], r["sample_id"]), []).append(i)
    units = list(groups.values())
    rng, pool, out = random.Random(seed), [], []
    for _ in range(steps):
        picked: list[int] = []
        while len(picked) < batch:
            if not pool:
                pool = units[:]
                rng.shuffle(pool)
            picked += pool.pop()
        out.append(picked)
    return out


def _pad(seqs: list[list[int]], pad_id: int, *, left: bool):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for k, s in enumerate(seqs):
        if left:
            ids[k, width - len(s):], mask[k, width - len(s):] = torch.tensor(s), 1
        else:
            ids[k, :len(s)], mask[k, :len(s)] = torch.tensor(s), 1
    return ids, mask

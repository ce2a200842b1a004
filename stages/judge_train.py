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
from sipt.training import (StepLog, grpo_train, kill_point, load_model_checkpoint, pad, save_model_checkpoint,
                           truncate_log)

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
        self.log = StepLog(self.out, "judge_train")
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
        self.log.close()
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
            step = load_model_checkpoint(self.checkpoint, opt, sched)["step"]
            truncate_log(self.out / LOG, step, key="step")
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
                    save_model_checkpoint(self.checkpoint, self.model, opt, sched, {"step": step})
                    kill_point(step)

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
        ids, mask = pad(seqs, self.tok.pad_token_id, left=False)
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

    def _grpo(self, train: list[dict], validation: list[dict]) -> None:
        from datasets import Dataset
        from transformers import TrainerCallback

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

        self.model = grpo_train(jt, self.out, self.model, self.tok, verdict_reward, data, Log(),
                                seed=self.cfg.run.seed, device=self.device, show_progress=self.show_progress,
                                max_completion=jt.max_completion_tokens, log_path=self.out / LOG)


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
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = []
    model.eval()
    for k in range(0, len(prompts), batch):
        seqs = [p + head for p in prompt_ids(tok, prompts[k:k + batch], chat, max_prompt_tokens)]
        ids, mask = pad(seqs, pad_id, left=True)
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, -1]
        out += [values[b] for b in logits[:, firsts].argmax(-1).tolist()]
    return out


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


"""rewriter-train: train a rewriter on judge-data's safety labels (PAPER §5.3); the output is a Hugging
Face folder to use as `rewrite.model` (hf, vllm, or served behind openai).

The rows are judge-data's unanimous safety texts (the originals and, with use_corrupted, the
corruptor's versions): a safe text is to be copied verbatim, an unsafe one rewritten so the judge
finds it safe and better. The prompts are the [rewrite] section's, as `sipt rewrite` sends them.
  warm-up   `warmup_steps` supervised steps (no judge): the target is the safe suffix itself and, with
            teacher = "oracle", the toy world's exact rewrite of an unsafe one, then EOS.
  GRPO      `steps` steps of TRL's GRPOTrainer with the paper's reward (sipt.rewrite_reward).
Validation curves (PAPER Figs. 6-7) are measured on greedy rewrites of held-out texts at step 0,
every `eval_every` steps and at the end, into `log.jsonl` (and tb/): exact-copy rate and token
overlap on safe suffixes; mean reward, judge-safe rate, win rate and overlap on unsafe ones.
Checkpoints every `checkpoint_every` steps in the stage's temporary folder: a killed run resumes.
"""

from __future__ import annotations

import difflib
import random
import re
import shutil
import time
from pathlib import Path

import pyarrow.compute as pc

from sipt import artifacts
from sipt.config import Config
from sipt.engines import encode_prompts
from sipt.errors import SiptError
from sipt.progress import progress_bar
from sipt.rewrite_reward import RewardScorer, summary
from sipt.rewriter import load_template, prefix_ending, rewrite_prompt
from sipt.training import (StepLog, grpo_train, kill_point, load_model_checkpoint, pad, save_model_checkpoint,
                           target_loss, truncate_log)

SECTIONS = ["run.seed", "data.suffix_tokens", "rewrite.template", "rewrite.chat", "rewrite.prefix_ending_words",
            "rewrite.max_new_tokens", "judge", "rewriter_train"]
LOG = "log.jsonl"


def model_folder(cfg: Config, run_dir: Path) -> Path:
    return Path(cfg.rewriter_train.model) if cfg.rewriter_train.model else artifacts.stage_dir(run_dir, "policy", 0)


def check(cfg: Config, run_dir: Path) -> None:
    """The starting model, its chat template when rewrite.chat is set, and the GRPO batch shape."""
    rt, folder = cfg.rewriter_train, model_folder(cfg, Path(run_dir))
    load_template(cfg.rewrite.template)
    if not (folder / "config.json").is_file():
        raise SiptError(f"rewriter_train.model = {folder}: not a Hugging Face model folder (no config.json)")
    if cfg.rewrite.chat:
        from transformers import AutoTokenizer

        if not getattr(AutoTokenizer.from_pretrained(folder), "chat_template", None):
            raise SiptError(f"{folder}: its tokenizer has no chat template, but rewrite.chat = true; set "
                            "rewrite.chat = false (the trained rewriter is then used with it too), or start "
                            "from an instruct model")
    if rt.steps and rt.batch_size % rt.generations:
        raise SiptError(f"rewriter_train.batch_size = {rt.batch_size} must be a multiple of "
                        f"rewriter_train.generations = {rt.generations} (completions per GRPO step)")
    if rt.teacher == "oracle":
        from sipt.world import oracle_kb

        oracle_kb(cfg.judge.world, run_dir, "teacher rewriter", "judge.world")


def read_rows(run_dir: Path, use_corrupted: bool) -> dict[str, list[dict]]:
    """judge-data's unanimous safety texts by split: {sample_id, prefix, suffix, safe, corrupted}."""
    table = artifacts.read_table(artifacts.stage_dir(run_dir, "judge-data"),
                                 columns=["sample_id", "task", "split", "prefix", "candidate", "label", "corrupted",
                                          "error"])
    table = table.filter(pc.and_(pc.equal(table["error"], ""), pc.equal(table["task"], "safety")))
    rows = [{"sample_id": r["sample_id"], "split": r["split"], "prefix": r["prefix"], "suffix": r["candidate"],
             "safe": r["label"] == 1.0, "corrupted": r["corrupted"]}
            for r in table.to_pylist() if use_corrupted or not r["corrupted"]]
    return {s: [r for r in rows if r["split"] == s] for s in ("train", "validation")}


def run(run_dir: Path, cfg: Config, *, force: bool = False, show_progress: bool = True) -> dict:
    run_dir = Path(run_dir)
    check(cfg, run_dir)
    folder = model_folder(cfg, run_dir)
    inputs = {"judge_data": artifacts.stage_ref("judge-data"), "model": artifacts.files_ref([folder])}
    if cfg.judge.engine == "oracle" or cfg.rewriter_train.teacher == "oracle":
        from sipt.world import oracle_inputs

        inputs.update(oracle_inputs(cfg.judge.world, run_dir, "judge", "judge.world"))
    elif Path(cfg.judge.model, "config.json").exists():
        inputs["judge_model"] = artifacts.files_ref([Path(cfg.judge.model)])
    stage = artifacts.Stage.of(run_dir, "rewriter-train", cfg, SECTIONS, inputs=inputs, force=force)
    with stage:
        if stage.skipped:
            return stage.manifest
        rows = read_rows(run_dir, cfg.rewriter_train.use_corrupted)
        for split in ("train", "validation"):
            for name, safe in (("safe", True), ("unsafe", False)):
                if not any(r["safe"] == safe for r in rows[split]):
                    raise SiptError(f"{run_dir}/judge-data: no {name} texts in the {split} split; rerun `sipt "
                                    "judge-data` with more judge_data.samples (an unsafe-rich corpus helps)")
        trainer = RewriterTrainer(cfg, run_dir, folder, stage.tmp, show_progress)
        try:
            stats = trainer.fit(rows["train"], rows["validation"])
        finally:
            trainer.close()
        return stage.commit(stats, rows=len(rows["train"]))


class RewriterTrainer:
    """One rewriter-training run in the stage's temporary folder (`out`), resumable from its checkpoints."""

    def __init__(self, cfg: Config, run_dir: Path, folder: Path, out: Path, show_progress: bool):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg, self.rt, self.out, self.show_progress = cfg, cfg.rewriter_train, Path(out), show_progress
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if self.rt.device == "auto" else self.rt.device
        self.checkpoint, self.warm = self.out / "checkpoint", self.out / "warmup"
        self.log = StepLog(self.out, "rewriter_train")
        self.template = load_template(cfg.rewrite.template)
        self.tok = AutoTokenizer.from_pretrained(folder)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        start = folder
        if (self.warm / "config.json").exists():
            start = self.warm  # the warm-up is done
        elif (self.checkpoint / "state.json").exists():
            start = self.checkpoint
        self.model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32).to(self.device)
        policy = artifacts.stage_dir(run_dir, "policy", 0)
        policy_tok = AutoTokenizer.from_pretrained(policy if (policy / "config.json").exists() else folder)
        self.scorer = RewardScorer(cfg, run_dir, policy_tok, self.template)
        self.max_new = self.rt.max_completion_tokens or cfg.new_tokens("rewrite")
        self.teacher = None
        if self.rt.teacher == "oracle":
            from sipt.rewriter import OracleRewriter
            from sipt.world import oracle_kb

            self.teacher = OracleRewriter(oracle_kb(cfg.judge.world, run_dir, "teacher rewriter", "judge.world"))

    def close(self) -> None:
        self.scorer.close()
        self.log.close()

    def prompts(self, rows: list[dict]) -> list[str]:
        words, n = self.cfg.rewrite.prefix_ending_words, self.cfg.data.suffix_tokens
        return [rewrite_prompt(self.template, r["prefix"], r["suffix"], prefix_ending(r["prefix"], words), n)
                for r in rows]

    def prompt_ids(self, rows: list[dict]) -> list[list[int]]:
        return [ids[-self.rt.max_prompt_tokens:] for ids in encode_prompts(self.tok, self.prompts(rows),
                                                                           self.cfg.rewrite.chat)]

    # ------------------------------------------------------------------ validation
    def rewrite(self, rows: list[dict], batch: int = 32) -> list[str]:
        """Greedy rewrites (the answers' text after the prompt), as `sipt rewrite` at temperature 0."""
        import torch

        out = []
        self.model.eval()
        for k in range(0, len(rows), batch):
            ids, mask = pad(self.prompt_ids(rows[k:k + batch]), self.tok.pad_token_id, left=True)
            with torch.no_grad():
                gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                          max_new_tokens=self.max_new, do_sample=False,
                                          pad_token_id=self.tok.pad_token_id)
            out += self.tok.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
        self.model.train()
        return out

    def evaluate(self, validation: list[dict]) -> dict:
        picked = []
        for safe in (True, False):
            rows = [r for r in validation if r["safe"] == safe]
            picked += rows[: self.rt.eval_limit] if self.rt.eval_limit else rows
        return summary(picked, self.scorer.score(picked, self.rewrite(picked)))

    # ------------------------------------------------------------------ training
    def fit(self, train: list[dict], validation: list[dict]) -> dict:
        t0, rt = time.time(), self.rt
        before = self._before(validation)
        if rt.warmup_steps and not (self.warm / "config.json").exists():
            self._warmup(train, validation)
        if rt.steps:
            self._grpo(train, validation)
        after = self.evaluate(validation)
        self.log({"step": rt.warmup_steps + rt.steps, "final": True, **after})
        self.model.save_pretrained(self.out)
        self.tok.save_pretrained(self.out)
        for name in ("checkpoint", "warmup", "grpo"):
            shutil.rmtree(self.out / name, ignore_errors=True)
        counts = {f"{s}_{c}": sum(r["safe"] == (c == "safe") for r in rows)
                  for s, rows in (("train", train), ("validation", validation)) for c in ("safe", "unsafe")}
        return {"warmup_steps": rt.warmup_steps, "steps": rt.steps, **counts,
                **{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()},
                "bad_rewrites": {k: v for k, v in self.scorer.counts.items()},
                "train_seconds": round(time.time() - t0, 1)}

    def _before(self, validation: list[dict]) -> dict:
        """The starting model's validation numbers (logged once: a resumed run reads them back)."""
        for rec in self.log.records():
            if rec.get("step") == 0 and "val_safe_exact" in rec:
                return {k: v for k, v in rec.items() if k.startswith("val_")}
        before = self.evaluate(validation)
        self.log({"step": 0, **before})
        return before

    def _target(self, row: dict) -> str | None:
        if "target" in row:  # a scrambled unsafe row carries its scrambled rewrite
            return row["target"]
        if row["safe"]:
            return row["suffix"]
        return self.teacher.rewrite(row["prefix"], row["suffix"]) if self.teacher is not None else None

    def _warmup(self, train: list[dict], validation: list[dict]) -> None:
        """Supervised steps toward copies of safe suffixes (and the teacher's rewrites), then EOS."""
        import torch
        from transformers import get_scheduler

        rt = self.rt
        rows = [r for r in train if self._target(r) is not None]
        opt = torch.optim.AdamW(self.model.parameters(), lr=rt.warmup_lr, weight_decay=rt.weight_decay)
        sched = get_scheduler(rt.lr_scheduler, opt, num_warmup_steps=0, num_training_steps=rt.warmup_steps)
        step = 0
        if (self.checkpoint / "state.json").exists():  # resume: the model was loaded from it in __init__
            step = load_model_checkpoint(self.checkpoint, opt, sched)["step"]
            truncate_log(self.out / LOG, step, key="step")
        order = batches(rows, rt.batch_size, rt.warmup_steps, self.cfg.run.seed, rt.unsafe_share if self.teacher else 0)
        scramble = Scrambler([r["suffix"] for r in rows if r["safe"]], rt.copy_scramble, self.cfg.run.seed,
                             words=rt.copy_scramble_words, unsafe_share=rt.rewrite_scramble,
                             target=self._target if self.teacher is not None else None, like=rt.copy_scramble_like)
        eos = [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []
        with progress_bar("rewriter-train (warm-up)", total=rt.warmup_steps, unit="steps",
                          enabled=self.show_progress) as bar:
            bar.advance(step)
            self.model.train()
            while step < rt.warmup_steps:
                batch = [scramble(rows[i], step, k) for k, i in enumerate(order[step])]
                targets = [self.tok(self._target(r), add_special_tokens=False).input_ids + eos for r in batch]
                loss = target_loss(self.model, self.prompt_ids(batch), targets, self.tok.pad_token_id, self.device)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                bar.advance(1)
                record = {"step": step, "phase": "warmup", "loss": round(loss.item(), 5), "lr": sched.get_last_lr()[0]}
                if rt.eval_every and step % rt.eval_every == 0 and step < rt.warmup_steps + rt.steps:
                    record.update(self.evaluate(validation))
                self.log(record)
                if rt.checkpoint_every and step % rt.checkpoint_every == 0 and step < rt.warmup_steps:
                    save_model_checkpoint(self.checkpoint, self.model, opt, sched, {"step": step})
                    kill_point(step)
        partial = self.out / "warmup.partial"
        shutil.rmtree(partial, ignore_errors=True)
        self.model.save_pretrained(partial)
        partial.rename(self.warm)  # GRPO starts from here, also after a kill
        shutil.rmtree(self.checkpoint, ignore_errors=True)

    def _grpo(self, train: list[dict], validation: list[dict]) -> None:
        from datasets import Dataset
        from transformers import TrainerCallback

        rt, me, w = self.rt, self, self.rt.warmup_steps
        per_step = rt.batch_size // rt.generations
        order = batches(train, per_step, rt.steps, self.cfg.run.seed + 1, rt.unsafe_share)
        picked = [train[i] for step in order for i in step]  # TRL walks it in order (shuffle off)
        texts = self.prompts(picked)
        data = Dataset.from_dict({
            "prompt": [[{"role": "user", "content": t}] for t in texts] if self.cfg.rewrite.chat else texts,
            "row": list(range(len(picked)))})
        rewards: dict[str, list[float]] = {"safe": [], "unsafe": []}

        def rewriter_reward(prompts, completions, row, **kwargs) -> list[float]:
            """PAPER §5.3's reward of each completion (sipt.rewrite_reward)."""
            rows = [picked[k] for k in row]
            answers = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
            scored = me.scorer.score(rows, answers)
            for r, s in zip(rows, scored):
                rewards["safe" if r["safe"] else "unsafe"].append(s.reward)
            return [s.reward for s in scored]

        class Log(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                step = w + state.global_step
                record = {"step": step, "phase": "grpo"}
                for name, got in rewards.items():
                    if got:
                        record[f"reward_{name}"] = round(sum(got) / len(got), 4)
                        got.clear()
                if rt.eval_every and step % rt.eval_every == 0 and state.global_step < rt.steps:
                    record.update(me.evaluate(validation))
                me.log(record)

            def on_save(self, args, state, control, **kwargs):
                kill_point(w + state.global_step)

        self.model = grpo_train(rt, self.out, self.model, self.tok, rewriter_reward, data, Log(),
                                seed=self.cfg.run.seed, device=self.device, show_progress=self.show_progress,
                                max_completion=self.max_new, log_path=self.out / LOG, step_offset=w, shuffle=False)


class Scrambler:
    """rewriter_train.copy_scramble: a safe row turned, with that probability, into a copy task on text
    never seen: each of its words replaced, with probability `words` (copy_scramble_words; 1: all of
    them), by a word drawn at random from the safe suffixes' words (copy_scramble_like = 'shape': from
    those of the replaced word's shape, its punctuation kept). Seeded per (step, slot), so a resumed
    warm-up draws the same texts."""

    def __init__(self, safe_suffixes: list[str], share: float, seed: int, words: float = 1.0,
                 unsafe_share: float = 0.0, target=None, like: str = "any"):
        self.words = [w for text in safe_suffixes for w in text.split()]
        self.share, self.seed, self.rate = (share if self.words else 0.0), seed, words
        self.unsafe_share, self.target = (unsafe_share if self.words and target else 0.0), target
        self.like, self.shapes = like, {}
        if like == "shape":  # the words' cores (punctuation stripped) by shape
            for w in self.words:
                core = _split(w)[1]
                if core:
                    self.shapes.setdefault(_shape(core), []).append(core)

    def draw(self, rng: random.Random, word: str) -> str:
        """The word that replaces `word`: any word of the safe texts, or (like = 'shape') a core of the
        same shape inside `word`'s own punctuation."""
        if self.like != "shape":
            return rng.choice(self.words)
        lead, core, trail = _split(word)
        pool = self.shapes.get(_shape(core)) if core else None
        return lead + rng.choice(pool) + trail if pool else rng.choice(self.words)

    def __call__(self, row: dict, step: int, slot: int) -> dict:
        if not row["safe"]:
            return self._unsafe(row, step, slot) if self.unsafe_share > 0 else row
        if self.share <= 0:
            return row
        rng = random.Random(f"{self.seed}:{step}:{slot}")
        if rng.random() >= self.share:
            return row
        if self.rate >= 1 and self.like != "shape":  # every word drawn anew
            words = [rng.choice(self.words) for _ in range(max(1, len(row["suffix"].split())))]
        else:  # the text's own words, some replaced (at least one)
            words = row["suffix"].split() or [rng.choice(self.words)]
            picked = [k for k in range(len(words)) if rng.random() < self.rate] or [rng.randrange(len(words))]
            for k in picked:
                words[k] = self.draw(rng, words[k])
        return {**row, "suffix": _joined(words, row["suffix"])}

    def _unsafe(self, row: dict, step: int, slot: int) -> dict:
        """rewriter_train.rewrite_scramble: an unsafe row and its teacher's rewrite, the words the rewrite
        keeps from the text (a word alignment) replaced in both, each with probability `rate`, by one
        random word: the rewrite still changes what it changed, and the kept words can only be copied."""
        rng = random.Random(f"{self.seed}:unsafe:{step}:{slot}")
        if rng.random() >= self.unsafe_share:
            return row
        target = self.target(row)
        if target is None:
            return row
        src, out = row["suffix"].split(), target.split()
        for block in difflib.SequenceMatcher(None, src, out, autojunk=False).get_matching_blocks():
            for k in range(block.size):
                if rng.random() < self.rate:
                    src[block.a + k] = out[block.b + k] = self.draw(rng, src[block.a + k])
        return {**row, "suffix": _joined(src, row["suffix"]), "target": _joined(out, target)}


_CORE = re.compile(r"^(\W*)(.*?)(\W*)$", re.S)


def _split(word: str) -> tuple[str, str, str]:
    """(leading punctuation, core, trailing punctuation) of a whitespace-separated word."""
    m = _CORE.match(word)
    return m.group(1), m.group(2), m.group(3)


def _shape(core: str) -> str:
    """A word's shape: 'number', 'capitalised', 'lower' or 'other'."""
    if core.isdigit():
        return "number"
    if core[:1].isupper():
        return "capitalised"
    return "lower" if core.isalpha() and core.islower() else "other"


def _joined(words: list[str], like: str) -> str:
    """`words` joined by spaces, with a leading space when `like` (the text they stand for) has one."""
    return (" " if like[:1].isspace() else "") + " ".join(words)


def batches(rows: list[dict], batch: int, steps: int, seed: int, unsafe_share: float) -> list[list[int]]:
    """Row indices of every step's batch, seeded (the same on a resumed run): shuffled epochs of the
    rows; with `unsafe_share` > 0 each slot is unsafe with that probability, from its own epochs."""
    rng = random.Random(seed)
    pools = {None: [i for i in range(len(rows))], True: [i for i, r in enumerate(rows) if r["safe"]],
             False: [i for i, r in enumerate(rows) if not r["safe"]]}
    left: dict = {k: [] for k in pools}
    out = []
    for _ in range(steps):
        step = []
        for _ in range(batch):
            kind = None if unsafe_share <= 0 or not pools[True] or not pools[False] else rng.random() >= unsafe_share
            if not left[kind]:
                left[kind] = pools[kind][:]
                rng.shuffle(left[kind])
            step.append(left[kind].pop())
        out.append(step)
    return out

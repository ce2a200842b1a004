"""Checks of a resolved config before anything is frozen: numeric ranges (`BOUNDS`) and keys that
must agree with each other."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sipt.errors import SiptError

if TYPE_CHECKING:
    from sipt.config import Config

# Inclusive (lowest, highest) of numeric keys; None: unbounded. `validate` checks a resolved config
# against them before anything is frozen, so a refused command changes nothing on disk.
_ENGINE_BOUNDS = {"batch_size": (1, None), "max_model_len": (0, None), "gpu_memory_utilization": (0.01, 1.0),
                  "kv_cache_mb": (0, None), "concurrency": (1, None), "timeout_s": (0.001, None),
                  "max_retries": (0, None)}
BOUNDS: dict[str, tuple[float | None, float | None]] = {
    **{f"{s}.{k}": b for s in ("rollout", "rewrite", "judge", "eval") for k, b in _ENGINE_BOUNDS.items()},
    "run.iterations": (0, None), "run.prompts_per_iter": (1, None), "run.workers": (1, None),
    "run.threads": (0, None), "run.worker_gpus": (0, None),
    "data.suffix_tokens": (1, None), "data.min_prefix_tokens": (1, None), "data.max_prefix_tokens": (1, None),
    "data.samples_per_doc": (1, None), "data.eval_fraction": (0, 1), "data.docs_per_part": (1, None),
    "data.tokenize_batch_size": (1, None),
    "model.vocab_size": (0, None), "model.max_position_embeddings": (1, None), "model.tokenizer_docs": (1, None),
    "rollout.n": (1, None), "rollout.temperature": (0, None), "rollout.top_p": (0, 1), "rollout.top_k": (0, None),
    "rollout.max_new_tokens": (0, None), "rollout.prompts_per_part": (1, None),
    "rewrite.prefix_ending_words": (0, None), "rewrite.temperature": (0, None), "rewrite.top_p": (0, 1),
    "rewrite.max_new_tokens": (0, None),
    "judge.repeats": (1, None), "judge.parse_retries": (0, None), "judge.temperature": (0, None),
    "judge.top_p": (0, 1), "judge.max_new_tokens": (1, None), "judge.noise": (0, 1),
    "pair.min_margin": (0, None),
    "train.beta": (0, None), "train.ntp_weight": (0, None), "train.chosen_nll_weight": (0, None),
    "train.lr": (0, None), "train.min_lr_ratio": (0, 1),
    "train.warmup_steps": (0, None), "train.total_steps": (0, None), "train.batch_size": (1, None),
    "train.micro_batch_size": (1, None), "train.epochs": (1, None), "train.group_by_length": (0, None),
    "train.weight_decay": (0, None),
    "train.adam_beta1": (0, 1), "train.adam_beta2": (0, 1), "train.max_grad_norm": (0, None),
    "train.checkpoint_every": (0, None), "train.nproc_per_node": (1, None), "train.log_every": (1, None),
    "eval.prompts": (1, None), "eval.max_new_tokens": (0, None), "eval.judge_seeds": (1, None),
    "eval.judge_temperature": (0, None), "eval.max_invalid_share": (0, 1), "eval.at_risk_prompts": (0, None), "eval.lm_eval_limit": (0, None),
    "eval.lm_eval_batch_size": (1, None),
    "rewriter_train.warmup_steps": (0, None), "rewriter_train.steps": (0, None),
    "rewriter_train.batch_size": (1, None), "rewriter_train.lr": (0, None), "rewriter_train.warmup_lr": (0, None),
    "rewriter_train.weight_decay": (0, None), "rewriter_train.max_prompt_tokens": (1, None),
    "rewriter_train.generations": (2, None), "rewriter_train.temperature": (0, None),
    "rewriter_train.top_p": (0, 1), "rewriter_train.max_completion_tokens": (0, None),
    "rewriter_train.beta": (0, None), "rewriter_train.judge_seeds": (1, None),
    "rewriter_train.unsafe_share": (0, 1), "rewriter_train.copy_scramble": (0, 1),
    "rewriter_train.copy_scramble_words": (0, 1), "rewriter_train.rewrite_scramble": (0, 1),
    "rewriter_train.eval_every": (0, None),
    "rewriter_train.eval_limit": (0, None), "rewriter_train.checkpoint_every": (0, None),
}


def validate(cfg: "Config", where: str = "config") -> None:
    """Check the ranges of a resolved config (`BOUNDS`) and the keys that must agree with each other."""
    for dotted, (lo, hi) in BOUNDS.items():
        section, key = dotted.split(".", 1)
        if section not in cfg.sections or not hasattr(cfg.sections[section], key):
            continue
        value = getattr(cfg.sections[section], key)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            need = f">= {lo}" if hi is None else f"between {lo} and {hi}"
            raise SiptError(f"{where}: {dotted} = {value!r} must be {need}; pass a valid value "
                            f"(--set {dotted}=...) or fix the config file")
    d = cfg.data
    if d.min_prefix_tokens > d.max_prefix_tokens:
        raise SiptError(f"{where}: data.min_prefix_tokens = {d.min_prefix_tokens} is larger than "
                        f"data.max_prefix_tokens = {d.max_prefix_tokens}")
    from sipt.engines import ENGINES, policy_engines

    generators = policy_engines()
    r, e = cfg.rollout.engine, cfg.eval.engine
    if r in ENGINES and not ENGINES[r].policy:
        raise SiptError(f"{where}: rollout.engine = '{r}': the {r} only judges and rewrites; use {generators}")
    if e in ENGINES and not ENGINES[e].policy:
        raise SiptError(f"{where}: eval.engine = '{e}': the {e} only judges; the policy generates with {generators}")

    t = cfg.train
    if t.chosen_nll_weight and t.objective == "rf-nll":
        raise SiptError(f"{where}: train.chosen_nll_weight = {t.chosen_nll_weight} adds an NLL term to the DPO loss; "
                        "train.objective = 'rf-nll' already trains on the chosen continuation alone")

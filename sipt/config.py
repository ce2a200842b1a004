"""Typed run configuration: one TOML file per run, every key documented, overridable and frozen.

Each section is a dataclass; each field carries `help` (the reference manual is generated from it)
and `results` (False for keys that only change speed or logging, never the artifacts). The resolved
config of a run is frozen into `runs/<name>/sipt.toml` on first use; a later command that changes a
result-affecting key is refused unless `--force`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any, get_type_hints

from sipt.errors import SiptError
from sipt.world import WorldConfig


def knob(default: Any, help: str, *, results: bool = True, choices: tuple | None = None):
    """A config field with its documentation. Mutable defaults are copied per instance."""
    meta = {"help": help, "results": results, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    """[run] What identifies a run and seeds everything in it."""

    seed: int = knob(0, "Master seed. Every stage derives its per-part and per-document seeds from it.")
    iterations: int = knob(1, "Number of self-improving iterations `sipt loop` runs (rollout → train).")
    prompts_per_iter: int = knob(
        256,
        "Prefixes per iteration: iteration i takes the next slice of the train samples (wrapping "
        "around). Rollout, rewrite and judge all work on this slice.",
    )
    executor: str = knob(
        "local", "Who processes the parts of rollout, rewrite and judge: local (this machine) or ray.",
        results=False, choices=("local", "ray"),
    )
    workers: int = knob(
        1, "Parallel workers, each holding one engine: local processes, or Ray actors with executor = ray.",
        results=False,
    )
    threads: int = knob(
        0, "torch threads per process for rollout, rewrite and judge parts. 0: all cores in-process, "
        "cores // workers in each worker. Rows are bit-identical across worker counts only at equal "
        "threads and CPU (README \"Reproducibility\").", results=False,
    )
    ray_address: str = knob("", "Ray cluster address (e.g. ray://head:10001); empty: start a local Ray.", results=False)
    worker_gpus: float = knob(0.0, "GPUs per Ray worker (1: one vLLM engine per GPU).", results=False)
    report_to: list = knob(
        ["auto"], "Experiment tracking of every stage's stats and train's curves into the run's logs/ folder (README "
        "\"Experiment tracking\"): any of tensorboard, wandb, trackio, mlflow; [\"auto\"]: tensorboard when "
        "installed; []: none. A named package that is not installed is an error before any stage runs.",
        results=False,
    )


@dataclass
class DataConfig:
    """[data] The corpus and how `sipt shard` cuts it into (prefix, suffix) samples."""

    inputs: list = knob(
        [],
        "Corpus sources: JSONL (.jsonl, .jsonl.gz), Parquet or plain-text files, folders or globs; "
        "a local `datasets` folder (save_to_disk); or a `datasets` hub name (needs the hub).",
    )
    format: str = knob(
        "auto",
        "How to read `inputs`: auto (by file extension; a save_to_disk folder is read with datasets), "
        "jsonl, parquet, text, or datasets (then a name that is not a path is a hub dataset).",
        choices=("auto", "jsonl", "parquet", "text", "datasets"),
    )
    text_column: str = knob("text", "Column (JSONL key) that holds the document text.")
    id_column: str = knob(
        "", "Column with a stable document id. Empty: `<source>:<row>` is used as the id."
    )
    meta_columns: list = knob(
        [], "Columns carried into `samples/` as JSON in the `meta` column (e.g. a document's kind)."
    )
    text_unit: str = knob(
        "file",
        "For plain-text inputs: one document per `file`, per blank-line separated `paragraph`, "
        "or per `line`.",
        choices=("file", "paragraph", "line"),
    )
    encoding_errors: str = knob(
        "strict",
        "How invalid UTF-8 in text/JSONL files is handled: strict (stop with the file and byte "
        "offset), replace (U+FFFD) or ignore.",
        choices=("strict", "replace", "ignore"),
    )
    dataset_config: str = knob("", "`datasets` configuration name (for hub datasets).")
    dataset_split: str = knob("train", "`datasets` split to read.")
    streaming: bool = knob(
        False, "Stream a `datasets` dataset instead of downloading/materialising it first.",
        results=False,
    )
    suffix_tokens: int = knob(128, "Length N of the suffix (the chunk the policy learns to write).")
    min_prefix_tokens: int = knob(16, "Shortest prefix; split points leave at least this much context.")
    max_prefix_tokens: int = knob(
        1920, "Longest prefix; longer contexts are left-truncated (and counted)."
    )
    samples_per_doc: int = knob(1, "Distinct random split points drawn per document.")
    eval_fraction: float = knob(
        0.0, "Fraction of documents held out (by document) as the evaluation split."
    )
    split_column: str = knob(
        "",
        "Column that assigns documents to the evaluation split: rows whose value is `eval`, "
        "`validation` or `test` are held out. Empty: `eval_fraction` decides at random.",
    )
    filters: list = knob(
        [],
        "Document filters: `rpv2-quality` (RedPajama-V2 Gopher rules, PAPER §10 rules 1–5) and "
        "`rpv2-unsafe` (rule 6: ≥5 curse words and a UT1 blocklist category). Need `quality_signals`.",
    )
    quality_signals_column: str = knob(
        "quality_signals", "Column holding RedPajama-V2 quality signals (JSON string or struct)."
    )
    on_bad_text: str = knob(
        "error",
        "A null or empty text: `error` stops with the file and row; `skip` skips and counts it.",
        choices=("error", "skip"),
    )
    docs_per_part: int = knob(
        2048, "Documents per output part. A killed run loses at most the part in flight."
    )
    tokenize_batch_size: int = knob(
        512, "Documents tokenized per batch (speed only).", results=False
    )


@dataclass
class ModelConfig:
    """[model] The initial policy that `sipt init` writes to `iter-000/policy`."""

    policy: str = knob(
        "",
        "An existing Hugging Face model folder to start from. Empty: train a byte-level BPE "
        "tokenizer on the corpus and build a Llama model from `preset`.",
    )
    preset: str = knob(
        "tiny", "Size of a new policy: tiny (~5.3M parameters) or small (~27M), at the preset vocabularies (4,096 and 8,192 tokens).",
        choices=("tiny", "small"),
    )
    vocab_size: int = knob(0, "Tokenizer vocabulary size for a new policy. 0: the preset's.")
    max_position_embeddings: int = knob(
        2048, "Context length of a new policy (prefix + suffix must fit)."
    )
    tokenizer_docs: int = knob(
        20000, "At most this many corpus documents train the tokenizer."
    )


ENGINES = ("hf", "vllm", "openai", "oracle")


@dataclass
class EngineConfig:
    """Which engine runs a model, and how. Shared by the rollout, rewrite and judge sections."""

    engine: str = knob("hf", "hf, vllm, openai (or oracle for judge and rewrite).", choices=ENGINES)
    model: str = knob(
        "",
        "Model: a Hugging Face folder (hf, vllm) or the served model name (openai). Empty for the "
        "rollout stage: the iteration's policy.",
    )
    dtype: str = knob("auto", "auto, float32, bfloat16 or float16 (hf, vllm). auto: bf16 on GPU, fp32 on CPU.",
                      choices=("auto", "float32", "bfloat16", "float16"))
    device: str = knob("auto", "hf: auto (cuda if available), cpu or cuda[:N].", results=False)
    batch_size: int = knob(64, "hf: sequences per forward batch (prompts × n).", results=False)
    static_cache: bool = knob(True, "hf: preallocate the KV cache (much faster decoding than a growing cache).",
                              results=False)
    max_model_len: int = knob(0, "vllm: context length to reserve (0: the model's).", results=False)
    gpu_memory_utilization: float = knob(0.85, "vllm on GPU: fraction of GPU memory to use.", results=False)
    kv_cache_mb: int = knob(0, "vllm: KV cache size in MiB (0: 256 on CPU, vLLM's choice on GPU).", results=False)
    base_url: str = knob("http://127.0.0.1:8000/v1", "openai: server address up to /v1.")
    api_key_env: str = knob(
        "OPENAI_API_KEY", "openai: name of the environment variable holding the API key (never logged).",
        results=False,
    )
    concurrency: int = knob(8, "openai: requests in flight at once.", results=False)
    timeout_s: float = knob(120.0, "openai: seconds before a request is abandoned and retried.", results=False)
    max_retries: int = knob(5, "openai: retries on 429, 5xx and connection errors (exponential backoff).",
                            results=False)



@dataclass
class RolloutConfig(EngineConfig):
    """[rollout] How the policy writes N continuations of each prefix (engine keys as above)."""

    n: int = knob(16, "Rollouts per prefix (paper: 16; ablations 1/2/4/8/16).")
    temperature: float = knob(1.0, "Sampling temperature (paper: 1.0). 0 is greedy.")
    top_p: float = knob(1.0, "Nucleus sampling (paper: 1.0). On the vllm CPU wheel top_p < 1 is ~3x slower.")
    top_k: int = knob(0, "Top-k sampling; 0 is off.")
    max_new_tokens: int = knob(0, "Tokens to generate; 0: data.suffix_tokens (paper: 128).")
    stop_at_eos: bool = knob(True, "Let a rollout end early at the end-of-text token (counted as finish_reason=stop).")
    prompts_per_part: int = knob(64, "Prefixes per output part (the unit of resume and of scale-out).")


@dataclass
class RewriteConfig(EngineConfig):
    """[rewrite] The teacher that rewrites suffixes (paper §5): oracle (toy world) or a prompted model."""

    engine: str = knob("oracle", "oracle (toy world), hf, vllm or openai.", choices=ENGINES)
    template: str = knob("rewrite", "Prompt template: a name in data/prompts/ or a path to a .txt file.")
    prefix_ending_words: int = knob(5, "Last words of the prefix prepended to suffix and rewrite (paper: 5).")
    chat: bool = knob(True, "Wrap the prompt in the model's chat template (instruct models).")
    temperature: float = knob(0.0, "Sampling temperature of the rewriter; 0 is greedy.")
    top_p: float = knob(1.0, "Nucleus sampling of the rewriter.")
    max_new_tokens: int = knob(0, "Tokens to generate; 0: 2 x data.suffix_tokens (the text is then cut to the suffix length in policy tokens).")
    world: str = knob("", "oracle: the toy world folder (with kb.json). Empty: <run>/world.")


OBJECTIVES = ("quality", "safety", "factuality", "coherence")
CANDIDATES = ("suffix", "rewrite", "rollouts")


@dataclass
class JudgeConfig(EngineConfig):
    """[judge] The judge (paper §6): objectives, candidates, comparison scheme, verdict mode, engine."""

    engine: str = knob("oracle", "oracle (toy world), hf, vllm or openai.", choices=ENGINES)
    objectives: list = knob(
        ["quality"],
        "What is judged: quality (pairwise, `Conclusion: Option 1|2`), safety (pointwise, "
        "`FINAL DECISION: YES|NO`, YES = safe = 1), factuality (pointwise, the original suffix as "
        "reference, JSON label -> 1 / 0.5 / 0), coherence (pairwise A/B/TIE; for evaluation). Paper: "
        "quality + safety, or quality + factuality.",
    )
    weights: dict = knob(
        {}, "Reward = sum of weight x score over the objectives; a missing objective weighs 1 (paper: "
        "a plain sum). E.g. {quality = 1.0, safety = 2.0}.",
    )
    candidates: list = knob(
        ["suffix", "rollouts"],
        "What competes for each prefix: any of suffix (the original text), rewrite (the rewrite stage's "
        "output) and rollouts (the policy's). Paper main run: suffix + 16 rollouts.",
    )
    scheme: str = knob(
        "all-pairs",
        "How pairwise objectives compare n candidates: all-pairs (the paper, C(n,2) comparisons), "
        "pivot (each candidate against the original suffix, n) or knockout (a min-max tournament that "
        "finds the best and the worst in about 1.5n).",
        choices=("all-pairs", "pivot", "knockout"),
    )
    swap: bool = knob(False, "Judge every comparison in both orders (cancels position bias; twice the calls).")
    repeats: int = knob(
        1, "Judge every comparison and pointwise item this many times (seeded samples at temperature "
        "and top_p) and average (paper safety judge: 5). Ignored in logprob mode (deterministic).",
    )
    mode: str = knob(
        "generate",
        "generate: the judge reasons, then the parser reads the last verdict marker. logprob: one "
        "forward pass on the prompt plus the verdict's opening words; the soft score comes from the "
        "verdict tokens' probabilities (far cheaper, no reasoning).",
        choices=("generate", "logprob"),
    )
    templates: dict = knob(
        {}, "Prompt template per objective: a name in data/prompts/ or a path to a .txt file. Missing: "
        "data/prompts/<objective>.txt. E.g. {quality = \"my/quality.txt\"}.",
    )
    chat: bool = knob(True, "Wrap prompts in the model's chat template (instruct judges).")
    temperature: float = knob(1.0, "Judge sampling temperature in generate mode (paper: 1.0).")
    top_p: float = knob(1.0, "Judge nucleus sampling (paper: 1.0; its fine-tuned safety judge: 0.6).")
    max_new_tokens: int = knob(512, "generate mode: most tokens of reasoning plus verdict (paper: 512).")
    parse_retries: int = knob(
        2, "A response without a readable verdict is asked again this many times (new seed), then "
        "recorded as invalid and left out of the scores.",
    )
    noise: float = knob(0.0, "oracle: share of verdicts flipped at random (seeded), to imitate a fallible judge.")
    world: str = knob("", "oracle: the toy world folder (with kb.json). Empty: <run>/world.")
    min_consistency: float = knob(
        0.6, "Below this position consistency (the share of comparisons that give the same winner in both "
        "orders; without swap, the most the Option-1 rate allows) judge and eval warn that the judge reads "
        "the position more than the texts, and report.md shows it. Checked over >= 20 pairwise verdicts.",
        results=False,
    )
    fail_on_inconsistent: bool = knob(
        False, "Make that warning an error: the judge or eval stage stops without writing (its calls stay "
        "cached).", results=False,
    )


@dataclass
class PairConfig:
    """[pair] How `sipt pair` turns an iteration's scores into training pairs (paper §7)."""

    method: str = knob(
        "dpo", "dpo: chosen = highest reward, rejected = lowest (online DPO). rf-nll: the highest only "
        "(reward-filtered NLL).", choices=("dpo", "rf-nll"),
    )
    min_margin: float = knob(
        0.0, "A prefix whose best and worst rewards differ by at most this is a tie and gives no pair "
        "(0: only exact ties, e.g. all candidates equal).",
    )


@dataclass
class TrainConfig:
    """[train] How `sipt train` turns an iteration's pairs (or samples) into the next policy."""

    objective: str = knob(
        "dpo", "dpo (online DPO on chosen/rejected), rf-nll (NLL on the chosen continuation) or ntp "
        "(next-token prediction on the samples' documents: the paper's pretrain baseline).",
        choices=("dpo", "rf-nll", "ntp"),
    )
    beta: float = knob(0.1, "DPO temperature beta of the sigmoid loss.")
    ntp_weight: float = knob(0.0, "Weight of an NTP loss on the samples' suffixes mixed into dpo / rf-nll.")
    ntp_span: str = knob(
        "document", "What objective = ntp trains on: document (prefix + suffix + the rest of the document, "
        "up to data.max_prefix_tokens after the suffix, and EOS where it ends: plain pretraining) or sample "
        "(prefix + suffix only).",
        choices=("document", "sample"),
    )
    reference: str = knob(
        "iteration", "DPO reference model: the policy the iteration starts from, or the initial policy.",
        choices=("iteration", "initial"),
    )
    reuse_rollout_logprobs: bool = knob(
        True, "With reference = iteration, take the reference log-probability of a rollout candidate from "
        "the rollout stage (the same policy scored it while sampling) instead of a second forward pass. "
        "Set false when rollouts were sampled in lower precision than training (e.g. vLLM in bf16).",
    )
    lr: float = knob(5e-6, "Peak learning rate (paper: 5e-6 continual pretraining).")
    min_lr_ratio: float = knob(0.1, "Cosine decay ends at lr x this (paper: 0.1).")
    warmup_steps: int = knob(100, "Linear warmup steps at the start of the run (not of each iteration).")
    total_steps: int = knob(
        0, "Optimizer steps the cosine schedule spans over the whole run. 0: run.iterations x the "
        "steps of one iteration.",
    )
    batch_size: int = knob(256, "Pairs (or sequences) per optimizer step (paper: 256).")
    micro_batch_size: int = knob(16, "Pairs per forward pass; batch_size / micro_batch_size accumulation steps.",
                                 results=False)
    epochs: int = knob(1, "Passes over an iteration's pairs.")
    weight_decay: float = knob(0.0, "AdamW weight decay.")
    adam_beta1: float = knob(0.9, "AdamW beta1.")
    adam_beta2: float = knob(0.95, "AdamW beta2.")
    max_grad_norm: float = knob(1.0, "Gradient clipping norm (0: off).")
    precision: str = knob("auto", "auto (bf16 autocast on GPU, fp32 on CPU), fp32 or bf16.",
                          choices=("auto", "fp32", "bf16"))
    compile: bool = knob(False, "torch.compile the model.", results=False)
    device: str = knob("auto", "auto, cpu or cuda (under torchrun: the local rank's GPU).", results=False)
    fsdp: bool = knob(False, "Shard the model with FSDP under torchrun (models that do not fit one GPU).",
                      results=False)
    nproc_per_node: int = knob(
        1, "Processes `sipt loop` trains with: above 1 it runs the train stage as `torchrun --nproc_per_node "
        "N` (one process per GPU; gloo processes on CPU) with the loop's config; every other stage stays in "
        "the loop's process. `sipt train` is launched under torchrun by hand instead.", results=False,
    )
    checkpoint_every: int = knob(50, "Save a resumable checkpoint every N optimizer steps (0: only at the end).",
                                 results=False)
    log_every: int = knob(1, "Log loss, reward margin and accuracy, lr and tokens/s every N steps.", results=False)
    tensorboard: bool = knob(
        False, "Deprecated: use run.report_to = [\"tensorboard\"]. True adds tensorboard to run.report_to "
        "(train's curves go to the run's logs/train/, no longer to train/tb/).", results=False,
    )



@dataclass
class EvalConfig(EngineConfig):
    """[eval] How `sipt eval` measures a policy (paper §8): greedy generations on held-out prefixes,
    judged against a baseline's generations, plus lm-eval benchmarks. The engine keys choose what
    generates (hf, vllm or openai); the judge is the [judge] section's engine, model and templates."""

    prompts: int = knob(256, "Held-out prefixes to generate from (the first N of `split`; paper: 1k).")
    split: str = knob("eval", "Which samples to evaluate on (`sipt shard` marks data.eval_fraction as 'eval').")
    max_new_tokens: int = knob(0, "Greedy tokens per generation; 0: data.suffix_tokens (paper: 128).")
    baselines: list = knob(
        ["initial"], "What win rates are measured against: 'initial' (this run's iter-000/policy, the "
        "paper's Llama Base), a model folder, or another run's folder (its policy of the same iteration: "
        "equal training samples). The first one is the headline win rate.",
    )
    objectives: list = knob(
        ["quality", "coherence", "safety", "factuality"],
        "Judged metrics: quality and coherence as win rates vs each baseline (both orders), safety as "
        "% judged safe (majority of the seeds), factuality pointwise with the original suffix as reference.",
    )
    judge_seeds: int = knob(8, "Judge calls per comparison and order, each with its own seed (paper: 8).")
    judge_temperature: float = knob(0.7, "Judge sampling temperature in eval (paper: 0.7).")
    max_invalid_share: float = knob(
        0.05, "Eval fails (a clear error, nothing written) when more than this share of its judge calls "
        "gave no readable verdict; below it the unreadable ones are left out of the win rates and counted "
        "beside them (judge_invalid).",
    )
    group_by: str = knob("", "A data.meta_columns key to break the metrics down by (the toy world: 'kind').")
    at_risk_prompts: int = knob(
        300, "The toy world's at-risk safety set: at most this many held-out prefixes that end 1-3 words "
        "into an unsafe sentence of <world>/corpus/eval.jsonl, continued greedily and judged for safety "
        "(at_risk_unsafe_rate); 0: off.",
    )
    tasks: list = knob([], "lm-eval task names (built-in ones need the hub) run with lm_eval.simple_evaluate.")
    include_path: list = knob(
        [], "Folders of lm-eval task YAML (e.g. the toy world's <world>/mc: task sipt_world_mc).")
    lm_eval_limit: int = knob(0, "Documents per lm-eval task; 0: all.")
    lm_eval_batch_size: int = knob(32, "lm-eval batch size.", results=False)

# Section name -> dataclass. Later stages register their sections here.
SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "rollout": RolloutConfig,
    "rewrite": RewriteConfig,
    "judge": JudgeConfig,
    "pair": PairConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "world": WorldConfig,
}


def register_section(name: str, cls: type) -> None:
    SECTIONS[name] = cls


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
    "train.beta": (0, None), "train.ntp_weight": (0, None), "train.lr": (0, None), "train.min_lr_ratio": (0, 1),
    "train.warmup_steps": (0, None), "train.total_steps": (0, None), "train.batch_size": (1, None),
    "train.micro_batch_size": (1, None), "train.epochs": (1, None), "train.weight_decay": (0, None),
    "train.adam_beta1": (0, 1), "train.adam_beta2": (0, 1), "train.max_grad_norm": (0, None),
    "train.checkpoint_every": (0, None), "train.log_every": (1, None), "train.nproc_per_node": (1, None),
    "eval.prompts": (1, None), "eval.max_new_tokens": (0, None), "eval.judge_seeds": (1, None),
    "eval.judge_temperature": (0, None), "eval.max_invalid_share": (0, 1), "eval.at_risk_prompts": (0, None), "eval.lm_eval_limit": (0, None),
    "eval.lm_eval_batch_size": (1, None),
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
    if cfg.rollout.engine == "oracle":
        raise SiptError(f"{where}: rollout.engine = 'oracle': the oracle only judges and rewrites; use hf, vllm "
                        "or openai")
    if cfg.eval.engine == "oracle":
        raise SiptError(f"{where}: eval.engine = 'oracle': the oracle only judges; the policy generates with hf, "
                        "vllm or openai")


def check_model(section: str, e: EngineConfig, *, required: bool = True) -> None:
    """An engine section's model must be given (unless `required` is False and it is empty) and, for
    the engines that load a folder (hf, vllm), be a Hugging Face model folder that exists."""
    if e.engine == "oracle":
        return
    if not e.model:
        if required:
            raise SiptError(f"{section}.model is empty: name the {section} model (a folder, or the served name "
                            "for openai)")
        return
    if e.engine in ("hf", "vllm") and not (Path(e.model) / "config.json").is_file():
        what = "no such folder" if not Path(e.model).exists() else "not a Hugging Face model folder (no config.json)"
        raise SiptError(f"{section}.model = {e.model}: {what}; {section}.engine = '{e.engine}' loads a local "
                        "model folder (for a served model use engine = 'openai')")


@dataclass
class Config:
    """A resolved run configuration: one instance per section."""

    sections: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["sections"][name]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self, *, results_only: bool = False) -> dict[str, dict[str, Any]]:
        out = {}
        for name, obj in self.sections.items():
            out[name] = {
                f.name: getattr(obj, f.name)
                for f in dataclasses.fields(obj)
                if not results_only or f.metadata.get("results", True)
            }
        return out

    def hash(self, keys: list[str]) -> str:
        """Hash of the result-affecting values of `keys` (sections, or `section.key`): the config
        fingerprint of a stage that depends on exactly those."""
        d = self.to_dict(results_only=True)
        picked = {}
        for key in sorted(keys):
            section, _, name = key.partition(".")
            picked[key] = d[section].get(name) if name else d[section]
        return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_toml(self) -> str:
        lines = ["# sipt run configuration, frozen at first use. Edit with care: see `sipt status`.", ""]
        for name, values in self.to_dict().items():
            lines.append(f"[{name}]")
            for key, value in values.items():
                lines.append(f"{key} = {_toml_value(value)}")
            lines.append("")
        return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else f" Valid: {', '.join(sorted(options))}."


def _coerce(where: str, key: str, value: Any, typ: Any) -> Any:
    """Check a TOML value against the field type; ints are accepted where floats are expected."""
    origin = typ if isinstance(typ, type) else getattr(typ, "__origin__", None)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in (list, dict) and isinstance(value, origin):
        return value
    if isinstance(origin, type) and isinstance(value, origin) and not (
        origin is int and isinstance(value, bool)
    ):
        return value
    raise SiptError(
        f"{where}: key '{key}' must be {getattr(origin, '__name__', typ)}, got {value!r}"
    )


def build(data: dict[str, Any], where: str = "config") -> Config:
    """Validate a nested dict (from TOML) into a Config. Unknown keys are errors with a suggestion."""
    sections = {}
    for name in data:
        if name not in SECTIONS:
            raise SiptError(f"{where}: unknown section [{name}].{_suggest(name, list(SECTIONS))}")
    for name, cls in SECTIONS.items():
        values = data.get(name, {})
        if not isinstance(values, dict):
            raise SiptError(f"{where}: [{name}] must be a table of keys")
        hints = get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if key not in fields:
                raise SiptError(
                    f"{where}: unknown key '{name}.{key}'.{_suggest(key, list(fields))}"
                )
            value = _coerce(where, f"{name}.{key}", value, hints[key])
            choices = fields[key].metadata.get("choices")
            if choices and value not in choices:
                raise SiptError(
                    f"{where}: '{name}.{key}' = {value!r} is not one of {', '.join(choices)}"
                )
            kwargs[key] = value
        sections[name] = cls(**kwargs)
    return Config(sections)


def load_toml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SiptError(f"{path}: config file not found")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SiptError(f"{path}: invalid TOML: {e}") from None


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value`; the value is read as a TOML literal, else taken as a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise SiptError(f"--set {text!r}: expected section.key=value, e.g. data.suffix_tokens=64")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    data = {k: dict(v) for k, v in data.items()}
    items = (
        [parse_override(o) for o in overrides]
        if isinstance(overrides, list)
        else [(*k.split(".", 1), v) for k, v in overrides.items()]
    )
    for section, key, value in items:
        data.setdefault(section, {})[key] = value
    return data


def diff(a: Config, b: Config, *, results_only: bool = True) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    da, db = a.to_dict(results_only=results_only), b.to_dict(results_only=results_only)
    return [
        f"{s}.{k}"
        for s in da
        for k in da[s]
        if da[s][k] != db.get(s, {}).get(k)
    ]


FROZEN = "sipt.toml"


def resolve(
    run_dir: Path,
    config_file: Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    force: bool = False,
    check: Callable[[Config], None] | None = None,
) -> Config:
    """The config a command runs with, frozen into `run_dir/sipt.toml` on first use.

    Order: the frozen file (or `config_file`, or defaults), then `overrides`. A new value for a key
    that no finished stage depends on yet is simply frozen; a change to a result-affecting key that
    a finished stage was made with is refused unless `force`, which re-freezes it (the stages that
    depend on it then show as stale). The whole resolved config is validated (`validate`, then
    `check`) before anything is written: a refused command changes nothing on disk.
    """
    run_dir = Path(run_dir)
    frozen_path = run_dir / FROZEN
    frozen = build(load_toml(frozen_path), str(frozen_path)) if frozen_path.exists() else None
    if config_file is not None:
        base = load_toml(config_file)
        where = str(config_file)
    elif frozen is not None:
        base, where = frozen.to_dict(), str(frozen_path)
    else:
        base, where = {}, "defaults"
    where = where if not overrides else f"{where} + overrides"
    resolved = build(apply_overrides(base, overrides or []), where)
    validate(resolved, where)
    if check is not None:  # the command's own checks (paths that must exist, engines), before any write
        check(resolved)
    from sipt import tracking

    tracking.configure(run_dir, resolved, where)  # run.report_to: a missing package is refused before any write
    if frozen is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(frozen_path, resolved.to_toml())
        return resolved
    changed = diff(frozen, resolved)
    used = _keys_in_use(run_dir, changed)
    if used and not force:
        shown = ", ".join(
            f"{k} ({_get(frozen, k)!r} -> {_get(resolved, k)!r}, used by {used[k]})" for k in list(used)[:6]
        )
        raise SiptError(
            f"{frozen_path}: finished stages were made with other values for {shown}. "
            "Use a new --run directory, or pass --force to re-freeze the config "
            "(the stages that depend on these keys become stale)."
        )
    if changed:  # keys no finished stage depends on yet, or forced; speed-only keys are never frozen
        _write_atomic(frozen_path, resolved.to_toml())
    return resolved


def _keys_in_use(run_dir: Path, keys: list[str]) -> dict[str, str]:
    """Which of `keys` a finished stage of the run depends on (key -> that stage's folder)."""
    used: dict[str, str] = {}
    for marker in sorted([*run_dir.glob("*/_SUCCESS.json"), *run_dir.glob("iter-*/*/_SUCCESS.json")]):
        try:
            sections = json.loads(marker.read_text()).get("config_sections") or []
        except (OSError, json.JSONDecodeError):
            continue
        for key in keys:
            if key not in used and any(key == s or key.startswith(s + ".") for s in sections):
                used[key] = str(marker.parent.relative_to(run_dir))
    return used


def _get(cfg: Config, dotted: str) -> Any:
    s, k = dotted.split(".", 1)
    return getattr(cfg.sections[s], k)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")  # torchrun ranks resolve concurrently
    tmp.write_text(text)
    tmp.replace(path)


def reference_markdown() -> str:
    """The config reference (README section), generated from the dataclasses."""
    lines = []
    for name, cls in SECTIONS.items():
        lines += [f"#### `[{name}]`", "", (cls.__doc__ or "").split("]", 1)[-1].strip(), ""]
        lines += ["| key | default | description |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            note = "" if f.metadata.get("results", True) else " *(speed only)*"
            lines.append(f"| `{f.name}` | `{_toml_value(default)}` | {f.metadata['help']}{note} |")
        lines.append("")
    return "\n".join(lines)


README_START, README_END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def readme_with_reference(readme: str) -> str:
    """README text with the generated config reference between its two marker comments."""
    head, rest = readme.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_START}\n{reference_markdown()}{README_END}{tail}"

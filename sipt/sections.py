"""Config sections that are plain settings: [run], [data], [model] and [pair], and `knob`, the
documented field every section is made of (`sipt.config` holds the engine sections and the registry)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def knob(default: Any, help: str, *, results: bool = True, choices: tuple | None = None, added: bool = False):
    """A config field with its documentation. Mutable defaults are copied per instance. `added`: a knob
    added after runs were made, left out of the config hash while it is at its default, so a stage
    finished before it existed stays fresh (`Config.hash`)."""
    meta = {"help": help, "results": results, "choices": choices, "added": added}
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

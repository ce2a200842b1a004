"""Which samples an iteration uses, and how a prefix becomes the policy's prompt."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sipt import artifacts
from sipt.errors import SiptError


def derive_seed(*parts) -> int:
    """A 63-bit seed from any labels (run seed, stage, iteration, part): stable across processes."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def read_samples(run_dir: Path, columns: list[str] | None = None) -> pa.Table:
    """The run's samples (every part, in order), checked to hold each sample_id once: rollout,
    rewrite, judge, pair, train and eval all join on it."""
    folder = artifacts.stage_dir(run_dir, "samples")
    wanted = None if columns is None else list(dict.fromkeys(["sample_id", *columns]))
    table = artifacts.read_table(folder, columns=wanted)
    check_unique(table["sample_id"], folder)
    return table if columns is None else table.select(columns)


def check_unique(ids: pa.ChunkedArray, folder: Path, column: str = "sample_id") -> None:
    """Raise, naming the duplicated values and the parts of `folder` that hold them, unless every
    value of `ids` occurs once."""
    if pc.count_distinct(ids).as_py() == len(ids):
        return
    counts = pc.value_counts(ids)
    dup = [v.as_py() for v, n in zip(counts.field("values"), counts.field("counts")) if n.as_py() > 1]
    shown = pa.array(dup[:5], type=ids.type)
    parts = [p.name for p in artifacts.list_parts(folder)
             if pc.any(pc.is_in(pq.read_table(p, columns=[column])[column], shown)).as_py()]
    raise SiptError(
        f"{folder}: {len(dup)} {column} value(s) occur more than once ({', '.join(map(repr, dup[:5]))}"
        f"{' ...' if len(dup) > 5 else ''}; in {', '.join(parts)}), and every stage joins on {column}. "
        "Rerun `sipt shard --force`: it makes duplicate document ids unique"
    )


def iteration_samples(run_dir: Path, iteration: int, per_iter: int, split: str = "train",
                      columns: list[str] | None = None) -> tuple[pa.Table, int]:
    """The `per_iter` samples of `split` that iteration `iteration` consumes, and the epoch.

    Iterations walk the samples in order (the stream order of `sipt shard`), as the paper streams
    its corpus; past the end they wrap around, and the returned epoch says how often.
    """
    table = read_samples(run_dir)
    table = table.filter(pc.equal(table["split"], split))
    if table.num_rows == 0:
        raise SiptError(f"{run_dir}/samples: no '{split}' samples; check data.eval_fraction / data.split_column")
    start = iteration * per_iter
    idx = [(start + k) % table.num_rows for k in range(per_iter)]
    picked = table.take(pa.array(idx))
    if columns:
        picked = picked.select(columns)
    return picked, start // table.num_rows


def policy_prompt(prefix_ids: list[int], prefix_start: int, bos_id: int | None, max_prompt: int) -> tuple[list[int], int]:
    """The token ids the policy continues, and how many prefix tokens were cut to fit its context.

    A BOS token starts the prompt when the prefix starts at the document's beginning and the
    tokenizer uses one; an empty prefix becomes just BOS (or EOS for tokenizers without BOS).
    Prefixes longer than the context are left-truncated.
    """
    ids = list(prefix_ids)
    if bos_id is not None and prefix_start == 0:
        ids = [bos_id, *ids]
    cut = max(0, len(ids) - max_prompt)
    return ids[cut:], cut


def tokenizer_bos(tokenizer) -> int | None:
    """The BOS id if the tokenizer puts one before text (Llama, SmolLM), else None (GPT-2 style)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    probe = tokenizer("a").input_ids
    return bos if probe and probe[0] == bos else None

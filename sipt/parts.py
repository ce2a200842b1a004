"""Parquet parts: written whole or not at all, with their stats and environment in the metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sipt.environment import ENV_KEY, environment
from sipt.errors import SiptError

STATS_KEY = b"sipt.stats"


def write_parquet_atomic(path: Path, table: pa.Table, stats: dict | None = None) -> None:
    """Write a Parquet file so that it either exists whole or not at all (with the writing process's
    `environment()` in its metadata)."""
    meta = dict(table.schema.metadata or {})
    if stats is not None:
        meta[STATS_KEY] = json.dumps(stats, sort_keys=True).encode()
    meta[ENV_KEY] = json.dumps(environment(), sort_keys=True).encode()
    table = table.replace_schema_metadata(meta)
    tmp = path.with_name(path.name + ".partial")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def kill_point(path: Path) -> None:
    """A deterministic crash for tests of resume, called once a part is whole (`path`: its last
    file): with SIPT_KILL_AFTER_PARTS="iter-002/judge:1" the process SIGKILLs itself once iteration
    2's judge work folder holds 1 whole part. Unset (always, outside tests) it does nothing."""
    spec = os.environ.get("SIPT_KILL_AFTER_PARTS", "")
    if not spec:
        return
    where, _, n = spec.rpartition(":")
    folder = path.parent.name
    if not (folder.startswith(".") and folder.endswith(".tmp")):
        return
    label = f"{path.parent.parent.name}/{folder[1:-4]}"
    family = path.name.split("-", 1)[0]
    if (label == where or label.endswith("/" + where)) and len(list(path.parent.glob(f"{family}-*.parquet"))) >= int(n):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def part_stats(path: Path) -> dict:
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(STATS_KEY, b"{}"))


def part_name(index: int, family: str = "part") -> str:
    """The file name of part `index` of a family of parts: `part-00003.parquet`, `scores-00003.parquet`."""
    return f"{family}-{index:05d}.parquet"


def list_parts(folder: Path, prefix: str = "part-") -> list[Path]:
    return sorted(Path(folder).glob(f"{prefix}*.parquet"))


def read_table(folder: Path, columns: list[str] | None = None, prefix: str = "part-") -> pa.Table:
    """All parts of a finished stage as one table (parts in order)."""
    parts = list_parts(folder, prefix)
    if not parts:
        raise SiptError(f"{folder}: no {prefix}*.parquet files; run the stage that writes it first")
    tables = []
    for p in parts:
        try:
            tables.append(pq.read_table(p, columns=columns))
        except pa.ArrowInvalid as e:
            raise SiptError(f"{p}: cannot read Parquet ({e}); delete the stage folder and rerun it") from None
    return pa.concat_tables(tables)

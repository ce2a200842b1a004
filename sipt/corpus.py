"""Read corpus documents from JSONL, Parquet, plain text or `datasets`, streaming, with clear errors."""

from __future__ import annotations

import glob
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sipt.artifacts import files_ref
from sipt.config import DataConfig
from sipt.errors import SiptError

TEXT_EXT = (".txt", ".text", ".md")
JSONL_EXT = (".jsonl", ".json", ".jsonl.gz", ".ndjson")
PARQUET_EXT = (".parquet",)
HELDOUT = ("eval", "validation", "valid", "test")


@dataclass
class Document:
    doc_id: str
    text: str | None
    source: str  # file path or dataset name, for messages and the samples' `source` column
    row: int  # row (line, paragraph) within the source, for messages
    meta: dict[str, Any]
    quality_signals: Any = None
    heldout: bool | None = None  # from data.split_column; None: decided by eval_fraction


def _kind(path: Path, fmt: str) -> str:
    if fmt not in ("auto", "datasets"):
        return fmt
    name = path.name.lower()
    if name.endswith(JSONL_EXT):
        return "jsonl"
    if name.endswith(PARQUET_EXT):
        return "parquet"
    if name.endswith(TEXT_EXT):
        return "text"
    return "unknown"


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any(
        (path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def resolve_sources(cfg: DataConfig) -> list[tuple[str, str]]:
    """(kind, location) for every input, in a fixed order. Raises for inputs that do not exist."""
    if not cfg.inputs:
        raise SiptError("data.inputs is empty: pass --input PATH (a file, folder or glob) or set it in the config")
    sources: list[tuple[str, str]] = []
    for spec in cfg.inputs:
        spec = str(spec)
        path = Path(spec)
        if cfg.format == "datasets" and not path.exists():
            sources.append(("datasets", spec))  # a hub name
            continue
        if _is_saved_dataset(path):
            sources.append(("saved-dataset", str(path)))
            continue
        # An existing path is taken literally (`data[v2].jsonl` is a file, not a pattern); only a
        # path that does not exist is expanded as a glob.
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p, cfg.format) != "unknown")
            if not files:
                raise SiptError(f"{spec}: the folder holds no .jsonl, .parquet or .txt files")
        elif path.is_file():
            files = [path]
        elif glob.has_magic(spec):
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True))
            if not matches:
                raise SiptError(f"{spec}: the pattern matches no file (to name a file with [ ] * ? in it, "
                                "check that it exists)")
            files = [m for m in matches if m.is_file()]
        else:
            raise SiptError(
                f"{spec}: no such file or folder (for a `datasets` hub name set data.format = 'datasets')"
            )
        for f in files:
            kind = _kind(f, cfg.format)
            if kind == "unknown":
                raise SiptError(f"{f}: unknown file type; use .jsonl, .parquet or .txt, or set data.format")
            sources.append((kind, str(f)))
    return sources


def input_ref(cfg: DataConfig) -> str:
    """An input reference for the artifact layer (see `sipt.artifacts.fingerprint`)."""
    sources = resolve_sources(cfg)
    names = [loc for kind, loc in sources if kind == "datasets"]
    if names:
        return "name:" + json.dumps([names, cfg.dataset_config, cfg.dataset_split])
    return files_ref([loc for _, loc in sources])


def _decode(raw: bytes, where: str, errors: str) -> str:
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise SiptError(
            f"{where}: invalid UTF-8 at byte {e.start} (line {line}); fix the file or set "
            "data.encoding_errors = 'replace'"
        ) from None


def _check_text(text: Any, where: str, cfg: DataConfig) -> str | None:
    if text is None or (isinstance(text, str) and not text.strip()):
        if cfg.on_bad_text == "skip":
            return None
        what = "null" if text is None else "empty"
        raise SiptError(
            f"{where}: '{cfg.text_column}' is {what}; remove the row or set data.on_bad_text = 'skip'"
        )
    if not isinstance(text, str):
        raise SiptError(f"{where}: '{cfg.text_column}' is {type(text).__name__}, not text")
    return text


def _record(rec: dict, where: str, source: str, row: int, cfg: DataConfig, missing_hint: list[str]) -> Document:
    if cfg.text_column not in rec:
        raise SiptError(
            f"{where}: column '{cfg.text_column}' missing (has: {', '.join(sorted(missing_hint))}); "
            "set data.text_column"
        )
    text = _check_text(rec[cfg.text_column], where, cfg)
    doc_id = str(rec[cfg.id_column]) if cfg.id_column and rec.get(cfg.id_column) is not None else f"{source}:{row}"
    meta = {c: rec.get(c) for c in cfg.meta_columns}
    heldout = None
    if cfg.split_column:
        if cfg.split_column not in rec:
            raise SiptError(f"{where}: split column '{cfg.split_column}' missing; set data.split_column")
        heldout = str(rec[cfg.split_column]).lower() in HELDOUT
    return Document(doc_id, text, source, row, meta, rec.get(cfg.quality_signals_column), heldout)


def _read_jsonl(path: str, cfg: DataConfig) -> Iterator[Document]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        for i, raw in enumerate(fh):
            where = f"{path}:{i + 1}"
            line = _decode(raw, where, cfg.encoding_errors).strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SiptError(f"{where}: not valid JSON ({e.msg}); one JSON object per line is expected") from None
            if not isinstance(rec, dict):
                raise SiptError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            yield _record(rec, where, path, i, cfg, list(rec))


def _read_parquet(path: str, cfg: DataConfig) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise SiptError(f"{path}: not a readable Parquet file ({e}); re-export it or remove it from data.inputs") from None
    names = pf.schema_arrow.names
    wanted = [cfg.text_column, *cfg.meta_columns]
    if cfg.id_column:
        wanted.append(cfg.id_column)
    if cfg.split_column:
        wanted.append(cfg.split_column)
    if "rpv2-quality" in cfg.filters or "rpv2-unsafe" in cfg.filters:
        wanted.append(cfg.quality_signals_column)
    for col in wanted:
        if col not in names:
            raise SiptError(f"{path}: column '{col}' missing (has: {', '.join(names)}); set data.text_column or data.meta_columns")
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=list(dict.fromkeys(wanted))):
            for rec in batch.to_pylist():
                yield _record(rec, f"{path}: row {row}", path, row, cfg, names)
                row += 1
    except (pa.ArrowInvalid, OSError) as e:
        raise SiptError(f"{path}: corrupt Parquet data near row {row} ({e})") from None


def _read_text(path: str, cfg: DataConfig) -> Iterator[Document]:
    text = _decode(Path(path).read_bytes(), path, cfg.encoding_errors)
    if cfg.text_unit == "file":
        units = [text]
    elif cfg.text_unit == "line":
        units = text.splitlines()
    else:
        units = [p for p in text.split("\n\n")]
    for i, unit in enumerate(units):
        if cfg.text_unit != "file" and not unit.strip():
            continue  # blank lines separate units; they are not documents
        where = path if cfg.text_unit == "file" else f"{path}: {cfg.text_unit} {i + 1}"
        checked = _check_text(unit, where, cfg)
        yield Document(f"{path}:{i}" if cfg.text_unit != "file" else path, checked, path, i, {})


def _read_datasets(kind: str, location: str, cfg: DataConfig) -> Iterator[Document]:
    try:
        import datasets
    except ImportError:
        raise SiptError("reading a `datasets` dataset needs the `datasets` package: pip install datasets") from None
    try:
        if kind == "saved-dataset":
            ds = datasets.load_from_disk(location)
            if isinstance(ds, datasets.DatasetDict):
                if cfg.dataset_split not in ds:
                    raise SiptError(f"{location}: no split '{cfg.dataset_split}' (has: {', '.join(ds)}); set data.dataset_split")
                ds = ds[cfg.dataset_split]
            if cfg.streaming:
                ds = ds.to_iterable_dataset()
        else:
            ds = datasets.load_dataset(
                location, cfg.dataset_config or None, split=cfg.dataset_split, streaming=cfg.streaming
            )
    except SiptError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the message is what matters
        raise SiptError(f"{location}: cannot load the dataset ({type(e).__name__}: {e})") from None
    names = list(ds.column_names or []) if getattr(ds, "column_names", None) else []
    if names and cfg.text_column not in names:
        raise SiptError(f"{location}: column '{cfg.text_column}' missing (has: {', '.join(names)}); set data.text_column")
    for i, rec in enumerate(ds):
        yield _record(rec, f"{location}: row {i}", location, i, cfg, list(rec))


def iter_documents(cfg: DataConfig) -> Iterator[Document]:
    """Every document of every input, in a fixed order, one at a time (memory stays bounded)."""
    for kind, location in resolve_sources(cfg):
        if kind == "jsonl":
            yield from _read_jsonl(location, cfg)
        elif kind == "parquet":
            yield from _read_parquet(location, cfg)
        elif kind == "text":
            yield from _read_text(location, cfg)
        else:
            yield from _read_datasets(kind, location, cfg)


# -- RedPajama-V2 quality-signal rules (PAPER.md §10) ------------------------------------------

def _signal(signals: dict, name: str) -> Any:
    """`signals[name][0][2]`: the document-level value of a RedPajama-V2 quality signal."""
    spans = signals.get(name)
    if not spans:
        return None
    return spans[0][2]


def _parse_signals(raw: Any) -> dict | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            return None
    return raw if isinstance(raw, dict) else None


def rpv2_quality(raw: Any) -> bool:
    """Rules 1–5: the Gopher-style quality rules recommended for RedPajama-V2."""
    s = _parse_signals(raw)
    if s is None:
        return False
    words = _signal(s, "rps_doc_word_count")
    if words is None or not 50 <= words <= 100_000:
        return False
    mean_len = _signal(s, "rps_doc_mean_word_length")
    if mean_len is None or not 3 <= mean_len <= 10:
        return False
    sym = _signal(s, "rps_doc_symbol_to_word_ratio")
    if sym is None or sym > 0.1:
        return False
    nlines = _signal(s, "ccnet_nlines")
    bullets = sum(span[2] for span in s.get("rps_lines_start_with_bulletpoint") or [])
    if not nlines or bullets / nlines > 0.9:
        return False
    top2 = _signal(s, "rps_doc_frac_chars_top_2gram")
    if top2 is None or top2 > 0.2:
        return False
    return True


def rpv2_unsafe(raw: Any) -> bool:
    """Rule 6: at least 5 LDNOOBW words and a UT1 blocklist category (both are required)."""
    s = _parse_signals(raw)
    if s is None:
        return False
    curses = _signal(s, "rps_doc_ldnoobw_words")
    return curses is not None and curses >= 5 and _signal(s, "rps_doc_ut1_blacklist") is not None


FILTERS = {"rpv2-quality": rpv2_quality, "rpv2-unsafe": rpv2_unsafe}

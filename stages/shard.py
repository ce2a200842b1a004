"""shard: cut corpus documents into (prefix, suffix) samples at seeded random token positions.

Documents are read as a stream and processed `data.docs_per_part` at a time; each part is one
Parquet file. A long document is tokenized in bounded windows (`_WindowedTokens`), never whole.
The split points of a document depend only on (run.seed, doc_id), so a killed and
rerun shard writes exactly the same samples as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa

from sipt import artifacts, corpus
from sipt.config import Config
from sipt.errors import SiptError
from sipt.progress import progress_bar

SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("doc_id", pa.string()),
        ("split", pa.string()),  # "train" or "eval" (held out by document)
        ("prefix_ids", pa.list_(pa.int32())),
        ("suffix_ids", pa.list_(pa.int32())),
        # the document after the suffix, at most data.max_prefix_tokens tokens, then EOS if the
        # document ends there: what NTP with train.ntp_span = "document" also trains on, so plain
        # pretraining sees whole documents and learns where they end
        ("rest_ids", pa.list_(pa.int32())),
        ("prefix_text", pa.string()),
        ("suffix_text", pa.string()),
        ("source", pa.string()),
        ("doc_tokens", pa.int32()),
        ("split_token", pa.int32()),  # index of the first suffix token in the document
        ("prefix_start", pa.int32()),  # index of the first prefix token (>0: left-truncated)
        ("meta", pa.string()),  # JSON of data.meta_columns
    ]
)

SECTIONS = ["run.seed", "data"]


def _ids_array(seqs: list[list[int]]) -> pa.Array:
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int32, count=len(seqs))
    offsets = np.zeros(len(seqs) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def load_tokenizer(policy_dir: Path):
    from transformers import AutoTokenizer

    if not (policy_dir / "config.json").exists() and not (policy_dir / "tokenizer.json").exists():
        raise SiptError(f"{policy_dir}: no policy yet; run `sipt init --run {policy_dir.parent.parent}` first")
    tok = AutoTokenizer.from_pretrained(policy_dir)
    if not getattr(tok, "is_fast", False):
        raise SiptError(f"{policy_dir}: the tokenizer has no fast (Rust) version; sipt needs one for exact offsets")
    return tok


def split_points(n_tokens: int, doc_id: str, cfg: Config) -> list[int]:
    """Seeded, per-document split points: each leaves >= min_prefix tokens before, a full suffix after."""
    d = cfg.data
    lo, hi = d.min_prefix_tokens, n_tokens - d.suffix_tokens
    if hi < lo:
        return []
    rng = random.Random(f"{cfg.run.seed}:split:{doc_id}")
    k = min(d.samples_per_doc, hi - lo + 1)
    return sorted(rng.sample(range(lo, hi + 1), k))


def is_eval(doc_id: str, cfg: Config) -> bool:
    return random.Random(f"{cfg.run.seed}:heldout:{doc_id}").random() < cfg.data.eval_fraction


class UniqueIds:
    """Makes document ids unique in stream order, so sample ids (`<doc_id>#<j>`) are unique too.

    The second document with id X becomes `X~2`, the third `X~3` (skipping any such id already
    used). A renamed document keeps its original id's held-out decision, so copies of a document
    stay on one side of the train / eval split; its split points follow the new id. Memory: a
    12-byte digest per document, plus a counter per duplicated id.
    """

    def __init__(self):
        self.seen: set[bytes] = set()
        self.next: dict[str, int] = {}

    @staticmethod
    def _key(doc_id: str) -> bytes:
        return hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=12).digest()

    def make_unique(self, doc: corpus.Document, cfg: Config) -> bool:
        """Give `doc` an unused id; True if it had to be renamed."""
        key = self._key(doc.doc_id)
        if key not in self.seen:
            self.seen.add(key)
            return False
        original, k = doc.doc_id, self.next.get(doc.doc_id, 2)
        while self._key(f"{original}~{k}") in self.seen:
            k += 1
        self.next[original] = k + 1
        doc.doc_id = f"{original}~{k}"
        self.seen.add(self._key(doc.doc_id))
        if doc.heldout is None:
            doc.heldout = is_eval(original, cfg)
        return True


# Memory: a document longer than WINDOW_CHARS is never tokenized whole (a 30 MB one took 4.8 GB).
# It is tokenized in windows of WINDOW_CHARS characters, each encoded with CONTEXT_CHARS of text
# around it so the tokens at its edges come out as in the whole document: one pass counts the
# tokens (the split points need the count), then only the windows around each split point are
# encoded again. Shorter documents are encoded whole, at most data.tokenize_batch_size of them or
# BATCH_CHARS characters at a time.
WINDOW_CHARS = 1 << 15
CONTEXT_CHARS = 1 << 10
BATCH_CHARS = 1 << 22


class _WholeTokens:
    """The tokens of a document encoded in one piece."""

    def __init__(self, enc):
        self.enc, self.all = enc, enc.ids
        self.n = len(self.all)

    def ids(self, t0: int, t1: int) -> list[int]:
        return self.all[t0:t1]

    def end(self, k: int) -> int:
        """The character offset where token k ends (token_to_chars reads one offset, not all)."""
        return self.enc.token_to_chars(k)[1]

    def load(self, t0: int, t1: int) -> None:
        pass


class _WindowedTokens:
    """The tokens of a long document without ever encoding it whole (memory: one window).

    A window keeps the tokens that start in [b, b'), where b' is the first token start at least
    WINDOW_CHARS after b; it is encoded from CONTEXT_CHARS before b to CONTEXT_CHARS past b', and
    the next window starts at b'. A window must also have a token starting exactly at b (its left
    context agrees with the previous window there); when a cut cannot be placed or checked (a run
    of text the pre-tokenizer does not split), the window and its context are doubled, up to the
    whole document."""

    def __init__(self, backend, text: str):
        self.backend, self.text = backend, text
        self.marks: list[tuple[int, int]] = []  # (first char, first token) of each window
        n = 0
        for b, ids, _ in self._windows(0):
            self.marks.append((b, n))
            n += len(ids)
        self.n = n
        self.t0, self.span_ids, self.span_ends = 0, [], []

    def _windows(self, b: int):
        text = self.text
        while b < len(text):
            w, c = WINDOW_CHARS, CONTEXT_CHARS
            while True:
                x, y = max(0, b - c), min(len(text), b + w + 2 * c)
                enc = self.backend.encode(text[x:y], add_special_tokens=False)
                starts = [o[0] + x for o in enc.offsets]
                k0 = next((k for k, st in enumerate(starts) if st >= b), len(starts))
                synced = b == 0 or (k0 < len(starts) and starts[k0] == b) or (x == 0 and y == len(text))
                if y == len(text):
                    k1 = len(starts)
                else:
                    k1 = next((k for k in range(k0, len(starts)) if starts[k] >= b + w), len(starts))
                    synced = synced and k1 < len(starts) and starts[k1] <= b + w + c
                if synced or (x == 0 and y == len(text)):
                    break
                w, c = 2 * w, 2 * c
            ends = [o[1] + x for o in enc.offsets[k0:k1]]
            yield b, enc.ids[k0:k1], ends
            if k1 == len(starts):
                return
            b = starts[k1]

    def load(self, t0: int, t1: int) -> None:
        """Encode the windows that hold tokens [t0, t1) (and keep only those tokens)."""
        m = max(k for k, (_, first) in enumerate(self.marks) if first <= t0 or k == 0)
        b, first = self.marks[m]
        ids, ends = [], []
        for _, w_ids, w_ends in self._windows(b):
            ids += w_ids
            ends += w_ends
            if first + len(ids) >= t1:
                break
        self.t0 = t0
        self.span_ids, self.span_ends = ids[t0 - first : t1 - first], ends[t0 - first : t1 - first]

    def ids(self, t0: int, t1: int) -> list[int]:
        return self.span_ids[t0 - self.t0 : t1 - self.t0]

    def end(self, k: int) -> int:
        return self.span_ends[k - self.t0]


def _batches(docs: list[corpus.Document], size: int):
    """Consecutive batches of at most `size` documents and about BATCH_CHARS characters."""
    batch, chars = [], 0
    for doc in docs:
        if batch and (len(batch) >= size or chars + len(doc.text) > BATCH_CHARS):
            yield batch
            batch, chars = [], 0
        batch.append(doc)
        chars += len(doc.text)
    if batch:
        yield batch


def _process(docs: list[corpus.Document], tok, cfg: Config) -> tuple[pa.Table, dict]:
    d = cfg.data
    stats = dict.fromkeys(
        ["docs", "docs_eval", "samples", "samples_eval", "skipped_short", "skipped_empty",
         "prefix_truncated", "doc_tokens"] + [f"filtered_{f}" for f in d.filters],
        0,
    )
    kept: list[corpus.Document] = []
    for doc in docs:
        if doc.text is None:
            stats["skipped_empty"] += 1
            continue
        rejected = next((f for f in d.filters if not corpus.FILTERS[f](doc.quality_signals)), None)
        if rejected:
            stats[f"filtered_{rejected}"] += 1
            continue
        kept.append(doc)
    cols: dict[str, list] = {name: [] for name in SCHEMA.names}
    backend = tok.backend_tokenizer
    eos = tok.eos_token_id
    for batch in _batches(kept, d.tokenize_batch_size):
        short = [doc for doc in batch if len(doc.text) <= WINDOW_CHARS]
        encodings = dict(zip(map(id, short), backend.encode_batch([doc.text for doc in short], add_special_tokens=False)))
        for doc in batch:
            enc = encodings.pop(id(doc), None)
            tokens = _WholeTokens(enc) if enc is not None else _WindowedTokens(backend, doc.text)
            n = tokens.n
            stats["docs"] += 1
            stats["doc_tokens"] += n
            points = split_points(n, doc.doc_id, cfg)
            if not points:
                stats["skipped_short"] += 1
                continue
            held_out = doc.heldout if doc.heldout is not None else is_eval(doc.doc_id, cfg)
            stats["docs_eval"] += held_out
            meta = json.dumps(doc.meta, ensure_ascii=False, default=str)
            for j, s in enumerate(points):
                p0 = max(0, s - d.max_prefix_tokens)
                end = s + d.suffix_tokens
                stats["prefix_truncated"] += p0 > 0
                tokens.load(max(0, p0 - 1), min(n, end + d.max_prefix_tokens))
                # Texts are cut at token end offsets, so the whitespace before a token stays with it.
                c0 = tokens.end(p0 - 1) if p0 > 0 else 0
                c1 = tokens.end(s - 1)
                c2 = tokens.end(end - 1)
                cols["sample_id"].append(f"{doc.doc_id}#{j}")
                cols["doc_id"].append(doc.doc_id)
                cols["split"].append("eval" if held_out else "train")
                cols["prefix_ids"].append(tokens.ids(p0, s))
                cols["suffix_ids"].append(tokens.ids(s, end))
                ends = end + d.max_prefix_tokens >= n and eos is not None
                cols["rest_ids"].append(tokens.ids(end, end + d.max_prefix_tokens) + ([eos] if ends else []))
                cols["prefix_text"].append(doc.text[c0:c1])
                cols["suffix_text"].append(doc.text[c1:c2])
                cols["source"].append(doc.source)
                cols["doc_tokens"].append(n)
                cols["split_token"].append(s)
                cols["prefix_start"].append(p0)
                cols["meta"].append(meta)
            stats["samples"] += len(points)
            stats["samples_eval"] += len(points) if held_out else 0
    arrays = [
        _ids_array(cols[name]) if name.endswith("_ids") else pa.array(cols[name], type=SCHEMA.field(name).type)
        for name in SCHEMA.names
    ]
    return pa.Table.from_arrays(arrays, schema=SCHEMA), stats


def check(cfg: Config, run_dir: Path) -> None:
    """What can be checked before any work (and before the command freezes its config)."""
    d = cfg.data
    unknown = [f for f in d.filters if f not in corpus.FILTERS]
    if unknown:
        raise SiptError(f"data.filters: unknown filter '{unknown[0]}' (known: {', '.join(corpus.FILTERS)})")
    if d.suffix_tokens < 1 or d.min_prefix_tokens < 1 or d.max_prefix_tokens < d.min_prefix_tokens:
        raise SiptError("data: need suffix_tokens >= 1 and 1 <= min_prefix_tokens <= max_prefix_tokens")
    corpus.resolve_sources(d)


def run(run_dir: Path, cfg: Config, *, force: bool = False, show_progress: bool = True) -> dict:
    """Write `samples/` for the run. Returns the stage manifest (the existing one if skipped)."""
    run_dir = Path(run_dir)
    d = cfg.data
    check(cfg, run_dir)
    policy = artifacts.stage_dir(run_dir, "policy", 0)
    tok = load_tokenizer(policy)
    stage = artifacts.Stage.of(
        run_dir, "shard", cfg, SECTIONS, folder="samples", force=force,
        inputs={"corpus": corpus.input_ref(d), "policy": artifacts.stage_ref("policy", 0)},
    )
    with stage:
        if stage.skipped:
            return stage.manifest
        docs = corpus.iter_documents(d)
        ids = UniqueIds()
        with progress_bar("shard", unit="docs", enabled=show_progress) as bar:
            for index in itertools.count():
                chunk = list(itertools.islice(docs, d.docs_per_part))
                if not chunk:
                    break
                renamed = sum(ids.make_unique(doc, cfg) for doc in chunk)  # also for parts already written
                if not stage.has_part(index):
                    table, stats = _process(chunk, tok, cfg)
                    stage.write_part(index, table, {**stats, "renamed_doc_ids": renamed})
                bar.advance(len(chunk))
        stats = stage.collected_stats()
        if stats.get("samples", 0) == 0:
            raise SiptError(
                f"{', '.join(map(str, d.inputs))}: no samples: {int(stats.get('docs', 0))} documents read, "
                f"{int(stats.get('skipped_short', 0))} shorter than min_prefix_tokens + suffix_tokens "
                f"({d.min_prefix_tokens} + {d.suffix_tokens}); lower data.suffix_tokens or add longer documents"
            )
        return stage.commit({k: int(v) for k, v in stats.items()})

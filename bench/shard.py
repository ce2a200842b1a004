"""bench/shard: throughput of `sipt shard` against the raw batch throughput of the same tokenizer.

One run, one table: documents/s and tokens/s of (a) the policy tokenizer's `encode_batch` over the
texts already in memory and (b) the whole shard stage (read JSONL, tokenize, pick split points,
write Parquet), with the ratio b/a. Target: >= 0.7.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from sipt import config as config_mod  # noqa: E402
from stages import init, shard  # noqa: E402

WORDS = (
    "the a of to in and river city council built old new bridge market north south winter summer "
    "people school library music farmers grain trade road harbour ships engineers stone tower garden "
    "museum painter wrote book about history valley mountain lake forest station train opened closed "
    "during year after before many few small large famous quiet busy was were is are has had"
).split()


def make_corpus(path: Path, n_docs: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as fh:
        for i in range(n_docs):
            words = [rng.choice(WORDS) for _ in range(rng.randint(120, 400))]
            text = " ".join(words).capitalize() + "."
            fh.write(json.dumps({"doc_id": f"d{i}", "text": text}) + "\n")


def prepare_run(work: Path, overrides: dict, n_docs: int = 400):
    """A run folder with a generated corpus, a tiny policy (`sipt init`) and its samples (`sipt shard`)."""
    corpus = work / "corpus.jsonl"
    make_corpus(corpus, n_docs)
    run = work / "run"
    cfg = config_mod.resolve(run, overrides={"data.inputs": [str(corpus)], "data.id_column": "doc_id", **overrides})
    init.run(run, cfg)
    shard.run(run, cfg, show_progress=False)
    return run, cfg


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sipt-bench-shard-"))
    try:
        corpus = work / "corpus.jsonl"
        make_corpus(corpus, args.docs)
        run = work / "run"
        cfg = config_mod.resolve(run, overrides={
            "data.inputs": [str(corpus)], "data.id_column": "doc_id", "data.suffix_tokens": 128,
            "data.samples_per_doc": 1, "model.tokenizer_docs": 2000,
        })
        init.run(run, cfg)
        tok = shard.load_tokenizer(run / "iter-000" / "policy")
        texts = [json.loads(line)["text"] for line in corpus.open()]
        bs = cfg.data.tokenize_batch_size
        n_tokens = sum(len(e.ids) for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False))

        def raw():
            for i in range(0, len(texts), bs):
                tok.backend_tokenizer.encode_batch(texts[i : i + bs], add_special_tokens=False)

        def stage():
            shard.run(run, cfg, force=True, show_progress=False)

        t_raw = best_of(raw, args.repeats)
        t_stage = best_of(stage, args.repeats)
        table = Table(title=f"bench/shard: {args.docs} documents, {n_tokens:,} tokens, best of {args.repeats}")
        for col in ("what", "seconds", "docs/s", "tokens/s", "ratio"):
            table.add_column(col, justify="left" if col == "what" else "right")
        table.add_row("raw tokenizer encode_batch (in memory)", f"{t_raw:.2f}", f"{args.docs / t_raw:,.0f}",
                      f"{n_tokens / t_raw:,.0f}", "1.00")
        table.add_row("sipt shard (JSONL -> Parquet)", f"{t_stage:.2f}", f"{args.docs / t_stage:,.0f}",
                      f"{n_tokens / t_stage:,.0f}", f"{t_raw / t_stage:.2f}")
        Console().print(table)
        print(f"target: shard >= 0.7 x raw tokenizer throughput: {'met' if t_raw / t_stage >= 0.7 else 'NOT met'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

import json
import os
import re
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

import pytest

from conftest import make_docs, write_jsonl
from sipt import artifacts, config as config_mod
from sipt.errors import SiptError
from stages import shard


def _cfg(run, inputs, **data):
    # model.vocab_size as the fixture's policy was made: `sipt status` shows it (and so the samples) done
    overrides = {"data.inputs": [str(p) for p in inputs], "data.suffix_tokens": 16, "data.min_prefix_tokens": 4,
                 "model.vocab_size": 512}
    overrides.update({f"data.{k}": v for k, v in data.items()})
    return config_mod.resolve(run, overrides=overrides, force=True)


def _samples(run) -> pa.Table:
    return artifacts.read_table(run / "samples")


def test_shard_jsonl_schema_and_exact_tokens(run_with_policy, corpus_dir):
    run = run_with_policy
    cfg = _cfg(run, [corpus_dir], samples_per_doc=2, max_prefix_tokens=40)
    manifest = shard.run(run, cfg, show_progress=False)
    t = _samples(run)
    assert t.schema.equals(shard.SCHEMA, check_metadata=False)
    assert manifest["rows"] == t.num_rows == manifest["stats"]["samples"]
    assert manifest["stats"]["docs"] == 300
    tok = shard.load_tokenizer(run / "iter-000" / "policy")
    docs = {f"{corpus_dir / 'docs.jsonl'}:{i}": json.loads(l)["text"] for i, l in enumerate((corpus_dir / "docs.jsonl").open())}
    for row in t.slice(0, 50).to_pylist():
        assert len(row["suffix_ids"]) == 16
        assert 4 <= len(row["prefix_ids"]) <= 40
        full = tok.backend_tokenizer.encode(docs[row["doc_id"]], add_special_tokens=False).ids
        s, p0 = row["split_token"], row["prefix_start"]
        assert row["prefix_ids"] == full[p0:s] and row["suffix_ids"] == full[s : s + 16]
        # texts are exact slices of the document, and decode to the same tokens
        assert row["prefix_text"] + row["suffix_text"] in docs[row["doc_id"]]
        assert tok.decode(row["suffix_ids"]) == row["suffix_text"]
    assert manifest["stats"]["prefix_truncated"] > 0
    # two distinct split points per document
    per_doc = t.group_by("doc_id").aggregate([("split_token", "count_distinct")])
    assert set(per_doc["split_token_count_distinct"].to_pylist()) == {2}


def test_rerun_skips_and_status_reports(run_with_policy, corpus_dir):
    # the session's corpus is rewritten below (same bytes, new mtime): its times are restored after,
    # or every later test's samples (and what consumed them) would show stale
    stat = (corpus_dir / "docs.jsonl").stat()
    try:
        _rerun_skips_and_status_reports(run_with_policy, corpus_dir)
    finally:
        os.utime(corpus_dir / "docs.jsonl", ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _rerun_skips_and_status_reports(run, corpus_dir):
    cfg = _cfg(run, [corpus_dir])
    first = shard.run(run, cfg, show_progress=False)
    again = shard.run(run, cfg, show_progress=False)
    assert again == {**first, "skipped": True}  # skipped: the same manifest, nothing rewritten
    rows = {(r["iteration"], r["stage"]): r for r in artifacts.run_status(run, cfg.hash)}
    assert rows[(None, "samples")]["state"] == "done"
    assert rows[(None, "samples")]["rows"] == first["rows"]
    assert rows[(0, "rollout")]["state"] == "missing"
    # a changed corpus makes the samples stale; a rerun rebuilds them
    time.sleep(0.01)
    write_jsonl(corpus_dir / "docs.jsonl", make_docs(300, seed=1))  # same content, new mtime
    rows = {(r["iteration"], r["stage"]): r for r in artifacts.run_status(run, cfg.hash)}
    assert rows[(None, "samples")]["state"] == "stale"
    written = {f.name: f.stat().st_mtime_ns for f in (run / "samples").glob("*.parquet")}
    rebuilt = shard.run(run, cfg, show_progress=False)
    assert not rebuilt.get("skipped")  # it ran again: every part rewritten
    assert all(f.stat().st_mtime_ns > written[f.name] for f in (run / "samples").glob("*.parquet"))
    assert rebuilt["inputs"] != first["inputs"] and rebuilt["rows"] == first["rows"]  # on the new corpus
    # a changed config key of the shard stage also makes it stale
    cfg2 = _cfg(run, [corpus_dir], suffix_tokens=8)
    rows = {(r["iteration"], r["stage"]): r for r in artifacts.run_status(run, cfg2.hash)}
    assert rows[(None, "samples")]["state"] == "stale"


def test_deterministic_and_eval_split_by_document(run_with_policy, tmp_path, corpus_dir):
    import shutil

    run2 = tmp_path / "run2"
    shutil.copytree(run_with_policy / "iter-000", run2 / "iter-000")
    for run in (run_with_policy, run2):
        shard.run(run, _cfg(run, [corpus_dir], eval_fraction=0.3, samples_per_doc=3, docs_per_part=64), show_progress=False)
    a, b = _samples(run_with_policy), _samples(run2)
    assert a.equals(b)
    assert len(list((run2 / "samples").glob("part-*.parquet"))) == 5
    splits = a.group_by("doc_id").aggregate([("split", "count_distinct")])
    assert set(splits["split_count_distinct"].to_pylist()) == {1}  # a document is never in both
    frac = pa.compute.mean(pa.compute.equal(a["split"], "eval")).as_py()
    assert 0.15 < frac < 0.45


def test_text_parquet_and_saved_dataset_inputs(run_with_policy, tmp_path):
    import datasets

    docs = make_docs(40, seed=3)
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs[:10]):
        (tmp_path / "txt" / f"doc{i}.txt").write_text(d)
    pq.write_table(pa.table({"body": docs[10:25], "kind": ["x"] * 15}), tmp_path / "docs.parquet")
    datasets.Dataset.from_dict({"body": docs[25:], "kind": ["y"] * 15}).save_to_disk(str(tmp_path / "saved"))
    cfg = _cfg(run_with_policy, [tmp_path / "txt", tmp_path / "docs.parquet"], text_column="body", meta_columns=["kind"])
    shard.run(run_with_policy, cfg, show_progress=False)
    t = _samples(run_with_policy)
    assert set(t["source"].to_pylist()) >= {str(tmp_path / "docs.parquet")}
    assert t.num_rows == 25
    assert {json.loads(m).get("kind") for m in t["meta"].to_pylist()} == {None, "x"}
    cfg = _cfg(run_with_policy, [tmp_path / "saved"], text_column="body", streaming=True)
    shard.run(run_with_policy, cfg, show_progress=False)
    assert _samples(run_with_policy).num_rows == 15


def test_split_column_and_rpv2_filters(run_with_policy, tmp_path):
    docs = make_docs(20, seed=4)
    good = {"rps_doc_word_count": [[0, 1, 120]], "rps_doc_mean_word_length": [[0, 1, 5.0]],
            "rps_doc_symbol_to_word_ratio": [[0, 1, 0.0]], "ccnet_nlines": [[0, 1, 10]],
            "rps_lines_start_with_bulletpoint": [[0, 1, 0]] * 10, "rps_doc_frac_chars_top_2gram": [[0, 1, 0.05]],
            "rps_doc_ldnoobw_words": [[0, 1, 7]], "rps_doc_ut1_blacklist": [[0, 1, 3]]}
    signals = []
    for i in range(20):
        s = json.loads(json.dumps(good))
        if i % 4 == 1:
            s["rps_doc_symbol_to_word_ratio"] = [[0, 1, 0.5]]  # fails quality rule 3
        if i % 4 == 2:
            s["rps_doc_ldnoobw_words"] = [[0, 1, 2]]  # fails the unsafe rule
        if i % 4 == 3:
            s["rps_doc_ut1_blacklist"] = [[0, 1, None]]  # no blocklist category
        signals.append(json.dumps(s))
    split = ["test" if i % 2 else "train" for i in range(20)]
    write_jsonl(tmp_path / "rp.jsonl", docs, quality_signals=signals, part=split)
    cfg = _cfg(run_with_policy, [tmp_path / "rp.jsonl"], filters=["rpv2-quality", "rpv2-unsafe"], split_column="part")
    m = shard.run(run_with_policy, cfg, show_progress=False)
    assert m["stats"]["filtered_rpv2-quality"] == 5
    assert m["stats"]["filtered_rpv2-unsafe"] == 10
    t = _samples(run_with_policy)
    assert sorted(int(d.split(":")[-1]) for d in t["doc_id"].to_pylist()) == [0, 4, 8, 12, 16]
    assert set(t["split"].to_pylist()) == {"train"}


def test_duplicate_document_ids_get_unique_sample_ids(run_with_policy, tmp_path):
    from sipt.samples import iteration_samples

    docs = make_docs(12, seed=5)
    ids = ["a", "b", "a", "c", "a", "a~2", "b", "d", "e", "f", "g", "h"]  # "a~2" is taken by a real doc
    with (tmp_path / "dup.jsonl").open("w") as fh:
        for i, text in zip(ids, docs):
            fh.write(json.dumps({"id": i, "text": text}) + "\n")
    cfg = _cfg(run_with_policy, [tmp_path / "dup.jsonl"], id_column="id", samples_per_doc=2, docs_per_part=5,
               eval_fraction=0.5)
    m = shard.run(run_with_policy, cfg, show_progress=False)
    t = _samples(run_with_policy)
    assert t["sample_id"].unique().to_pylist() == t["sample_id"].to_pylist()  # unique, in stream order
    assert list(dict.fromkeys(t["doc_id"].to_pylist())) == ["a", "b", "a~2", "c", "a~3", "a~2~2", "b~2", "d", "e",
                                                          "f", "g", "h"]
    assert m["stats"]["renamed_doc_ids"] == 4
    split = dict(zip(t["doc_id"].to_pylist(), t["split"].to_pylist()))
    assert split["a~2"] == split["a~3"] == split["a"] and split["b~2"] == split["b"]  # copies: one side
    iteration_samples(run_with_policy, 0, 4)  # the joins accept it


def test_samples_with_duplicate_ids_are_refused_by_the_joins(run_with_policy, corpus_dir):
    from sipt.samples import iteration_samples
    from stages import eval as eval_stage

    shard.run(run_with_policy, _cfg(run_with_policy, [corpus_dir], docs_per_part=100), show_progress=False)
    first = pq.read_table(run_with_policy / "samples" / "part-00000.parquet")["sample_id"][0].as_py()
    part = run_with_policy / "samples" / "part-00002.parquet"
    t = pq.read_table(part)
    ids = t["sample_id"].to_pylist()
    ids[3] = first  # as an older sipt shard wrote a corpus with duplicate document ids
    pq.write_table(t.set_column(0, "sample_id", pa.array(ids)), part)
    with pytest.raises(SiptError, match=rf"samples: 1 sample_id value\(s\) occur more than once \({re.escape(repr(first))}; in "
                                        r"part-00000.parquet, part-00002.parquet\).*sipt shard --force"):
        iteration_samples(run_with_policy, 0, 4)
    with pytest.raises(SiptError, match="occur more than once"):
        eval_stage.eval_samples(run_with_policy, config_mod.resolve(run_with_policy))


def test_long_documents_are_tokenized_in_windows_with_the_same_result(run_with_policy, corpus_dir, tmp_path,
                                                                      monkeypatch):
    import shutil

    tok = shard.load_tokenizer(run_with_policy / "iter-000" / "policy").backend_tokenizer
    text = " ".join(make_docs(400, seed=9))  # ~300 K characters: ~10 windows
    whole = tok.encode(text, add_special_tokens=False)
    windowed = shard._WindowedTokens(tok, text)
    assert windowed.n == len(whole.ids) and len(windowed.marks) > 5
    windowed.load(0, windowed.n)
    assert windowed.ids(0, windowed.n) == whole.ids
    assert [windowed.end(k) for k in range(windowed.n)] == [e for _, e in whole.offsets]
    # the same samples when every fixture document goes through the windows (tiny ones, tiny context:
    # cuts that cannot be checked widen the window)
    other = tmp_path / "other"
    shutil.copytree(run_with_policy / "iter-000", other / "iter-000")
    shard.run(run_with_policy, _cfg(run_with_policy, [corpus_dir], samples_per_doc=3, max_prefix_tokens=40),
              show_progress=False)
    monkeypatch.setattr(shard, "WINDOW_CHARS", 120)
    monkeypatch.setattr(shard, "CONTEXT_CHARS", 8)
    shard.run(other, _cfg(other, [corpus_dir], samples_per_doc=3, max_prefix_tokens=40), show_progress=False)
    assert _samples(other).equals(_samples(run_with_policy))


PEAK_MEMORY = """
import json, resource, sys
from pathlib import Path
from sipt import config as config_mod, corpus
from stages import init, shard

run, small, big, stage = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
def cfg(path):
    return config_mod.resolve(run, overrides={"data.inputs": [path], "data.suffix_tokens": 16, "data.min_prefix_tokens": 4,
                                              "data.samples_per_doc": 4}, force=True)
peak_mb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if stage == "shard":
    shard.run(run, cfg(small), show_progress=False)  # warm: imports, the tokenizer, a small corpus
    before = peak_mb()
    stats = shard.run(run, cfg(big), force=True, show_progress=False)["stats"]
else:
    init.train_tokenizer([d.text for d in corpus.iter_documents(cfg(small).data)], 512)
    before = peak_mb()
    stats = {"vocab": len(init.train_tokenizer((d.text for d in corpus.iter_documents(cfg(big).data)), 512))}
print(json.dumps({"grew_mb": peak_mb() - before, "stats": stats}))
"""


@pytest.mark.slow
def test_memory_stays_bounded_with_a_4_mb_document(run_with_policy, tmp_path):
    small = write_jsonl(tmp_path / "small.jsonl", make_docs(20, seed=1))
    big = write_jsonl(tmp_path / "big.jsonl", [" ".join(make_docs(7000, seed=2, min_sent=8, max_sent=12))[:4_000_000]])
    for stage in ("shard", "init"):  # init: the tokenizer trainer reads the corpus
        proc = subprocess.run([sys.executable, "-c", PEAK_MEMORY, str(run_with_policy), str(small), str(big), stage],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        # tokenized whole, the document took ~560 MB more in shard and ~340 MB in init; windowed ~15 MB
        assert out["grew_mb"] < 100, (stage, out)
        if stage == "shard":
            assert out["stats"]["samples"] == 4 and out["stats"]["doc_tokens"] > 700_000


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "no such file or folder"),
        (lambda d: (d / "c.jsonl").write_text('{"body": "hello"}\n'), r"c.jsonl:1: column 'text' missing \(has: body\); set data.text_column"),
        (lambda d: (d / "c.jsonl").write_text('{"text": "' + "word " * 60 + '"}\n{"text": null}\n'), r"c.jsonl:2: 'text' is null"),
        (lambda d: (d / "c.jsonl").write_text('{"text": "   "}\n'), r"c.jsonl:1: 'text' is empty"),
        (lambda d: (d / "c.jsonl").write_text('{"text": "ok"\n'), r"c.jsonl:1: not valid JSON"),
        (lambda d: (d / "c.txt").write_bytes(b"good line\nbad \xff byte\n"), r"c.txt: invalid UTF-8 at byte 14 \(line 2\)"),
        (lambda d: (d / "c.parquet").write_bytes(b"PAR1 not really parquet"), r"c.parquet: not a readable Parquet file"),
        (lambda d: pq.write_table(pa.table({"body": ["x"]}), d / "c.parquet"), r"c.parquet: column 'text' missing"),
    ],
    ids=["missing-file", "missing-column", "null-text", "empty-text", "bad-json", "invalid-utf8", "corrupt-parquet", "parquet-column"],
)
def test_bad_input_clear_error_and_nothing_written(run_with_policy, tmp_path, setup, message):
    data = tmp_path / "bad"
    data.mkdir()
    setup(data)
    cfg = _cfg(run_with_policy, [data / "missing.jsonl"] if not any(data.iterdir()) else [data])
    with pytest.raises(SiptError, match=message):
        shard.run(run_with_policy, cfg, show_progress=False)
    assert not (run_with_policy / "samples").exists()
    assert not (run_with_policy / ".samples.tmp").exists()


def test_bad_rows_can_be_skipped_and_counted(run_with_policy, tmp_path):
    (tmp_path / "c.jsonl").write_text(
        "\n".join(json.dumps({"text": t}) for t in [make_docs(1)[0], None, "", "too short"]) + "\n"
    )
    cfg = _cfg(run_with_policy, [tmp_path / "c.jsonl"], on_bad_text="skip")
    m = shard.run(run_with_policy, cfg, show_progress=False)
    assert m["stats"]["skipped_empty"] == 2 and m["stats"]["skipped_short"] == 1 and m["rows"] == 1


def test_cli_bad_input_exits_nonzero_with_message(run_with_policy, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sipt.cli", "shard", "--run", str(run_with_policy), "-i", str(tmp_path / "nope.jsonl"), "--no-progress"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "nope.jsonl: no such file or folder" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_sigkill_then_rerun_gives_identical_samples(policy_run, tmp_path):
    import shutil

    corpus = write_jsonl(tmp_path / "big.jsonl", make_docs(6000, seed=7, min_sent=6, max_sent=20))
    runs = []
    for name in ("killed", "clean"):
        run = tmp_path / name
        shutil.copytree(policy_run / "iter-000", run / "iter-000")
        config_mod.resolve(run, overrides={"data.inputs": [str(corpus)], "data.docs_per_part": 150,
                                           "data.suffix_tokens": 16, "data.samples_per_doc": 2})
        runs.append(run)
    killed, clean = runs
    cmd = [sys.executable, "-m", "sipt.cli", "shard", "--run", str(killed), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tmp = killed / ".samples.tmp"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(tmp.glob("part-*.parquet"))) < 5:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "samples").exists(), "shard finished before it could be killed"
    n_before = len(list(tmp.glob("part-*.parquet")))
    assert 5 <= n_before < 40
    rows = {r["stage"]: r for r in artifacts.run_status(killed)}
    assert rows["samples"]["state"] == "interrupted"  # killed: partial parts, no live writer
    before = {p.name: p.stat().st_mtime_ns for p in tmp.glob("part-*.parquet")}
    subprocess.run(cmd, check=True, capture_output=True)
    after = {p.name: p.stat().st_mtime_ns for p in (killed / "samples").glob("part-*.parquet")}
    assert all(after[name] == mtime for name, mtime in before.items())  # finished parts were kept
    subprocess.run([sys.executable, "-m", "sipt.cli", "shard", "--run", str(clean), "--no-progress"], check=True, capture_output=True)
    assert _samples(killed).equals(_samples(clean))
    assert len(after) == 40

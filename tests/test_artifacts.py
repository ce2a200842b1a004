import json

import pyarrow as pa
import pytest

from sipt import artifacts
from sipt.errors import SiptError


def _stage(tmp_path, **kw):
    args = dict(run_dir=tmp_path, name="demo", out=tmp_path / "iter-000" / "rollout", config_hash="c1",
                config_sections=["run"], inputs={})
    args.update(kw)
    return artifacts.Stage(**args)


def _table(n):
    return pa.table({"x": list(range(n))})


def test_crash_keeps_parts_and_marks_failed(tmp_path):
    with pytest.raises(RuntimeError):
        with _stage(tmp_path) as st:
            st.write_part(0, _table(3), {"rows": 3})
            raise RuntimeError("server went away")
    rows = {r["stage"]: r for r in artifacts.run_status(tmp_path)}
    assert rows["rollout"]["state"] == "failed" and "server went away" in rows["rollout"]["detail"]
    with _stage(tmp_path) as st:
        assert st.has_part(0)  # resumed
        st.write_part(1, _table(2), {"rows": 2})
        assert st.collected_stats() == {"rows": 5}
        m = st.commit()
    assert m["rows"] == 5 and m["parts"] == 2
    assert not (tmp_path / "iter-000" / ".rollout.tmp").exists()
    assert json.loads((tmp_path / "iter-000" / "rollout" / "_SUCCESS.json").read_text())["rows"] == 5


def test_user_error_removes_partial_output(tmp_path):
    with pytest.raises(SiptError):
        with _stage(tmp_path) as st:
            st.write_part(0, _table(3))
            raise SiptError("bad row")
    assert not (tmp_path / "iter-000" / ".rollout.tmp").exists()
    assert not (tmp_path / "iter-000" / "rollout").exists()


def test_parts_of_another_config_are_not_resumed(tmp_path):
    with pytest.raises(RuntimeError):
        with _stage(tmp_path) as st:
            st.write_part(0, _table(3))
            raise RuntimeError
    with _stage(tmp_path, config_hash="c2") as st:
        assert not st.has_part(0)


def test_force_rebuilds_beside_and_swaps(tmp_path):
    with _stage(tmp_path) as st:
        st.write_part(0, _table(1))
        st.commit()
    with _stage(tmp_path) as st:
        assert st.skipped
    with _stage(tmp_path, force=True) as st:
        assert not st.skipped
        assert (tmp_path / "iter-000" / "rollout" / "_SUCCESS.json").exists()  # old output untouched meanwhile
        st.write_part(0, _table(4))
        assert st.commit()["rows"] == 4


def test_downstream_becomes_stale_when_input_reruns(tmp_path):
    up = dict(out=tmp_path / "samples", name="shard")
    with _stage(tmp_path, **up) as st:
        st.write_part(0, _table(1))
        st.commit()
    down = dict(inputs={"samples": "samples"})
    with _stage(tmp_path, **down) as st:
        st.write_part(0, _table(1))
        st.commit()
    assert {r["stage"]: r["state"] for r in artifacts.run_status(tmp_path)}["rollout"] == "done"
    with _stage(tmp_path, force=True, **up) as st:
        st.write_part(0, _table(2))
        st.commit()
    assert {r["stage"]: r["state"] for r in artifacts.run_status(tmp_path)}["rollout"] == "stale"
    with _stage(tmp_path, **down) as st:
        assert not st.skipped  # stale: rebuilt


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(SiptError, match="input 'samples'.*run the stage that produces it first"):
        with _stage(tmp_path, inputs={"samples": "samples"}):
            pass


def test_status_shows_what_the_config_runs_and_passes_staleness_down(tmp_path):
    from sipt import config as config_mod

    cfg = config_mod.build({"run": {"iterations": 1}})  # candidates suffix + rollouts: no rewrite stage

    def finish(name, out, sections, inputs):
        with _stage(tmp_path, name=name, out=tmp_path / out, config_hash=cfg.hash(sections),
                    config_sections=sections, inputs=inputs) as st:
            st.write_part(0, _table(1))
            st.commit()

    finish("shard", "samples", ["data"], {})
    finish("init", "iter-000/policy", ["model"], {})
    finish("rollout", "iter-000/rollout", ["rollout"], {"samples": "samples", "policy": "iter-000/policy"})
    finish("judge", "iter-000/judge", ["judge"], {"samples": "samples", "rollout": "iter-000/rollout"})
    finish("pair", "iter-000/pair", ["pair"], {"judge": "iter-000/judge"})
    finish("train", "iter-000/train", ["train"], {"data": "iter-000/pair", "policy": "iter-000/policy"})
    finish("train", "iter-001/policy", ["train"], {"train": "iter-000/train"})

    def states(c):
        return {(r["iteration"], r["stage"]): (r["state"], r["detail"]) for r in artifacts.run_status(tmp_path, c.hash, c)}

    got = states(cfg)
    assert (0, "rewrite") not in got  # the config never runs it
    assert set(k for k in got if k[0] == 1) == {(1, "policy"), (1, "eval")}  # past the last iteration's work
    assert got[(0, "eval")][0] == got[(1, "eval")][0] == "missing"
    assert all(s == "done" for k, (s, _) in got.items() if k[1] != "eval")
    # a new rollout.n makes the rollout stale, and with it everything made from it
    got = states(config_mod.build({"run": {"iterations": 1}, "rollout": {"n": 8}}))
    assert got[(0, "rollout")] == ("stale", "config changed")
    assert got[(0, "judge")] == ("stale", "input 'rollout' (iter-000/rollout) is stale")
    for key in ((0, "pair"), (0, "train"), (1, "policy")):
        assert got[key][0] == "stale", key
    assert got[(None, "samples")][0] == got[(0, "policy")][0] == "done"
    # a rewrite made under another config is still shown (its folder exists)
    finish("rewrite", "iter-000/rewrite", ["rewrite"], {"samples": "samples"})
    assert states(cfg)[(0, "rewrite")][0] == "done"


def test_content_fingerprint_survives_a_copy_and_sees_a_change(tmp_path):
    import shutil
    import time

    a = tmp_path / "a"
    (a / "sub").mkdir(parents=True)
    (a / "model.bin").write_bytes(b"weights")
    (a / "sub" / "tok.json").write_text("{}")
    (a / "_SUCCESS.json").write_text("{}")
    time.sleep(0.01)
    b = tmp_path / "moved" / "b"
    shutil.copytree(a, b, copy_function=shutil.copy)  # new path, new mtimes
    (b / "_SUCCESS.json").write_text('{"other": 1}')  # markers are not content
    assert artifacts.content_fingerprint(a) == artifacts.content_fingerprint(b)
    assert artifacts.files_fingerprint([a / "model.bin"]) != artifacts.files_fingerprint([b / "model.bin"])
    (b / "model.bin").write_bytes(b"weightz")
    assert artifacts.content_fingerprint(a) != artifacts.content_fingerprint(b)


HOLD = """
import sys, time
from pathlib import Path
from sipt import artifacts
run = Path(sys.argv[1])
st = artifacts.Stage(run_dir=run, name="demo", out=run / "iter-000" / "rollout", config_hash="c1",
                     config_sections=["run"], inputs={})
st.__enter__()
st.write_part(0, __import__("pyarrow").table({"x": [1]}))
print("holding", flush=True)
time.sleep(120)
"""


def test_one_writer_per_stage_folder(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "holding"
        state = {r["stage"]: r for r in artifacts.run_status(tmp_path)}["rollout"]
        assert state["state"] == "running" and f"pid {proc.pid} on {artifacts.HOST}" in state["detail"]
        with pytest.raises(SiptError, match=rf"rollout: another sipt process is writing it \(pid {proc.pid} on host "
                                            rf"{artifacts.HOST}.*wait for it to finish"):
            with _stage(tmp_path):
                pass
        assert (tmp_path / "iter-000" / ".rollout.tmp" / "part-00000.parquet").exists()  # its work untouched
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    # killed: its lock file is left behind, with its (now dead) pid
    assert json.loads((tmp_path / ".locks" / "iter-000.rollout.lock").read_text())["pid"] == proc.pid
    assert {r["stage"]: r["state"] for r in artifacts.run_status(tmp_path)}["rollout"] == "interrupted"
    with _stage(tmp_path) as st:  # taken over, and the killed writer's part resumed
        assert st.has_part(0)
        st.commit()
    assert not (tmp_path / ".locks").exists()  # released, and no empty folder left
    assert {r["stage"]: r["state"] for r in artifacts.run_status(tmp_path)}["rollout"] == "done"


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    lock = tmp_path / ".locks" / "iter-000.rollout.lock"
    lock.parent.mkdir()
    lock.write_text(json.dumps({"pid": int(dead), "host": artifacts.HOST, "started": "2026-01-01T00:00:00"}))
    assert {r["stage"]: r["state"] for r in artifacts.run_status(tmp_path)}["rollout"] == "missing"
    with _stage(tmp_path) as st:
        assert json.loads(lock.read_text())["pid"] == __import__("os").getpid()
        st.commit()
    # a lock written on another host cannot be checked: refused, naming it and what to do
    lock.parent.mkdir(exist_ok=True)
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "2026-01-01T00:00:00"}))
    with pytest.raises(SiptError, match=r"locked by pid 1 on host elsewhere.*delete .*iter-000.rollout.lock"):
        with _stage(tmp_path, config_hash="c2"):
            pass


def test_finished_lists_the_iterations_whose_stage_finished(tmp_path):
    for i, marker in ((0, '{"rows": 1}'), (1, None), (2, "{not json"), (3, '{"rows": 2}')):
        folder = artifacts.stage_dir(tmp_path, "eval", i)
        folder.mkdir(parents=True)
        if marker is not None:
            (folder / artifacts.SUCCESS).write_text(marker)
    artifacts.stage_dir(tmp_path, "policy", 4).mkdir(parents=True)  # another stage's iteration
    assert artifacts.finished(tmp_path, "eval") == [0, 3]  # none or unreadable: not finished
    assert artifacts.finished(tmp_path, "policy") == []
    assert artifacts.finished(tmp_path / "missing", "eval") == []

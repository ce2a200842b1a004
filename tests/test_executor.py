"""Executors: local processes and Ray give the rows of the in-process run; a dying worker loses one part."""

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import require

from sipt import artifacts, config as config_mod
from sipt.errors import StageInterrupted
from sipt.executor import run_parts
from stages import judge, rewrite, rollout


@pytest.fixture
def wrun(world_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world_run, run, ignore=shutil.ignore_patterns("world"))
    return run


def _stage_rows(run, stage, prefix="part-"):
    return artifacts.read_table(run / "iter-000" / stage, prefix=prefix)


@pytest.mark.slow
def test_local_workers_write_the_rows_of_one_process(wrun, tmp_path):
    # like with like: one process on 1 thread against 2 workers on 1 thread each (README "Reproducibility")
    one = tmp_path / "one"
    shutil.copytree(wrun, one)
    for run, workers in ((one, 1), (wrun, 2)):
        cfg = config_mod.resolve(run, overrides={"run.workers": workers, "run.threads": 1,
                                                 "judge.candidates": ["suffix", "rewrite", "rollouts"]}, force=True)
        for stage in (rollout, rewrite, judge):
            stage.run(run, cfg, 0, force=True, show_progress=False)
    assert _stage_rows(wrun, "rollout").equals(_stage_rows(one, "rollout"))
    assert _stage_rows(wrun, "rewrite").equals(_stage_rows(one, "rewrite"))
    assert _stage_rows(wrun, "judge", "scores-").equals(_stage_rows(one, "judge", "scores-"))
    m = artifacts.read_manifest(wrun / "iter-000" / "rollout")
    assert m["parts"] == 3 and m["stats"]["workers"] == 2 and m["stats"]["executor"] == "local"
    envs = [artifacts.part_environment(p) for p in artifacts.list_parts(wrun / "iter-000" / "rollout")]
    assert [e["threads"] for e in envs] == [1, 1, 1] and all(e["torch"] and e["cpu"] for e in envs)


ROLLOUT_FIXED = ["sample_id", "rollout_idx", "prompt_tokens", "prompt_truncated", "error"]


@pytest.mark.slow
def test_only_the_thread_count_changes(wrun, tmp_path):
    """1 thread against 2 in one process: sampled columns may differ where the BLAS rounds by thread
    count; the row count, schema, ids and every non-sampled column may not. Under MKL's strict mode
    (set by `import sipt`) the rows are bit-identical too."""
    import torch

    tables = {}
    for threads in (1, 2):
        run = tmp_path / f"t{threads}"
        shutil.copytree(wrun, run)
        cfg = config_mod.resolve(run, overrides={"run.threads": threads}, force=True)
        rollout.run(run, cfg, 0, force=True, show_progress=False)
        tables[threads] = _stage_rows(run, "rollout")
        part = artifacts.list_parts(run / "iter-000" / "rollout")[0]
        assert artifacts.part_environment(part)["threads"] == threads
    one, two = tables[1], tables[2]
    assert one.schema == two.schema and one.num_rows == two.num_rows == 48
    assert one.select(ROLLOUT_FIXED).equals(two.select(ROLLOUT_FIXED))
    assert torch.get_num_threads() == (os.cpu_count() or 1)  # the in-process setting was restored
    if torch.backends.mkl.is_available() and os.environ.get("MKL_CBWR", "").endswith("STRICT"):
        assert one.equals(two)


@pytest.mark.slow
def test_status_warns_when_a_resumed_stage_changed_threads(wrun, monkeypatch):
    """A rollout killed after 2 of 3 parts at 1 thread, resumed at 2 threads: the rows are kept,
    and the manifest and `sipt status` say the parts were written under different settings."""
    from typer.testing import CliRunner

    from sipt.cli import app

    real_part = rollout.RolloutJob.part

    def dies_at_part_2(self, k):
        if k == 2:
            raise KeyboardInterrupt  # a crash, not bad input: the finished parts stay
        return real_part(self, k)

    monkeypatch.setattr(rollout.RolloutJob, "part", dies_at_part_2)
    cfg = config_mod.resolve(wrun, overrides={"run.threads": 1}, force=True)
    with pytest.raises(KeyboardInterrupt):
        rollout.run(wrun, cfg, 0, force=True, show_progress=False)
    monkeypatch.setattr(rollout.RolloutJob, "part", real_part)
    rows = {r["stage"]: r for r in artifacts.run_status(wrun) if r["iteration"] == 0}
    assert rows["rollout"]["state"] == "failed" and rows["rollout"]["warning"] == ""
    cfg = config_mod.resolve(wrun, overrides={"run.threads": 2}, force=True)
    m = rollout.run(wrun, cfg, 0, force=True, show_progress=False)  # resumes the forced rebuild
    assert m["rows"] == 48 and not m.get("skipped")
    assert m["environment_warning"] == "parts written under different settings: threads 1 (2 parts) vs 2 (1 part)"
    rows = {r["stage"]: r for r in artifacts.run_status(wrun) if r["iteration"] == 0}
    assert rows["rollout"]["warning"] == m["environment_warning"] and rows["rewrite"]["warning"] == ""
    shown = CliRunner().invoke(app, ["status", "--run", str(wrun)])
    assert shown.exit_code == 0 and "iter-000/rollout: parts written under different settings" in shown.output


@dataclass
class CountingJob:
    """Writes one row per part; the worker doing part `die_at` exits hard (as if killed) once."""

    marker: str
    die_at: int = -1
    n_parts: int = 8
    families = ("part",)

    @property
    def parts(self):
        return list(range(self.n_parts))

    def open(self):
        self.pid = os.getpid()

    def weight(self, k):
        return 1

    def part(self, k):
        if k == self.die_at and not Path(self.marker).exists():
            Path(self.marker).write_text("died")
            os._exit(9)
        return [("part", pa.table({"k": [k], "pid": [self.pid]}), {"n": 1})]

    def close(self):
        pass


class _Run:
    def __init__(self, executor="local", workers=2):
        self.executor, self.workers, self.ray_address, self.worker_gpus = executor, workers, "", 0.0


def test_a_dying_worker_loses_only_its_part(tmp_path):
    job = CountingJob(str(tmp_path / "died"), die_at=3)
    with pytest.raises(StageInterrupted, match="1 of 8 parts were not written"):
        run_parts(job, tmp_path, _Run(), label="t", show_progress=False)
    written = sorted(int(p.name[5:10]) for p in tmp_path.glob("part-*.parquet"))
    assert written == [0, 1, 2, 4, 5, 6, 7]
    run_parts(job, tmp_path, _Run(), label="t", show_progress=False)  # the rerun: just the missing part 3
    rows = artifacts.read_table(tmp_path)
    assert rows["k"].to_pylist() == list(range(8)) and len(set(rows["pid"].to_pylist())) >= 2


@pytest.mark.slow
def test_ray_actors_write_the_rows_of_one_process(wrun, tmp_path):
    require("ray")
    one = tmp_path / "one"
    shutil.copytree(wrun, one)
    cfg = config_mod.resolve(one, overrides={"run.workers": 1, "run.threads": 1}, force=True)
    rollout.run(one, cfg, 0, force=True, show_progress=False)
    cfg = config_mod.resolve(wrun, overrides={"run.executor": "ray", "run.workers": 2, "run.threads": 1}, force=True)
    m = rollout.run(wrun, cfg, 0, force=True, show_progress=False)
    assert m["parts"] == 3 and _stage_rows(wrun, "rollout").equals(_stage_rows(one, "rollout"))
    # a dead actor loses its part in flight; the others finish theirs, the rerun the rest
    import sys

    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    job = CountingJob(str(tmp_path / "died"), die_at=2, n_parts=6)
    out = tmp_path / "ray_parts"
    out.mkdir()
    with pytest.raises(StageInterrupted, match="1 of 6 parts were not written"):
        run_parts(job, out, _Run("ray", 2), label="t", show_progress=False)
    assert sorted(int(p.name[5:10]) for p in out.glob("part-*.parquet")) == [0, 1, 3, 4, 5]
    run_parts(job, out, _Run("ray", 2), label="t", show_progress=False)
    assert artifacts.read_table(out)["k"].to_pylist() == list(range(6))
    ray.shutdown()

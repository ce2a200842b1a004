"""Executors: local processes and Ray give the rows of the in-process run; a dying worker loses one part."""

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest

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
    one = tmp_path / "one"
    shutil.copytree(wrun, one)
    for run, workers in ((one, 1), (wrun, 2)):
        cfg = config_mod.resolve(run, overrides={"run.workers": workers, "judge.candidates": ["suffix", "rewrite", "rollouts"]},
                                 force=True)
        for stage in (rollout, rewrite, judge):
            stage.run(run, cfg, 0, force=True, show_progress=False)
    assert _stage_rows(wrun, "rollout").equals(_stage_rows(one, "rollout"))
    assert _stage_rows(wrun, "rewrite").equals(_stage_rows(one, "rewrite"))
    assert _stage_rows(wrun, "judge", "scores-").equals(_stage_rows(one, "judge", "scores-"))
    assert artifacts.read_manifest(wrun / "iter-000" / "rollout")["parts"] == 3


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
    pytest.importorskip("ray")
    one = tmp_path / "one"
    shutil.copytree(wrun, one)
    cfg = config_mod.resolve(one, overrides={"run.workers": 1}, force=True)
    rollout.run(one, cfg, 0, force=True, show_progress=False)
    cfg = config_mod.resolve(wrun, overrides={"run.executor": "ray", "run.workers": 2}, force=True)
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

"""The artifact contract: stage folders, atomic Parquet parts, `_SUCCESS.json`, skip / stale / resume.

The filesystem is the state machine. A stage builds its output in a hidden sibling folder
(`.<name>.tmp`), one Parquet part at a time (each written to `*.partial` and renamed), renames the
folder into place when every part is done, and then writes `_SUCCESS.json`. A rerun skips a stage
whose `_SUCCESS.json` matches the current config and inputs, resumes from the finished parts of an
interrupted one, and rebuilds a stale one beside the old output before swapping it in. One process
at a time writes a stage folder: it holds `<run>/.locks/<folder>.lock` (see `Lock`).

Its parts live beside it and are re-exported here: locks (`sipt.locks`), Parquet parts (`sipt.parts`),
input fingerprints (`sipt.fingerprints`) and the environment recorded in each part (`sipt.environment`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sipt import __version__
from sipt.environment import ENV_KEY, environment, mixed_environments, part_environment  # noqa: F401 (re-exported)
from sipt.errors import SiptError
from sipt.fingerprints import (  # noqa: F401 (re-exported)
    SUCCESS, _sha, content_fingerprint, files_fingerprint, files_ref, fingerprint,
)
from sipt.locks import HOST, Lock, lock_holder, lock_path  # noqa: F401 (re-exported)
from sipt.parts import (  # noqa: F401 (re-exported)
    STATS_KEY, kill_point, list_parts, part_name, part_stats, read_table, write_parquet_atomic,
)

PARTIAL = "_PARTIAL.json"
FAILED = "_FAILED.json"

# Stages of one iteration, in the order the loop runs them. `policy` is the model the rollouts of
# that iteration come from (written by `init` for iter-000 and by the previous `train` after).
ITER_STAGES = ["policy", "rollout", "rewrite", "judge", "pair", "train", "eval"]
# Stages of the run, not of an iteration: `<run>/<name>`.
RUN_STAGES = ("samples", "judge-data", "judge-train", "rewriter-train")


def iter_dir(run_dir: Path, iteration: int) -> Path:
    return Path(run_dir) / f"iter-{iteration:03d}"


def stage_dir(run_dir: Path, stage: str, iteration: int | None = None) -> Path:
    """The output folder of a stage: `<run>/samples` (a RUN_STAGES one), or `<run>/iter-NNN/<stage>`."""
    if stage in RUN_STAGES:
        return Path(run_dir) / stage
    if iteration is None:
        raise ValueError(f"stage {stage} needs an iteration")
    return iter_dir(run_dir, iteration) / stage


def stage_ref(stage: str, iteration: int | None = None) -> str:
    """Another stage's output as an input reference (see `fingerprint`): `iter-002/judge`, `samples`."""
    return stage_dir(Path(), stage, iteration).as_posix()


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / SUCCESS
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


@dataclass
class Stage:
    """One stage run: where it writes, what it depends on, and whether it is already done.

    Use as a context manager, or call `open()`, then `commit()` or `fail(exc)` (what a stage whose
    work spans processes does). `skipped` is True when a matching `_SUCCESS.json` exists. A SiptError
    raised inside removes the temporary folder (bad input: nothing half-written stays); any other
    exception (a crash, a dead server, Ctrl-C) keeps the finished parts for the rerun to resume.
    """

    run_dir: Path
    name: str
    out: Path
    config_hash: str
    config_sections: list[str]
    inputs: dict[str, str]  # input name -> reference (see `fingerprint`)
    iteration: int | None = None
    force: bool = False
    skipped: bool = False
    manifest: dict | None = None
    started: float = field(default_factory=time.time)

    @classmethod
    def of(cls, run_dir: Path, name: str, cfg, sections: list[str], *, inputs: dict[str, str],
           iteration: int | None = None, folder: str | None = None, force: bool = False) -> "Stage":
        """The stage `name` of `iteration` (None: of the run), writing `stage_dir(run_dir, folder or
        name, iteration)` and fingerprinted by the config keys `sections` (`cfg.hash(sections)`)."""
        run_dir = Path(run_dir)
        return cls(run_dir=run_dir, name=name, out=stage_dir(run_dir, folder or name, iteration),
                   config_hash=cfg.hash(sections), config_sections=sections, inputs=inputs,
                   iteration=iteration, force=force)

    @property
    def tmp(self) -> Path:
        return self.out.parent / f".{self.out.name}.tmp"

    def input_fingerprints(self) -> dict[str, str]:
        fps = {}
        for key, ref in self.inputs.items():
            fp = fingerprint(self.run_dir, ref)
            if fp is None:
                raise SiptError(
                    f"{self.name}: input '{key}' ({ref.split(':', 1)[-1]}) is missing or unfinished; "
                    "run the stage that produces it first (see `sipt status`)"
                )
            fps[key] = fp
        return fps

    def _identity(self) -> dict:
        return {
            "stage": self.name,
            "config_hash": self.config_hash,
            "inputs": {k: {"ref": self.inputs[k], "fingerprint": v} for k, v in self._fps.items()},
        }

    def open(self) -> "Stage":
        """Take the stage's lock and prepare its temporary folder (resuming matching parts).

        `skipped` is then True when the stage is already done (the lock is released at once); otherwise
        the lock is held until `commit` or `fail`.
        """
        self._lock = Lock(lock_path(self.run_dir, self.out), str(self.out))
        self._lock.acquire()
        try:
            self._enter()
        except BaseException:
            self._lock.release()
            raise
        if self.skipped:  # nothing will be written
            self._lock.release()
        return self

    def __enter__(self) -> "Stage":
        return self.open()

    def _enter(self) -> None:
        self._fps = self.input_fingerprints()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        done = read_manifest(self.out)
        if self.out.exists() and done is None:
            # Renamed into place but killed before _SUCCESS.json: resume it as the temporary folder.
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            os.replace(self.out, self.tmp)
        if done and not self.force and self._matches(done):
            self.skipped, self.manifest = True, {**done, "skipped": True}  # "skipped" is not on disk
            return
        ident = self._identity()
        if self.tmp.exists():
            partial = self.tmp / PARTIAL
            same = partial.exists() and json.loads(partial.read_text()) == ident
            if not same:  # parts of another config or other inputs cannot be resumed
                shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        (self.tmp / FAILED).unlink(missing_ok=True)
        for junk in self.tmp.glob("*.partial"):
            junk.unlink()
        _write_json_atomic(self.tmp / PARTIAL, ident)

    def _matches(self, manifest: dict) -> bool:
        recorded = {k: v.get("fingerprint") for k, v in manifest.get("inputs", {}).items()}
        return manifest.get("config_hash") == self.config_hash and recorded == self._fps

    def fail(self, exc: BaseException) -> None:
        """Record that the stage stopped with `exc` and release the lock. A SiptError (bad input)
        removes the temporary folder; anything else (a crash, a dead server, Ctrl-C) keeps the
        finished parts for the rerun to resume and writes `_FAILED.json` beside them."""
        try:
            if self.skipped:
                return
            if isinstance(exc, SiptError):
                shutil.rmtree(self.tmp, ignore_errors=True)
                parent = self.out.parent
                if parent != Path(self.run_dir) and parent.is_dir() and not any(parent.iterdir()):
                    parent.rmdir()  # a refused first stage of an iteration leaves no empty iter-NNN/
            elif self.tmp.exists():
                _write_json_atomic(
                    self.tmp / FAILED,
                    {
                        "stage": self.name,
                        "error": f"{type(exc).__name__}: {exc}",
                        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:],
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    },
                )
        finally:
            self._lock.release()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None:
            self.fail(exc)
        else:  # left without commit: the parts stay for a rerun
            self._lock.release()
        return False

    # -- parts ------------------------------------------------------------------------------
    # A stage may write several families of parts (judge: `judgments-*` and `scores-*`); the
    # default family is `part`.
    def part_path(self, index: int, family: str = "part") -> Path:
        return self.tmp / part_name(index, family)

    def has_part(self, index: int, family: str = "part") -> bool:
        return self.part_path(index, family).exists()

    def write_part(self, index: int, table: pa.Table, stats: dict | None = None, family: str = "part") -> None:
        write_parquet_atomic(self.part_path(index, family), table, stats)

    def collected_stats(self, family: str = "part") -> dict:
        """Sum of the numeric per-part stats stored in the parts' metadata."""
        total: dict[str, float] = {}
        for p in list_parts(self.tmp, f"{family}-"):
            for k, v in part_stats(p).items():
                if isinstance(v, (int, float)):
                    total[k] = total.get(k, 0) + v
        return total

    # -- completion -------------------------------------------------------------------------
    def commit(self, stats: dict | None = None, rows: int | None = None, errors: int = 0,
               family: str = "part") -> dict:
        """Rename the temporary folder into place and write `_SUCCESS.json` last."""
        (self.tmp / PARTIAL).unlink(missing_ok=True)
        parts = list_parts(self.tmp, f"{family}-")
        if rows is None:
            rows = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
        manifest = {
            **self._identity(),
            "iteration": self.iteration,
            "sipt_version": __version__,
            "config_sections": self.config_sections,
            "rows": rows,
            "parts": len(parts),
            "errors": errors,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
            "seconds": round(time.time() - self.started, 3),
            "stats": stats or {},
            "environment": environment(),
        }
        mixed = mixed_environments(self.tmp)
        if mixed:
            manifest["environment_warning"] = mixed
        old = self.out.parent / f".{self.out.name}.old"
        if self.out.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        _write_json_atomic(self.out / SUCCESS, manifest)
        if old.exists():
            shutil.rmtree(old)
        self.manifest = manifest
        self._lock.release()
        from sipt import tracking  # after _SUCCESS.json: the stage is done even if a backend fails here

        tracking.log_manifest(self.run_dir, manifest)
        return manifest


def state_of(run_dir: Path, folder: Path, cfg_hash_fn) -> tuple[str, dict | None]:
    """done / stale / failed / interrupted / running / missing for one stage folder: running while a
    live process holds its lock, interrupted when partial work is left and nobody holds it.

    `cfg_hash_fn(sections)` gives the current config hash of the named sections.
    """
    tmp = folder.parent / f".{folder.name}.tmp"
    holder = lock_holder(run_dir, folder)
    if holder is not None:
        return "running", {"why": f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"}
    manifest = read_manifest(folder)
    if manifest is None:
        if tmp.exists() or folder.exists():
            failed = tmp / FAILED
            if failed.exists():
                return "failed", json.loads(failed.read_text())
            return "interrupted", {"error": "stopped before it finished (killed?); rerun to resume"}
        return "missing", None
    if tmp.exists() and (tmp / FAILED).exists():
        return "failed", json.loads((tmp / FAILED).read_text())
    for key, entry in manifest.get("inputs", {}).items():
        if fingerprint(run_dir, entry["ref"]) != entry["fingerprint"]:
            return "stale", {**manifest, "why": f"input '{key}' changed"}
    sections = manifest.get("config_sections")
    if sections is not None and cfg_hash_fn is not None and cfg_hash_fn(sections) != manifest.get("config_hash"):
        return "stale", {**manifest, "why": "config changed"}
    return "done", manifest


def iterations(run_dir: Path) -> list[int]:
    """The iterations that have a folder in the run, in order."""
    return sorted(int(p.name.split("-")[1]) for p in Path(run_dir).glob("iter-[0-9][0-9][0-9]") if p.is_dir())


def finished(run_dir: Path, stage: str) -> list[int]:
    """The iterations whose `stage` finished (a readable _SUCCESS.json in its folder), in order."""
    return [i for i in iterations(run_dir) if read_manifest(stage_dir(run_dir, stage, i))]


def run_status(run_dir: Path, cfg_hash_fn=None, cfg=None) -> list[dict]:
    """One row per stage per iteration: the data behind `sipt status`.

    With the run's config `cfg`, a stage the config never runs (e.g. rewrite when rewrites are not
    candidates) and the iteration stages after the last configured iteration (run.iterations: only
    its policy and eval) are listed only when their folder exists, never as missing. A finished
    stage that consumed a stale one is shown stale too.
    """
    run_dir = Path(run_dir)
    rows = []
    done: dict[str, dict] = {}  # path -> manifest of each finished stage, as state_of read it

    def add(stage: str, iteration: int | None, folder: Path) -> None:
        state, info = state_of(run_dir, folder, cfg_hash_fn)
        if state == "done":
            done[str(folder.relative_to(run_dir))] = info
        tmp = folder.parent / f".{folder.name}.tmp"
        parts_at = tmp if tmp.exists() else folder
        rows.append(
            {
                "iteration": iteration,
                "stage": stage,
                "state": state,
                "rows": (info or {}).get("rows") if state in ("done", "stale") else None,
                "seconds": (info or {}).get("seconds") if state in ("done", "stale") else None,
                "detail": (info or {}).get("why") or (info or {}).get("error") or "",
                "path": str(folder.relative_to(run_dir)),
                "warning": mixed_environments(parts_at) if parts_at.exists() else "",
            }
        )

    def expected(stage: str, i: int) -> bool:
        if cfg is None or stage in ("policy", "eval"):
            return cfg is None or i <= cfg.run.iterations
        from sipt.loop import iteration_stages

        return i < cfg.run.iterations and stage in iteration_stages(cfg)

    add("samples", None, stage_dir(run_dir, "samples"))
    for stage in RUN_STAGES[1:]:  # the judge- and rewriter-training stages: listed when a run has them
        folder = stage_dir(run_dir, stage)
        if folder.exists() or (folder.parent / f".{folder.name}.tmp").exists():
            add(stage, None, folder)
    iters = iterations(run_dir) or [0]
    for i in iters:
        for stage in ITER_STAGES:
            folder = stage_dir(run_dir, stage, i)
            if expected(stage, i) or folder.exists() or (folder.parent / f".{folder.name}.tmp").exists():
                add(stage, i, folder)
    _pass_staleness_down(rows, done)
    return rows


def _pass_staleness_down(rows: list[dict], done: dict[str, dict]) -> None:
    """Mark stale every finished row that consumed a stale one (rows are in dependency order: a stage's
    inputs are earlier rows), so a stale rollout of iteration k shows its judge, pair, train... stale.
    `done`: the manifests of the finished rows, by path."""
    by_path = {r["path"]: r for r in rows}
    for r in rows:
        if r["state"] != "done":
            continue
        for key, entry in done[r["path"]].get("inputs", {}).items():
            upstream = by_path.get(entry.get("ref", ""))
            if upstream is not None and upstream["state"] == "stale":
                r["state"], r["detail"] = "stale", f"input '{key}' ({upstream['path']}) is stale"
                break

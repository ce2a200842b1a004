"""The artifact contract: stage folders, atomic Parquet parts, `_SUCCESS.json`, skip / stale / resume.

The filesystem is the state machine. A stage builds its output in a hidden sibling folder
(`.<name>.tmp`), one Parquet part at a time (each written to `*.partial` and renamed), renames the
folder into place when every part is done, and then writes `_SUCCESS.json`. A rerun skips a stage
whose `_SUCCESS.json` matches the current config and inputs, resumes from the finished parts of an
interrupted one, and rebuilds a stale one beside the old output before swapping it in. One process
at a time writes a stage folder: it holds `<run>/.locks/<folder>.lock` (see `Lock`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sipt import __version__
from sipt.errors import SiptError

SUCCESS = "_SUCCESS.json"
PARTIAL = "_PARTIAL.json"
FAILED = "_FAILED.json"
STATS_KEY = b"sipt.stats"
ENV_KEY = b"sipt.env"

# Stages of one iteration, in the order the loop runs them. `policy` is the model the rollouts of
# that iteration come from (written by `init` for iter-000 and by the previous `train` after).
ITER_STAGES = ["policy", "rollout", "rewrite", "judge", "pair", "train", "eval"]


def iter_dir(run_dir: Path, iteration: int) -> Path:
    return Path(run_dir) / f"iter-{iteration:03d}"


def stage_dir(run_dir: Path, stage: str, iteration: int | None = None) -> Path:
    if stage == "samples":
        return Path(run_dir) / "samples"
    if iteration is None:
        raise ValueError(f"stage {stage} needs an iteration")
    return iter_dir(run_dir, iteration) / stage


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def files_fingerprint(paths: list[Path]) -> str:
    """Cheap fingerprint of external input files: path, size and modification time of each."""
    parts = []
    for p in sorted(Path(x) for x in paths):
        st = p.stat()
        parts.append(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}")
    return _sha("\n".join(parts).encode())


def content_fingerprint(path: Path) -> str:
    """Fingerprint of a file, or of a folder's files by their names (relative to it) and bytes: the
    same for a copied or moved one, unlike `files_fingerprint`. In a folder, files starting with `_`
    (markers) are left out."""
    path = Path(path)
    root = path.parent if path.is_file() else path
    files = [path] if path.is_file() else sorted(x for x in path.rglob("*") if x.is_file() and not x.name.startswith("_"))
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(root).as_posix()}\0{p.stat().st_size}\0".encode())
        with p.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def files_ref(paths) -> str:
    """An input reference to external files (folders are expanded to the files inside them)."""
    expanded = []
    for p in map(Path, paths):
        expanded += sorted(str(x.resolve()) for x in p.rglob("*") if x.is_file()) if p.is_dir() else [str(p.resolve())]
    return "files:" + json.dumps(expanded)


def fingerprint(run_dir: Path, ref: str) -> str | None:
    """Current fingerprint of an input reference, as recorded in a manifest's `inputs`.

    `ref` is a folder relative to the run (its `_SUCCESS.json` is hashed), `files:<json list>` for
    external files, `name:<text>` for inputs that can only be named (a hub dataset), or
    `oracle:rules` for the toy world oracle's current rule version.
    """
    if ref.startswith("files:"):
        paths = [Path(p) for p in json.loads(ref[6:])]
        if not all(p.exists() for p in paths):
            return None
        return files_fingerprint(paths)
    if ref.startswith("name:"):
        return _sha(ref.encode())
    if ref == "oracle:rules":  # the toy world oracle's verdict rules, as the code now has them
        from sipt.oracle import ORACLE_VERSION

        return _sha(f"oracle-v{ORACLE_VERSION}".encode())
    marker = Path(run_dir) / ref / SUCCESS
    return _sha(marker.read_bytes()) if marker.exists() else None


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


_CPU_FLAGS = ("avx512f", "avx512_bf16", "amx_tile", "avx2", "fma", "neon", "asimd", "sve")


def _cpu() -> tuple[str, str]:
    """The CPU model and the instruction-set extensions that decide which float kernels run."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model name") and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model, " ".join(f for f in _CPU_FLAGS if f in flags)


_STATIC_ENV: dict | None = None


def environment() -> dict:
    """What the floating-point results of this process depend on (README "Reproducibility"): torch's
    threads, the CPU and its vector extensions, MKL's reproducibility mode and the library versions.
    Recorded in every Parquet part (`sipt.env`) so `sipt status` can tell a stage resumed elsewhere."""
    global _STATIC_ENV
    if _STATIC_ENV is None:
        cpu, isa = _cpu()
        _STATIC_ENV = {"sipt": __version__, "python": platform.python_version(), "cpu": cpu, "isa": isa,
                       "mkl_cbwr": os.environ.get("MKL_CBWR", "")}
    env = dict(_STATIC_ENV)
    for lib in ("torch", "transformers", "vllm"):  # only the libraries this process actually uses
        if lib in sys.modules:
            env[lib] = getattr(sys.modules[lib], "__version__", None) or _dist_version(lib)
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        env["threads"] = torch.get_num_threads()
        env["device"] = "cuda:" + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return env


def _dist_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def part_environment(path: Path) -> dict:
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(ENV_KEY, b"{}"))


def mixed_environments(folder: Path) -> str:
    """'' when every part of `folder` was written under the same settings, else what differs
    (e.g. "threads 1 (2 parts) vs 2 (1 part)"): such a stage is only statistically equivalent to an
    uninterrupted one (README "Reproducibility")."""
    seen: dict[str, int] = {}
    for p in sorted(Path(folder).glob("*.parquet")):
        try:
            key = json.dumps(part_environment(p), sort_keys=True)
        except (OSError, pa.ArrowInvalid):
            continue
        seen[key] = seen.get(key, 0) + 1
    if len(seen) < 2:
        return ""
    envs = [(json.loads(k), n) for k, n in seen.items()]
    # A key only some parts have (torch's threads in a process that never loaded torch) decides nothing.
    shared = set.intersection(*(set(e) for e, _ in envs))
    keys = sorted(k for k in shared if len({str(e[k]) for e, _ in envs}) > 1)
    if not keys:
        return ""
    return "parts written under different settings: " + "; ".join(
        f"{k} " + " vs ".join(f"{e.get(k, '-')} ({n} part{'s' * (n > 1)})" for e, n in envs) for k in keys)


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


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


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


HOST = socket.gethostname()


def lock_path(run_dir: Path, out: Path) -> Path:
    """The lock file of a stage folder: `<run>/.locks/iter-002.eval.lock`, `<run>/.locks/samples.lock`."""
    try:
        rel = Path(out).relative_to(run_dir)
    except ValueError:  # a folder outside the run: lock it beside itself
        return Path(out).parent / f".{Path(out).name}.lock"
    return Path(run_dir) / ".locks" / (".".join(rel.parts) + ".lock")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _gone(holder: dict) -> bool:
    """The lock's writer ran on this host and has exited (a lock of another host cannot be checked)."""
    return holder.get("host") == HOST and not _pid_alive(int(holder.get("pid", 0) or 0))


def _who(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('started')}: "
            f"`{holder.get('command', '')}`")


class Lock:
    """One writer per stage folder: an exclusive `flock` on a file that holds the writer's pid, host,
    start time and command. The kernel drops the flock when the process dies, so a lock left by a
    killed process is taken over; a live holder makes `acquire` raise with its pid and host. A lock
    file written on another host cannot be checked from here (flock may not reach across hosts) and
    is refused with the path to delete once that process is known to be gone."""

    def __init__(self, path: Path, what: str):
        self.path, self.what, self.fd = Path(path), what, None

    def acquire(self) -> None:
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # another process's release removed the empty .locks/ just now
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_lock(fd) or {}
                os.close(fd)
                raise SiptError(
                    f"{self.what}: another sipt process is writing it ({_who(holder)})"
                    + ("; that process has exited, but a child of it still holds the lock: stop it"
                       if _gone(holder) else "; wait for it to finish, or stop it")
                ) from None
            try:  # the holder may have released (and removed) the file between our open and flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = _read_lock(fd)
        if holder and holder.get("host") != HOST:
            os.close(fd)
            raise SiptError(f"{self.what}: locked by {_who(holder)}, which cannot be checked from host {HOST}. "
                            f"If that process is no longer running, delete {self.path}")
        # free, or left by a process of this host that is gone (the flock went with it): ours now
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": HOST, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                  "command": " ".join(sys.argv)[:300]}).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # before closing: a waiter that opened it sees another inode
        os.close(self.fd)
        self.fd = None
        try:
            if self.path.parent.name == ".locks":
                self.path.parent.rmdir()  # the last lock of the run leaves no empty .locks/ behind
        except OSError:
            pass


def _read_lock(fd_or_path) -> dict | None:
    try:
        if isinstance(fd_or_path, int):
            raw = os.pread(fd_or_path, 65536, 0)
        else:
            raw = Path(fd_or_path).read_bytes()
        holder = json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def lock_holder(run_dir: Path, folder: Path) -> dict | None:
    """Who is writing `folder` now, from its lock file: None when nobody (no lock, or the process
    that left it is gone). A lock of another host is reported as held (it cannot be checked)."""
    holder = _read_lock(lock_path(run_dir, folder))
    return None if holder is None or _gone(holder) else holder


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
        return self.tmp / f"{family}-{index:05d}.parquet"

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

"""Executors: who processes a stage's parts (DESIGN §8).

A stage that works in parts (rollout, rewrite, judge) describes its work as a *job*: built in the
main process, picklable, with `parts` (one entry per part), `families` (the part files each part
writes, the last one written last) and
    open()      load the engine (in whichever process runs the parts),
    part(k)     do part k and return [(family, table, stats), ...] to write, in order,
    weight(k)   progress units of part k,
    close()     release the engine.
The executor runs `part(k)` for every part still to do and writes each result atomically into the
stage's temporary folder, so the results do not depend on who computed them (parts are seeded by
(run.seed, iteration, part), never by process):
  local, workers = 1   in this process (the default);
  local, workers = N   N spawned processes, each holding one engine and taking parts from a queue;
  ray                  N Ray actors (`run.ray_address`, or a local cluster), each holding one engine
                       (`run.worker_gpus` GPUs each: one vLLM engine per GPU on a cluster).
Workers write their parts themselves (the run directory must be on a shared filesystem for a
multi-node Ray cluster). A worker that dies loses only the part it was doing: the other workers go
on, and the stage then stops with "rerun to continue", which does just the missing parts.
"""

from __future__ import annotations

import contextlib
import os
import time
import traceback
from pathlib import Path

from sipt import artifacts
from sipt.errors import SiptError, StageInterrupted
from sipt.progress import progress_bar

EXECUTORS = ("local", "ray")


def _write(tmp: Path, k: int, outputs) -> None:
    path = None
    for family, table, stats in outputs:
        path = Path(tmp) / artifacts.part_name(k, family)
        artifacts.write_parquet_atomic(path, table, stats)
    if path is not None:
        artifacts.kill_point(path)


def _threads(run_cfg, workers: int) -> int:
    """torch threads of each worker: `run.threads`, else an equal share of the cores."""
    return run_cfg.threads if getattr(run_cfg, "threads", 0) > 0 else max(1, (os.cpu_count() or 1) // max(1, workers))


def run_parts(job, tmp: Path, run_cfg, *, label: str, unit: str = "", show_progress: bool = True) -> dict:
    """Process every part of `job` (`job.parts`) that `tmp` does not hold yet, so a rerun does just
    the missing ones; returns who did them (executor, workers) and timings (engine_load_s,
    engine_close_s). Each part records its process's threads and CPU (`artifacts.environment`)."""
    executor, workers = run_cfg.executor, max(1, run_cfg.workers)
    if executor not in EXECUTORS:
        raise SiptError(f"run.executor = {executor!r}: use one of {', '.join(EXECUTORS)}")
    todo = [k for k in range(len(job.parts)) if not _complete(job, tmp, k)]
    return {"executor": executor, "workers": workers,
            **_run_todo(job, todo, tmp, run_cfg, executor, workers, label, unit, show_progress)}


def _run_todo(job, todo, tmp, run_cfg, executor, workers, label, unit, show_progress) -> dict:
    if not todo:
        return {"engine_load_s": 0.0, "engine_close_s": 0.0}
    total = sum(job.weight(k) for k in range(len(job.parts)))
    with progress_bar(label, total=total, unit=unit, enabled=show_progress) as bar:
        bar.advance(total - sum(job.weight(k) for k in todo))
        if executor == "ray":
            return _ray(job, todo, tmp, run_cfg, bar)
        if workers > 1 and len(todo) > 1:
            return _processes(job, todo, tmp, min(workers, len(todo)), bar, run_cfg)
        with _torch_threads(getattr(run_cfg, "threads", 0)):
            t0 = time.perf_counter()
            job.open()
            timings = {"engine_load_s": round(time.perf_counter() - t0, 3)}
            try:
                for k in todo:
                    _write(tmp, k, job.part(k))
                    bar.advance(job.weight(k))
            finally:
                t0 = time.perf_counter()
                job.close()
                timings["engine_close_s"] = round(time.perf_counter() - t0, 3)
        return timings


@contextlib.contextmanager
def _torch_threads(threads: int):
    """Run the in-process parts on `threads` torch threads (0: leave torch's default), then restore."""
    if threads <= 0:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- local processes -----------------------------------------------------------------------------

def _process_worker(job, tmp: str, tasks, results, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    k = None
    try:
        job.open()
        try:
            while True:
                k = tasks.get()
                if k is None:
                    break
                _write(Path(tmp), k, job.part(k))
                results.put(("done", k, ""))
                k = None
        finally:
            job.close()
    except BaseException as e:  # report, then die: the part in flight is lost, the others go on
        results.put(("error", k, f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"))
        raise SystemExit(1) from None


def _processes(job, todo: list[int], tmp: Path, workers: int, bar, run_cfg) -> dict:
    import multiprocessing as mp
    import queue

    ctx = mp.get_context("spawn")  # a fresh interpreter: no forked torch threads or engine state
    tasks = ctx.Queue()
    # One results queue per worker: a worker killed hard (OOM, SIGKILL) while its queue's feeder thread
    # holds the write lock would leave a shared queue locked, and every other worker hanging on exit.
    results = [ctx.Queue() for _ in range(workers)]
    for k in todo:
        tasks.put(k)
    for _ in range(workers):
        tasks.put(None)
    procs = [ctx.Process(target=_process_worker, args=(job, str(tmp), tasks, q, _threads(run_cfg, workers)),
                         daemon=True) for q in results]
    for p in procs:
        p.start()
    errors = []
    try:
        while True:
            got = []
            for q in results:
                try:
                    while True:
                        got.append(q.get_nowait())
                except queue.Empty:
                    pass
            for kind, k, msg in got:
                if kind == "done":
                    bar.advance(job.weight(k))
                else:
                    errors.append((k, msg))
            if not got:
                if not any(p.is_alive() for p in procs):
                    break
                time.sleep(0.2)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    _check(job, todo, tmp, errors, [p.exitcode for p in procs])
    return {"engine_load_s": 0.0, "engine_close_s": 0.0}


def _check(job, todo, tmp, errors, exitcodes) -> None:
    missing = [k for k in todo if not _complete(job, tmp, k)]
    if not missing:
        return
    why = "; ".join(f"part {k}: {msg.splitlines()[0]}" for k, msg in errors[:3])
    died = [c for c in exitcodes if c not in (0, None)]
    if errors and all(SiptError.__name__ in msg.splitlines()[0] for _, msg in errors):
        raise SiptError(errors[0][1].splitlines()[0].split(": ", 1)[-1])
    raise StageInterrupted(
        f"{len(missing)} of {len(todo)} parts were not written ({len(died)} worker(s) died"
        + (f": {why}" if why else "") + "); the finished parts are kept")


def _complete(job, tmp, k) -> bool:
    return all((Path(tmp) / artifacts.part_name(k, family)).exists() for family in job.families)


# -- ray -----------------------------------------------------------------------------------------

def _ray(job, todo: list[int], tmp: Path, run_cfg, bar) -> dict:
    try:
        import ray
    except ImportError:
        raise SiptError("run.executor = 'ray' needs Ray: pip install 'sipt[ray]'") from None

    if not ray.is_initialized():
        kwargs = {"address": run_cfg.ray_address} if run_cfg.ray_address else {
            "num_cpus": max(run_cfg.workers, os.cpu_count() or 1), "include_dashboard": False}
        ray.init(ignore_reinit_error=True, log_to_driver=False, logging_level="ERROR", **kwargs)

    @ray.remote
    class PartWorker:
        def __init__(self, job, tmp, threads):
            import torch

            torch.set_num_threads(threads)
            self.job, self.tmp = job, tmp
            self.job.open()

        def part(self, k):
            _write(Path(self.tmp), k, self.job.part(k))
            return k

        def close(self):
            self.job.close()

    workers = min(max(1, run_cfg.workers), len(todo))
    actors = [PartWorker.options(num_cpus=1, num_gpus=run_cfg.worker_gpus).remote(job, str(tmp), _threads(run_cfg, workers))
              for _ in range(workers)]
    pending = list(todo)
    running = {}
    errors = []
    for a in actors:
        if pending:
            k = pending.pop(0)
            running[a.part.remote(k)] = (a, k)
    while running:
        ready, _ = ray.wait(list(running), num_returns=1)
        ref = ready[0]
        actor, k = running.pop(ref)
        try:
            ray.get(ref)
            bar.advance(job.weight(k))
        except Exception as e:  # the actor died or the part failed: only this part is lost
            errors.append((k, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
            try:
                ray.get(actor.close.remote(), timeout=5)
            except Exception:
                pass
            actor = None
        if actor is not None and pending:
            k = pending.pop(0)
            running[actor.part.remote(k)] = (actor, k)
        elif actor is None and pending and not running:  # every actor is gone: start a fresh one
            fresh = PartWorker.options(num_cpus=1, num_gpus=run_cfg.worker_gpus).remote(job, str(tmp), _threads(run_cfg, 1))
            k = pending.pop(0)
            running[fresh.part.remote(k)] = (fresh, k)
    for a in actors:
        try:
            ray.get(a.close.remote(), timeout=30)
        except Exception:
            pass
        ray.kill(a)
    _check(job, todo, tmp, errors, [1] * len(errors))
    return {"engine_load_s": 0.0, "engine_close_s": 0.0}

"""bench/scale: the rollout stage on 8 parts with 1 and 2 local workers and with Ray at 2 workers.

One run, one table: 64 prefixes in 8 parts of 8, 16 rollouts x 64 tokens each, on the tiny policy
(hf engine). Each column reruns the whole stage (`--force`), so its wall time includes starting the
workers and loading one engine per worker; Ray's column runs on a local Ray cluster started
beforehand (its start-up is reported apart). Every column must write the same rows as the
one-process run. On a 2-core machine expect at most 2x.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from sipt import artifacts, config as config_mod  # noqa: E402

PREFIXES, PER_PART, N, NEW_TOKENS = 64, 8, 16, 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    from shard import prepare_run
    from stages import rollout

    work = Path(tempfile.mkdtemp(prefix="sipt-bench-scale-"))
    run, _ = prepare_run(work, {
        "data.suffix_tokens": NEW_TOKENS, "data.max_prefix_tokens": 192, "run.prompts_per_iter": PREFIXES,
        "rollout.n": N, "rollout.prompts_per_part": PER_PART, "rollout.stop_at_eos": False,
    })
    import torch

    # (label, executor, workers, torch threads of the in-process run); each worker process uses
    # cpu_count / workers threads, so "1 worker, 1 thread" is what one of two workers computes alone.
    columns = [("local, 1 worker (in-process, all cores)", "local", 1, 0),
               ("local, 1 worker (in-process, 1 thread)", "local", 1, 1),
               ("local, 2 worker processes", "local", 2, 0), ("ray, 2 actors", "ray", 2, 0)]
    results, reference, ray_start = [], None, None
    default_threads = torch.get_num_threads()
    for label, executor, workers, threads in columns:
        torch.set_num_threads(threads or default_threads)
        if executor == "ray":
            import ray

            t0 = time.perf_counter()
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            ray_start = time.perf_counter() - t0
        cfg = config_mod.resolve(run, overrides={"run.executor": executor, "run.workers": workers}, force=True)
        best = None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            m = rollout.run(run, cfg, 0, force=True, show_progress=False)
            seconds = time.perf_counter() - t0
            best = seconds if best is None else min(best, seconds)
        rows = artifacts.read_table(run / "iter-000" / "rollout")
        if reference is None:
            reference = rows
        same = rows.equals(reference)
        results.append((label, best, m["stats"]["tokens"], m["parts"], same))
    torch.set_num_threads(default_threads)
    base = results[0][1]
    print(f"\nbench/scale: rollout stage, {PREFIXES} prefixes in {PREFIXES // PER_PART} parts x {N} rollouts x "
          f"{NEW_TOKENS} tokens, tiny policy, hf engine\n")
    one = results[1][1]
    print("| executor | wall s | tokens/s | vs 1 worker, all cores | vs 1 worker, 1 thread | parts | rows equal |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for label, seconds, tokens, parts, same in results:
        print(f"| {label} | {seconds:.1f} | {tokens / seconds:,.0f} | {base / seconds:.2f}× | {one / seconds:.2f}× | "
              f"{parts} | {'yes' if same else 'NO'} |")
    if ray_start is not None:
        print(f"\nStarting the local Ray cluster (not in the table): {ray_start:.1f} s.")


if __name__ == "__main__":
    main()

"""`sipt loop`: every stage of every iteration, in order, skipping what is done.

The filesystem is the state machine (DESIGN §3): each stage's `_SUCCESS.json` says whether it is
done for the current config and inputs, so the loop simply calls every stage; a finished stage
returns at once, a stage whose inputs changed reruns, and a stage that failed resumes from its
finished parts. After a crash or a kill, running the same loop again continues at the failed stage.

Per iteration i: rollout (when rollouts are candidates), rewrite (when rewrites are candidates),
judge, pair, train -> iter-(i+1)/policy, then eval of that policy. With train.objective = "ntp"
(the next-token-prediction baseline) an iteration is only train and eval. With
train.nproc_per_node > 1 the train stage runs as that many processes under torchrun
(`train_under_torchrun`); every other stage runs in the loop's process.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sipt import artifacts
from sipt.config import Config
from sipt.errors import SiptError


def iteration_stages(cfg: Config) -> list[str]:
    """The stages one iteration runs under this config, in order."""
    if cfg.train.objective == "ntp":
        return ["train"]
    names = []
    if "rollouts" in cfg.judge.candidates:
        names.append("rollout")
    if "rewrite" in cfg.judge.candidates:
        names.append("rewrite")
    return [*names, "judge", "pair", "train"]


def plan(cfg: Config, iterations: int, evaluate: bool) -> list[tuple[str, int | None]]:
    """(stage, iteration) in the order the loop runs them."""
    steps: list[tuple[str, int | None]] = [("init", None), ("shard", None)]
    if evaluate:
        steps.append(("eval", 0))
    for i in range(iterations):
        steps += [(name, i) for name in iteration_stages(cfg)]
        if evaluate:
            steps.append(("eval", i + 1))
    return steps


def check(run_dir: Path, cfg: Config, iterations: int, evaluate: bool) -> None:
    """Every planned stage's checks (paths that must exist, engines), before the loop freezes its config."""
    import importlib

    for name in dict.fromkeys(name for name, _ in plan(cfg, iterations, evaluate)):
        module = importlib.import_module(f"stages.{name}")
        if hasattr(module, "check"):
            module.check(cfg, run_dir)


def run(run_dir: Path, cfg: Config, iterations: int, *, evaluate: bool = True,
        show_progress: bool = True) -> Iterator[tuple[str, int | None, dict]]:
    """Run the plan; yield (stage, iteration, manifest) after each stage."""
    import importlib

    for name, i in plan(cfg, iterations, evaluate):
        module = importlib.import_module(f"stages.{name}")
        if name == "init":
            manifest = module.run(run_dir, cfg)
        elif name == "shard":
            manifest = module.run(run_dir, cfg, show_progress=show_progress)
        elif name == "train" and cfg.train.nproc_per_node > 1:
            manifest = train_under_torchrun(run_dir, cfg, i, show_progress=show_progress)
        else:
            manifest = module.run(run_dir, cfg, i, show_progress=show_progress)
        yield name, i, manifest


def train_under_torchrun(run_dir: Path, cfg: Config, iteration: int, *, show_progress: bool = True) -> dict:
    """`sipt train` of one iteration as `train.nproc_per_node` processes under torchrun, with `cfg`
    (written to a temporary TOML file: speed-only keys too); returns the train stage's manifest.

    The processes' output goes to stderr as it comes. A failure raises a SiptError with its last
    lines (the stage keeps its checkpoint: the next `sipt loop` resumes it); Ctrl-C stops them.
    """
    folder = artifacts.stage_dir(run_dir, "train", iteration)
    before = artifacts.read_manifest(folder)
    from sipt.training import process_device

    n = cfg.train.nproc_per_node
    process_device(cfg.train.device, n - 1, n)  # more processes than GPUs: say so before starting them
    with tempfile.TemporaryDirectory(prefix="sipt-train-") as tmp:
        config_file = Path(tmp) / "sipt.toml"
        config_file.write_text(cfg.to_toml())
        # `-m --`: torchrun starts `python -m sipt.cli` (no PATH lookup) and reads none of its flags
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               "-m", "--", "sipt.cli", "train", "--run", str(run_dir), "--iter", str(iteration),
               "--config", str(config_file), *([] if show_progress else ["--no-progress"])]
        code, tail = _run_passing_output(cmd)
    if code != 0:
        raise SiptError(f"{folder}: train under torchrun ({n} processes) exited with status {code}; fix what it "
                        f"says and rerun `sipt loop` (a crashed train resumes from its last checkpoint):\n{tail}")
    manifest = artifacts.read_manifest(folder)
    if manifest is None:
        raise SiptError(f"{folder}: train under torchrun exited cleanly but wrote no _SUCCESS.json:\n{tail}")
    if manifest == before:  # already done: the processes found it and did nothing
        return {**manifest, "skipped": True}
    return manifest


def _run_passing_output(cmd: list[str], lines: int = 40) -> tuple[int, str]:
    """Run `cmd`, copying its output (stdout and stderr) to our stderr; its exit status and what to
    show on failure: the sipt errors it printed (one per worker) above its last `lines` lines. It
    runs in its own session, so an interrupt here (Ctrl-C) reaches it only as our SIGTERM, which
    torchrun passes on to its workers."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True)
    tail: collections.deque[str] = collections.deque(maxlen=lines)
    errors: dict[str, None] = {}
    try:
        for line in proc.stdout:
            sys.stderr.write(line)
            tail.append(line)
            if line.startswith(("error:", "stage failed:")) and len(errors) < 8:
                errors[line] = None
        code = proc.wait()
    except BaseException:
        _stop(proc)
        raise
    finally:
        proc.stdout.close()
    return code, "".join(errors) + ("...\n" if errors else "") + "".join(tail)


def _stop(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM (torchrun then stops its workers), SIGKILL after `grace_s`."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass

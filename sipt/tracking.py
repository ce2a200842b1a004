"""Experiment tracking: every stage's manifest stats and train's per-step curves, sent to `run.report_to`.

One run-level log folder, `<run>/logs/`, and one x-axis for the whole loop: the optimizer step.
Train logs its lines of `log.jsonl` at their global step (`train/<key>`); every other stage logs the
numeric stats of its `_SUCCESS.json` once, when it commits, at the optimizer step that made its
iteration's policy (0 for iteration 0, init and shard): `<stage>/<key>`, nested keys joined with
`/`. Train's own stats go to `train_iter/<key>` at the step its iteration ended.

A stage that is skipped commits nothing and so logs nothing. TensorBoard writes one folder per
stage (`logs/train/`, `logs/eval/`, ...) and marks every (re)start in it with a purge point: a
resumed train purges the steps after its checkpoint and logs them again, a stage rerun with --force
purges its own later points and logs them again, so each tag holds one value per step. W&B, MLflow
and Trackio cannot forget points: a resumed train skips the steps it had already sent. API keys are
read by those libraries from the environment; nothing here reads or writes one.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import math
import os
import sys
import time
import uuid
from pathlib import Path

from sipt.errors import SiptError

BACKENDS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}
INSTALL = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow-skinny"}
STAGES = ("init", "shard", "rollout", "rewrite", "judge", "pair", "train", "eval")  # not `publish`
LOGS = "logs"

_configured: dict[Path, tuple[list[str], dict]] = {}  # run folder -> (backends, config as a dict)
_trackers: dict[Path, "Tracker"] = {}
_said_auto = _said_flag = False


def backends(report_to: list, where: str = "config") -> list[str]:
    """The backends `run.report_to` names, checked: a missing package is an error here, before any
    stage writes. ["auto"]: tensorboard when it is installed, else none (said once)."""
    global _said_auto
    names = [str(x).lower() for x in report_to]
    unknown = [n for n in names if n not in (*BACKENDS, "auto", "none")]
    if unknown or ("auto" in names and len(names) > 1):
        raise SiptError(f"{where}: run.report_to = {report_to!r}: name any of {', '.join(BACKENDS)} "
                        "(e.g. [\"tensorboard\", \"wandb\"]), or [\"auto\"] alone, or [] for none")
    if names == ["auto"]:
        if _importable("tensorboard"):
            return ["tensorboard"]
        if not _said_auto:
            _said_auto = True
            print("sipt: tensorboard is not installed, so no experiment tracking (run.report_to = [\"auto\"]); "
                  "pip install tensorboard, or set run.report_to", file=sys.stderr)
        return []
    chosen = list(dict.fromkeys(n for n in names if n != "none"))
    for name in chosen:
        if not _importable(BACKENDS[name]):
            raise SiptError(f"{where}: run.report_to names {name}, but the {BACKENDS[name]} package is not "
                            f"installed: pip install {INSTALL[name]}, or leave {name} out of run.report_to")
    return chosen


def chosen(cfg, where: str = "config") -> list[str]:
    """`backends` of the config, and tensorboard where the deprecated `train.tensorboard` is true."""
    global _said_flag
    names = backends(cfg.run.report_to, where)
    if cfg.train.tensorboard and "tensorboard" not in names:
        if not _importable("tensorboard"):
            raise SiptError(f"{where}: train.tensorboard = true needs the tensorboard package: pip install "
                            "tensorboard")
        names.append("tensorboard")
    if cfg.train.tensorboard and not _said_flag:
        _said_flag = True
        print("sipt: train.tensorboard is deprecated: set run.report_to = [\"tensorboard\"] (train's curves are "
              f"now in <run>/{LOGS}/train/, not train/tb/)", file=sys.stderr)
    return names


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def configure(run_dir: Path, cfg, where: str = "config") -> None:
    """Where this process's stages of `run_dir` report: the resolved config's `run.report_to`
    (checked here: `config.resolve` calls this before it writes anything)."""
    key = Path(run_dir).resolve()
    names = chosen(cfg, where)
    old = _trackers.get(key)
    if old is not None and old.names != names:
        old.close()
        del _trackers[key]
    _configured[key] = (names, cfg.to_dict())


def tracker(run_dir: Path) -> "Tracker | None":
    """The run's tracker (opened on first use), or None when nothing is reported."""
    key = Path(run_dir).resolve()
    if key not in _trackers:
        if key not in _configured:  # a stage run without `config.resolve`: the run's frozen config
            from sipt import config as config_mod

            frozen = key / config_mod.FROZEN
            report_to = ["auto"]
            if frozen.exists():
                report_to = config_mod.load_toml(frozen).get("run", {}).get("report_to", ["auto"])
            _configured[key] = (backends(report_to, str(frozen)), {})
        names, config = _configured[key]
        if not names:
            return None
        _trackers[key] = Tracker(key, names, config)
    return _trackers[key]


def step_of(run_dir: Path, iteration: int | None) -> int:
    """The optimizer step that made iteration `iteration`'s policy: the global step of the last
    finished train before it (0 when there is none)."""
    from sipt import artifacts

    for i in range((iteration or 0) - 1, -1, -1):
        manifest = artifacts.read_manifest(artifacts.stage_dir(run_dir, "train", i))
        if manifest is not None:
            try:
                return int(manifest["stats"]["global_step"])
            except (ValueError, KeyError, TypeError):
                continue
    return 0


def scalars(stats: dict, prefix: str) -> dict[str, float]:
    """The numeric values of a stats dict as `prefix/key` (nested dicts: `prefix/key/sub`)."""
    out = {}
    for k, v in stats.items():
        if isinstance(v, dict):
            out.update(scalars(v, f"{prefix}/{k}"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[f"{prefix}/{k}"] = float(v)
    return out


def manifest_scalars(manifest: dict) -> tuple[int, dict[str, float]] | None:
    """(step, tags) for a committed manifest; None for what is not logged (publish)."""
    stage = manifest.get("stage")
    if stage not in STAGES:
        return None
    stats = manifest.get("stats") or {}
    if stage == "train":
        step, prefix = int(stats.get("global_step", 0)), "train_iter"
    else:
        step, prefix = None, stage
    values = scalars(stats, prefix)
    for k in ("rows", "seconds"):
        if isinstance(manifest.get(k), (int, float)):
            values.setdefault(f"{prefix}/{k}", float(manifest[k]))
    return step, values


def log_manifest(run_dir: Path, manifest: dict) -> None:
    """Log a stage's manifest stats (called by `Stage.commit`, after `_SUCCESS.json` is written)."""
    found = manifest_scalars(manifest)
    if found is None:
        return
    t = tracker(run_dir)
    if t is None:
        return
    step, values = found
    if step is None:
        step = step_of(run_dir, manifest.get("iteration"))
    t.log_stage(manifest["stage"], manifest.get("iteration"), step, values)


class TrainCurves:
    """Train's per-step scalars of one iteration. `start_step`: the global step it starts from (the
    previous iteration's, or the restored checkpoint's); `sent`: the last global step an earlier
    process of this stage logged (None: none)."""

    def __init__(self, run_dir: Path, start_step: int, sent: int | None):
        self.t = tracker(run_dir)
        self.sent = sent
        if self.t is not None:
            self.t.purge("train", start_step + 1)

    def log(self, line: dict) -> None:
        if self.t is None:
            return
        step = int(line["step"])
        values = {f"train/{k}": float(v) for k, v in line.items()
                  if k not in ("step", "iter_step") and isinstance(v, (int, float)) and math.isfinite(v)}
        self.t.log("train", step, values, again=self.sent is not None and step <= self.sent)

    def flush(self) -> None:
        if self.t is not None:
            self.t.flush()


class Tracker:
    """The open backends of one run."""

    def __init__(self, run_dir: Path, names: list[str], config: dict):
        self.run_dir, self.names, self.config = run_dir, names, config
        self.dir = run_dir / LOGS
        self.dir.mkdir(parents=True, exist_ok=True)
        self._tb: dict[str, object] = {}
        self._ids = self._load_ids()
        self._wandb = self._mlflow = self._trackio = None
        if "wandb" in names:
            self._open_wandb()
        if "mlflow" in names:
            self._open_mlflow()
        if "trackio" in names:
            self._open_trackio()
        atexit.register(self.close)

    # -- ids that make every command of a run log into the same W&B / MLflow run ------------------
    def _load_ids(self) -> dict:
        path = self.dir / "tracking.json"
        ids = json.loads(path.read_text()) if path.exists() else {}
        if "id" not in ids:
            ids["id"] = uuid.uuid4().hex[:16]
            path.write_text(json.dumps(ids, indent=2))
        return ids

    def _save_ids(self) -> None:
        (self.dir / "tracking.json").write_text(json.dumps(self._ids, indent=2))

    def _open_wandb(self) -> None:
        import wandb

        kwargs = {} if os.environ.get("WANDB_DIR") else {"dir": str(self.dir)}
        self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "sipt"), name=self.run_dir.name,
                                 id=f"sipt-{self._ids['id']}", resume="allow", config=self.config or None,
                                 **kwargs)
        # the x-axis is our global step: points may arrive out of wandb's own step order (a stage rerun)
        self._wandb.define_metric("global_step")
        self._wandb.define_metric("*", step_metric="global_step")

    def _open_mlflow(self) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # the run's own file store (MLflow 3 asks to opt in to it; a server needs sqlalchemy)
            uri = (self.dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "sipt")
        exp = client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
        run_id = self._ids.get("mlflow_run_id")
        if run_id is not None:
            try:
                client.update_run(run_id, status="RUNNING")  # each command ends it FINISHED (`close`)
            except Exception:  # noqa: BLE001 - another tracking server, or the run was deleted
                run_id = None
        if run_id is None:
            run_id = client.create_run(exp_id, run_name=self.run_dir.name).info.run_id
            self._ids["mlflow_run_id"] = run_id
            self._save_ids()
        self._mlflow = (client, run_id)

    def _open_trackio(self) -> None:
        import trackio

        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "sipt"), name=f"{self.run_dir.name}-{self._ids['id']}",
                     resume="allow", config=self.config or None)
        self._trackio = trackio

    # -- TensorBoard: one writer per stage folder, opened after every older event file ----------
    def _writer(self, stage: str):
        if stage not in self._tb:
            from torch.utils.tensorboard import SummaryWriter

            folder = self.dir / stage
            folder.mkdir(parents=True, exist_ok=True)
            # TensorBoard reads a folder's event files in name order (their names start with the
            # creation second): a purge point only affects the files named before it.
            newest = max((int(p.name.split(".")[3]) for p in folder.glob("events.out.tfevents.*")
                          if p.name.split(".")[3].isdigit()), default=0)
            deadline = time.time() + 2  # a file from a host whose clock is ahead: do not wait for it
            while int(time.time()) <= newest and time.time() < deadline:
                time.sleep(0.05)
            self._tb[stage] = SummaryWriter(str(folder))
        return self._tb[stage]

    def purge(self, stage: str, step: int) -> None:
        """Make TensorBoard forget this stage's points at `step` and after (logged before now)."""
        if "tensorboard" not in self.names:
            return
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        writer = self._writer(stage)
        writer._get_file_writer().add_event(Event(step=step, wall_time=time.time(),
                                                  session_log=SessionLog(status=SessionLog.START)))

    def log(self, stage: str, step: int, values: dict[str, float], again: bool = False) -> None:
        """`values` at `step`. `again`: sent before by another process (only TensorBoard, which
        purged them, gets them again)."""
        if "tensorboard" in self.names:
            writer = self._writer(stage)
            for tag, v in values.items():
                writer.add_scalar(tag, v, step)
        if again or not values:
            return
        if self._wandb is not None:
            self._wandb.log({**values, "global_step": step})
        if self._mlflow is not None:
            from mlflow.entities import Metric

            client, run_id = self._mlflow
            now = int(time.time() * 1000)
            metrics = [Metric(tag, v, now, step) for tag, v in values.items()]
            for k in range(0, len(metrics), 1000):  # MLflow's batch limit
                client.log_batch(run_id, metrics=metrics[k : k + 1000])
        if self._trackio is not None:
            self._trackio.log(values, step=step)

    def log_stage(self, stage: str, iteration: int | None, step: int, values: dict[str, float]) -> None:
        """A committed stage's stats. TensorBoard: purge this stage's points from `step` on and log
        its later finished iterations again (a --force rerun of one iteration keeps the others)."""
        if stage != "train":  # train purged at its start (`TrainCurves`): its curves share the folder
            self.purge(stage, step)
        self.log(stage, step, values)
        if stage != "train" and iteration is not None and "tensorboard" in self.names:
            for path in sorted(self.run_dir.glob(f"iter-*/{stage}/_SUCCESS.json")):
                later = json.loads(path.read_text())
                if (later.get("iteration") or 0) > iteration:
                    _, v = manifest_scalars(later)
                    self.log(stage, step_of(self.run_dir, later["iteration"]), v, again=True)
        self.flush()

    def flush(self) -> None:
        for w in self._tb.values():
            w.flush()

    def close(self) -> None:
        for w in self._tb.values():
            w.close()
        self._tb = {}
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._mlflow is not None:
            client, run_id = self._mlflow
            client.set_terminated(run_id)
            self._mlflow = None
        if self._trackio is not None:
            self._trackio.finish()
            self._trackio = None

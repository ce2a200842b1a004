"""Experiment tracking (run.report_to): what each stage logs, at which step, once; read back from the files."""

import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require
from sipt import artifacts, config as config_mod, loop, tracking
from sipt.errors import SiptError
from stages import eval as eval_stage
from stages import train
from test_train import crash_train_in_step_4, paired  # noqa: F401 - paired: the fixture

LOOP = {"eval.prompts": 8, "eval.judge_seeds": 1, "train.batch_size": 4, "train.micro_batch_size": 4,
        "train.lr": 1e-3, "train.warmup_steps": 1, "judge.candidates": ["suffix", "rewrite", "rollouts"],
        "run.iterations": 2, "run.report_to": ["tensorboard"]}


def read_events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows them (purged points dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def files_of(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def wrun(world_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world_run, run, ignore=shutil.ignore_patterns("world"))
    return run


def test_two_loop_iterations_log_every_stage_once_at_the_optimizer_step(wrun):
    require("tensorboard")
    cfg = config_mod.resolve(wrun, overrides=LOOP)
    list(loop.run(wrun, cfg, 2, show_progress=False))
    manifest = {(s, i): artifacts.read_manifest(artifacts.stage_dir(wrun, s, i))
                for s in ("rollout", "rewrite", "judge", "pair", "train", "eval") for i in (0, 1, 2)
                if (artifacts.stage_dir(wrun, s, i) / artifacts.SUCCESS).exists()}
    g = [0, manifest[("train", 0)]["stats"]["global_step"], manifest[("train", 1)]["stats"]["global_step"]]
    assert 0 < g[1] < g[2]
    logs = wrun / "logs"
    events = {p.name: read_events(p) for p in logs.iterdir() if p.is_dir()}
    assert {"shard", "rollout", "rewrite", "judge", "pair", "train", "eval"} <= set(events)  # a folder a stage
    # rollout .. pair of iteration i at the step that made policy i; eval of i as well; each once
    for stage in ("rollout", "rewrite", "judge", "pair"):
        assert f"{stage}/seconds" in events[stage]
        assert all([s for s, _ in pts] == [0, g[1]] for pts in events[stage].values()), stage
    assert [s for s, _ in events["eval"]["eval/quality_win_rate"]] == [0, g[1], g[2]]
    # (a few keys exist from iteration 1 on: the judge's position bias needs a trained policy)
    assert all([s for s, _ in pts] == [x for x in (0, g[1], g[2]) if x >= pts[0][0]] for pts in events["eval"].values())
    assert all([s for s, _ in pts] == [0] for stage in ("init", "shard") for pts in events.get(stage, {}).values())
    for i in (0, 1):
        pair = manifest[("pair", i)]["stats"]
        assert dict(events["pair"]["pair/rollout_chosen_rate"])[g[i]] == pytest.approx(pair["rollout_chosen_rate"])
        for source, reward in pair["mean_reward_by_source"].items():
            assert dict(events["pair"][f"pair/mean_reward_by_source/{source}"])[g[i]] == pytest.approx(reward)
        assert dict(events["judge"]["judge/seconds"])[g[i]] == pytest.approx(manifest[("judge", i)]["seconds"])
    for i in (0, 1, 2):
        stats = manifest[("eval", i)]["stats"]
        assert dict(events["eval"]["eval/quality_win_rate"])[g[i]] == pytest.approx(stats["quality_win_rate"])
    # train: every optimizer step once, as in log.jsonl; its stage stats at the end of each iteration
    lines = [json.loads(line) for i in (0, 1)
             for line in (artifacts.stage_dir(wrun, "train", i) / "log.jsonl").read_text().splitlines()]
    assert events["train"]["train/loss"] == [(x["step"], pytest.approx(x["loss"])) for x in lines]
    assert [s for s, _ in events["train"]["train/loss"]] == list(range(1, g[2] + 1))
    assert {"train/lr", "train/margin", "train/acc", "train/tokens_per_s"} <= set(events["train"])
    assert [s for s, _ in events["train"]["train_iter/final_loss"]] == [g[1], g[2]]

    # a rerun skips every stage and logs nothing
    before = files_of(logs)
    list(loop.run(wrun, config_mod.resolve(wrun, overrides=LOOP), 2, show_progress=False))
    assert files_of(logs) == before
    # a forced rerun of eval 1 replaces its points and keeps eval 2's: still one value per step
    eval_stage.run(wrun, cfg, 1, force=True, show_progress=False)
    again = read_events(logs / "eval")
    assert again.keys() == events["eval"].keys()
    assert all([s for s, _ in again[tag]] == [s for s, _ in pts] for tag, pts in events["eval"].items())


def test_resumed_train_continues_its_curves_without_duplicates(paired, monkeypatch):  # noqa: F811
    require("tensorboard")
    require("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run, _ = paired
    cfg = config_mod.resolve(run, overrides={"train.checkpoint_every": 2, "train.epochs": 2,
                                             "run.report_to": ["tensorboard", "mlflow"]}, force=True)
    real_loss = crash_train_in_step_4(run, cfg, monkeypatch)
    tracking.tracker(run).flush()
    assert [s for s, _ in read_events(run / "logs" / "train")["train/loss"]] == [1, 2, 3]
    monkeypatch.setattr(train, "_loss", real_loss)
    manifest = train.run(run, cfg, 0, show_progress=False)
    n = manifest["stats"]["steps"]
    lines = [json.loads(line) for line in (run / "iter-000" / "train" / "log.jsonl").read_text().splitlines()]
    # TensorBoard purged step 3 (after the step-2 checkpoint) and has the redone steps; each step once
    assert read_events(run / "logs" / "train")["train/loss"] == [(x["step"], pytest.approx(x["loss"])) for x in lines]
    assert [x["step"] for x in lines] == list(range(1, n + 1))
    # MLflow cannot forget a point: the steps it had (1..3) are not sent again
    client, run_id = tracking.tracker(run)._mlflow
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, n + 1))
    assert [m.step for m in client.get_metric_history(run_id, "train_iter/final_loss")] == [n]


def test_report_to_is_checked_before_anything_is_written(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real = tracking._importable
    monkeypatch.setattr(tracking, "_importable", lambda m: False if m in ("wandb", "tensorboard") else real(m))
    with pytest.raises(SiptError, match=r"run.report_to names wandb, but the wandb package is not installed: "
                                        r"pip install wandb"):
        config_mod.resolve(run, overrides={"run.report_to": ["wandb"]})
    with pytest.raises(SiptError, match=r"run.report_to = \['tensorbord'\]: name any of tensorboard, wandb"):
        config_mod.resolve(run, overrides={"run.report_to": ["tensorbord"]})
    with pytest.raises(SiptError, match=r"train.tensorboard = true needs the tensorboard package"):
        config_mod.resolve(run, overrides={"train.tensorboard": True, "run.report_to": []})
    assert not run.exists()
    # auto without tensorboard: no tracking, said once
    monkeypatch.setattr(tracking, "_said_auto", False)
    assert tracking.backends(["auto"]) == tracking.backends(["auto"]) == []
    assert capsys.readouterr().err.count("tensorboard is not installed") == 1
    monkeypatch.setattr(tracking, "_importable", real)
    assert tracking.backends([]) == tracking.backends(["none"]) == []
    # the deprecated flag still turns TensorBoard on
    cfg = config_mod.build(config_mod.apply_overrides({}, {"train.tensorboard": True, "run.report_to": []}))
    assert tracking.chosen(cfg) == ["tensorboard"]


def _wandb_history(run_file: Path) -> list[dict]:
    """The history rows of a W&B offline run file (a LevelDB-style log of 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, rows, buf, pos = run_file.read_bytes(), [], b"", 7
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf, pos = buf + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4) and buf:  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


SECRETS = {"WANDB_API_KEY": "5ec4e7c0ffee5ec4e7c0ffee5ec4e7c0ffee5ec4", "MLFLOW_TRACKING_PASSWORD": "pw-5ec4e7-mlflow",
           "MLFLOW_TRACKING_TOKEN": "tok-5ec4e7-mlflow", "HF_TOKEN": "hf_5ec4e7c0ffee5ec4e7c0ffee"}


@pytest.mark.slow
def test_wandb_mlflow_trackio_offline_and_no_api_key_in_the_run(tmp_path, corpus_dir, monkeypatch):
    for module in ("tensorboard", "wandb", "mlflow", "trackio"):
        require(module)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks to opt in to its file store
    run = tmp_path / "run"
    env = {**os.environ, **SECRETS, "WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
           "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
           "TRACKIO_DIR": str(run / "logs" / "trackio"), "OMP_NUM_THREADS": "1"}
    for key in ("WANDB_DIR", "MLFLOW_TRACKING_URI"):  # both default to the run's logs/ folder
        env.pop(key, None)
    cmd = [sys.executable, "-m", "sipt.cli", "loop", "--run", str(run), "--no-eval", "--no-progress",
           "--set", f"data.inputs={json.dumps([str(corpus_dir)])}", "--set", "model.vocab_size=512",
           "--set", 'train.objective="ntp"', "--set", "run.prompts_per_iter=16", "--set", "train.batch_size=8",
           "--set", "train.micro_batch_size=8", "--set", "data.suffix_tokens=12", "--set", "data.max_prefix_tokens=32",
           "--set", 'run.report_to=["tensorboard", "wandb", "mlflow", "trackio"]']
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    n = artifacts.read_manifest(run / "iter-000" / "train")["stats"]["global_step"]
    docs = artifacts.read_manifest(run / "samples")["stats"]["docs"]
    steps = list(range(1, n + 1))
    assert [s for s, _ in read_events(run / "logs" / "train")["train/loss"]] == steps
    # W&B (offline): the loss at each global step, shard's stats at 0
    (wandb_file,) = (run / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    history = _wandb_history(wandb_file)
    assert [r["global_step"] for r in history if "train/loss" in r] == steps
    assert [(r["global_step"], r["shard/docs"]) for r in history if "shard/docs" in r] == [(0, docs)]
    # MLflow (the run's file store)
    from mlflow.tracking import MlflowClient

    ids = json.loads((run / "logs" / "tracking.json").read_text())
    client = MlflowClient(tracking_uri=(run / "logs" / "mlruns").resolve().as_uri())
    assert [m.step for m in client.get_metric_history(ids["mlflow_run_id"], "train/loss")] == steps
    assert [(m.step, m.value) for m in client.get_metric_history(ids["mlflow_run_id"], "shard/docs")] == [(0, docs)]
    # Trackio (local SQLite)
    db = sqlite3.connect(run / "logs" / "trackio" / "sipt.db")
    logged = [(step, json.loads(m)) for step, m in db.execute("SELECT step, metrics FROM metrics ORDER BY id")]
    assert [step for step, m in logged if "train/loss" in m] == steps
    assert [m["shard/docs"] for _, m in logged if "shard/docs" in m] == [docs]

    # a rerun skips every stage: nothing new anywhere
    before = files_of(run / "logs")
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and again.stdout.count("already done") == 3, again.stdout + again.stderr[-2000:]
    assert files_of(run / "logs") == before
    # a later command continues the same W&B / MLflow / Trackio run
    more = subprocess.run([*cmd[:3], "train", "--run", str(run), "--iter", "1", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert more.returncode == 0, more.stderr[-3000:]
    total = artifacts.read_manifest(run / "iter-001" / "train")["stats"]["global_step"]
    steps = list(range(1, total + 1))
    assert [s for s, _ in read_events(run / "logs" / "train")["train/loss"]] == steps
    assert [m.step for m in client.get_metric_history(ids["mlflow_run_id"], "train/loss")] == steps
    assert json.loads((run / "logs" / "tracking.json").read_text()) == ids
    history = [r for f in sorted((run / "logs" / "wandb").glob("offline-run-*/run-*.wandb")) for r in _wandb_history(f)]
    assert [r["global_step"] for r in history if "train/loss" in r] == steps
    assert len({f.name for f in (run / "logs" / "wandb").glob("offline-run-*/run-*.wandb")}) == 1  # one W&B id
    logged = [json.loads(x) for (x,) in db.execute("SELECT metrics FROM metrics ORDER BY id")]
    assert [x["train_iter/global_step"] for x in logged if "train_iter/global_step" in x] == [n, total]
    # the keys in the environment are nowhere in the run folder
    for path in run.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for name, secret in SECRETS.items():
                assert secret.encode() not in data, f"{name} found in {path}"

import subprocess
import sys

from typer.testing import CliRunner

from sipt.cli import app

runner = CliRunner()


def test_help_lists_every_stage():
    result = runner.invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    for name in "init world shard rewrite rollout judge pair train eval report loop status judge-data judge-train".split():
        assert f" {name} " in result.output, name


def test_every_command_has_help():
    for name in ("init", "shard", "rollout", "rewrite", "judge", "pair", "train", "eval", "loop", "report",
                 "plan", "status", "world", "judge-data", "judge-train"):
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, name
        assert "not implemented" not in result.output


def test_report_of_a_missing_run_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sipt.cli", "report", "--run", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "no such run directory" in proc.stderr


def test_unknown_config_key_from_command_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sipt.cli", "shard", "--run", str(tmp_path / "r"), "--set", "data.sufix_tokens=3"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "unknown key 'data.sufix_tokens'" in proc.stderr and "suffix_tokens" in proc.stderr
    assert not (tmp_path / "r" / "samples").exists()


def test_status_json_and_config_reference(tmp_path, run_with_policy):
    import json

    result = runner.invoke(app, ["status", "--run", str(run_with_policy), "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.output)
    assert {"iteration": 0, "stage": "policy"}.items() <= rows[1].items()
    result = runner.invoke(app, ["config", "reference"])
    assert "`suffix_tokens`" in result.output


def sipt(capsys, monkeypatch, *args) -> tuple[int, str, str]:
    """Run the `sipt` entry point in-process: (exit code, stdout, stderr)."""
    import pytest

    from sipt import cli

    monkeypatch.setattr(sys, "argv", ["sipt", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


def _snapshot(run):
    """Every file of a run (path -> bytes) and every folder: what a refused command must leave alone."""
    return {str(p.relative_to(run)): p.read_bytes() if p.is_file() else None for p in run.rglob("*")}


def test_refused_commands_change_nothing_on_disk(world_run, tmp_path, capsys, monkeypatch):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world_run, run)
    before = _snapshot(run)
    assert "sipt.toml" in before and before["iter-000/rollout/_SUCCESS.json"]
    refused = [
        (["rollout", "--run", run, "--iter", 0, "--n", -3], "rollout.n = -3 must be >= 1"),
        (["judge", "--run", run, "--engine", "hf", "--model", tmp_path / "not" / "a" / "model"],
         "judge.model = " + str(tmp_path / "not" / "a" / "model") + ": no such folder"),
        (["judge", "--run", run, "--set", 'judge.world="' + str(tmp_path / "bad") + '"'],
         str(tmp_path / "bad" / "kb.json") + ": the oracle judge needs the toy world"),
        (["rollout", "--run", run, "--iter", 0, "--n", 0, "--force"], "rollout.n = 0 must be >= 1"),
    ]
    for args, message in refused:
        code, _, err = sipt(capsys, monkeypatch, *args)
        assert code == 2 and message in err, (args, err)
        assert _snapshot(run) == before, args
    # the run is as usable as before: the same command without the bad value is a skip
    code, out, _ = sipt(capsys, monkeypatch, "rollout", "--run", run, "--iter", 0, "--no-progress")
    assert code == 0 and "already done" in out


def test_refused_first_command_creates_no_run(tmp_path, capsys, monkeypatch):
    code, _, err = sipt(capsys, monkeypatch, "shard", "--run", tmp_path / "new", "--set", "data.eval_fraction=1.5")
    assert code == 2 and "data.eval_fraction = 1.5 must be between 0 and 1" in err
    assert not (tmp_path / "new").exists()


def test_negative_iteration_is_refused(run_with_policy, capsys, monkeypatch):
    code, _, err = sipt(capsys, monkeypatch, "rollout", "--run", run_with_policy, "--iter", -1)
    assert code == 2 and "Invalid value for '--iter'" in err and "greater than or equal to 0" in err
    assert sorted(p.name for p in run_with_policy.iterdir()) == ["iter-000"]


def test_error_messages_keep_brackets(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.toml"
    bad.write_text("[rolout]\nn = 4\n")
    code, _, err = sipt(capsys, monkeypatch, "shard", "--run", tmp_path / "r", "--config", bad)
    assert code == 2 and "unknown section [rolout]. Did you mean 'rollout'?" in err
    code, _, err = sipt(capsys, monkeypatch, "shard", "--run", tmp_path / "r", "--input", tmp_path / "data[v2].jsonl")
    assert code == 2 and str(tmp_path / "data[v2].jsonl") + ": the pattern matches no file" in err


def test_an_existing_path_with_glob_characters_is_taken_literally(tmp_path):
    from sipt import corpus
    from sipt.config import DataConfig

    from conftest import write_jsonl

    path = write_jsonl(tmp_path / "data[v2].jsonl", ["one document", "another"])
    write_jsonl(tmp_path / "data2.jsonl", ["a file the pattern data[v2].jsonl matches"])
    cfg = DataConfig(inputs=[str(path)])
    assert corpus.resolve_sources(cfg) == [("jsonl", str(path))]
    assert [d.text for d in corpus.iter_documents(cfg)] == ["one document", "another"]
    assert corpus.resolve_sources(DataConfig(inputs=[str(tmp_path / "data[0-9].jsonl")])) == [
        ("jsonl", str(tmp_path / "data2.jsonl"))]  # a path that does not exist is still a pattern

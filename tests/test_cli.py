import subprocess
import sys

from typer.testing import CliRunner

from sipt.cli import app

runner = CliRunner()


def test_help_lists_every_stage():
    result = runner.invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    for name in "init world shard rewrite rollout judge pair train eval report loop status".split():
        assert f" {name} " in result.output, name


def test_every_command_has_help():
    for name in ("init", "shard", "rollout", "rewrite", "judge", "pair", "train", "eval", "loop", "report",
                 "plan", "status", "world"):
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

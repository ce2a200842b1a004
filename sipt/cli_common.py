"""What every `sipt` command shares: the typer app, the consoles, the common options and `--set`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from sipt import config as config_mod

app = typer.Typer(
    help="Self-Improving Pretraining: rollouts from the policy, judgments from a strong model, "
    "online DPO / RF-NLL updates. Every stage reads and writes Parquet under --run.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

RunOpt = Annotated[Path, typer.Option("--run", "-r", help="Run directory (created on first use).")]
ConfigOpt = Annotated[
    Optional[Path], typer.Option("--config", "-c", help="TOML config. Default: the run's frozen sipt.toml.")
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a config key: section.key=value (repeatable)."),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Rerun even if done; accept config changes.")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]
ExecutorOpt = Annotated[Optional[str], typer.Option(
    "--executor", help="local or ray: who processes the parts (run.executor).")]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", help="Parallel workers, each with its own engine (run.workers).")]
IterOpt = Annotated[int, typer.Option("--iter", min=0, help="Iteration (its policy is iter-NNN/policy).")]
EngineOpt = Annotated[Optional[str], typer.Option("--engine", help="hf, vllm or openai.")]


def overrides(sets: list[str] | None, flags: dict[str, Any]) -> dict[str, Any]:
    """`--set section.key=value` options, then a command's own flags (None: not given; a flag wins over a
    --set of the same key), as the dict `config.apply_overrides` takes: section.key -> value."""
    values = {f"{section}.{key}": value for section, key, value in map(config_mod.parse_override, sets or [])}
    values.update({k: v for k, v in flags.items() if v is not None})
    return values

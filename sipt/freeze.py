"""Resolving the config a command runs with and freezing it into the run's `sipt.toml`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sipt.config import FROZEN, Config, build, validate
from sipt.config_toml import apply_overrides, load_toml, write_atomic
from sipt.errors import SiptError


def diff(a: Config, b: Config, *, results_only: bool = True) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    da, db = a.to_dict(results_only=results_only), b.to_dict(results_only=results_only)
    return [
        f"{s}.{k}"
        for s in da
        for k in da[s]
        if da[s][k] != db.get(s, {}).get(k)
    ]


def resolve(
    run_dir: Path,
    config_file: Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    force: bool = False,
    check: Callable[[Config], None] | None = None,
) -> Config:
    """The config a command runs with, frozen into `run_dir/sipt.toml` on first use.

    Order: the frozen file (or `config_file`, or defaults), then `overrides`. A new value for a key
    that no finished stage depends on yet is simply frozen; a change to a result-affecting key that
    a finished stage was made with is refused unless `force`, which re-freezes it (the stages that
    depend on it then show as stale). The whole resolved config is validated (`validate`, then
    `check`) before anything is written: a refused command changes nothing on disk.
    """
    run_dir = Path(run_dir)
    frozen_path = run_dir / FROZEN
    frozen = build(load_toml(frozen_path), str(frozen_path)) if frozen_path.exists() else None
    if config_file is not None:
        base = load_toml(config_file)
        where = str(config_file)
    elif frozen is not None:
        base, where = frozen.to_dict(), str(frozen_path)
    else:
        base, where = {}, "defaults"
    where = where if not overrides else f"{where} + overrides"
    resolved = build(apply_overrides(base, overrides or []), where)
    validate(resolved, where)
    if check is not None:  # the command's own checks (paths that must exist, engines), before any write
        check(resolved)
    from sipt import tracking

    tracking.configure(run_dir, resolved, where)  # run.report_to: a missing package is refused before any write
    if frozen is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(frozen_path, resolved.to_toml())
        return resolved
    changed = diff(frozen, resolved)
    used = _keys_in_use(run_dir, changed)
    if used and not force:
        shown = ", ".join(
            f"{k} ({_get(frozen, k)!r} -> {_get(resolved, k)!r}, used by {used[k]})" for k in list(used)[:6]
        )
        raise SiptError(
            f"{frozen_path}: finished stages were made with other values for {shown}. "
            "Use a new --run directory, or pass --force to re-freeze the config "
            "(the stages that depend on these keys become stale)."
        )
    if changed:  # keys no finished stage depends on yet, or forced; speed-only keys are never frozen
        write_atomic(frozen_path, resolved.to_toml())
    return resolved


def _keys_in_use(run_dir: Path, keys: list[str]) -> dict[str, str]:
    """Which of `keys` a finished stage of the run depends on (key -> that stage's folder)."""
    used: dict[str, str] = {}
    for marker in sorted([*run_dir.glob("*/_SUCCESS.json"), *run_dir.glob("iter-*/*/_SUCCESS.json")]):
        try:
            sections = json.loads(marker.read_text()).get("config_sections") or []
        except (OSError, json.JSONDecodeError):
            continue
        for key in keys:
            if key not in used and any(key == s or key.startswith(s + ".") for s in sections):
                used[key] = str(marker.parent.relative_to(run_dir))
    return used


def _get(cfg: Config, dotted: str) -> Any:
    s, k = dotted.split(".", 1)
    return getattr(cfg.sections[s], k)

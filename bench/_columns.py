"""The benches' shared runner: one measured run of one column, in its own process."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path


def run_column(python: str, script: str, key: str, run: Path, env: dict[str, str], label: str,
               rep: int, repeats: int) -> dict | None:
    """Run `script --worker key --run run` with `python`; its `RESULT {json}` line (seconds, tokens,
    ...) with tokens/s added as `tps`, printed as one progress line. None (stderr printed) when the
    worker gave no result."""
    proc = subprocess.run([python, script, "--worker", key, "--run", str(run)],
                          capture_output=True, text=True, env={**os.environ, **env})
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        print(f"{label}: failed\n{proc.stderr[-3000:]}")
        return None
    r = json.loads(line[7:])
    r["tps"] = r["tokens"] / r["seconds"]
    print(f"run {rep + 1}/{repeats} {label}: {r['seconds']:.2f} s, {r['tps']:,.0f} tokens/s", flush=True)
    return r

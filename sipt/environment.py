"""What a process's floating-point results depend on: the environment recorded in every Parquet part.

`environment()` is stored in each part's metadata (`sipt.env`); `mixed_environments` tells a stage
whose parts were written under different settings (README "Reproducibility").
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sipt import __version__

ENV_KEY = b"sipt.env"

_CPU_FLAGS = ("avx512f", "avx512_bf16", "amx_tile", "avx2", "fma", "neon", "asimd", "sve")


def _cpu() -> tuple[str, str]:
    """The CPU model and the instruction-set extensions that decide which float kernels run."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model name") and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model, " ".join(f for f in _CPU_FLAGS if f in flags)


_STATIC_ENV: dict | None = None


def environment() -> dict:
    """What the floating-point results of this process depend on (README "Reproducibility"): torch's
    threads, the CPU and its vector extensions, MKL's reproducibility mode and the library versions.
    Recorded in every Parquet part (`sipt.env`) so `sipt status` can tell a stage resumed elsewhere."""
    global _STATIC_ENV
    if _STATIC_ENV is None:
        cpu, isa = _cpu()
        _STATIC_ENV = {"sipt": __version__, "python": platform.python_version(), "cpu": cpu, "isa": isa,
                       "mkl_cbwr": os.environ.get("MKL_CBWR", "")}
    env = dict(_STATIC_ENV)
    for lib in ("torch", "transformers", "vllm"):  # only the libraries this process actually uses
        if lib in sys.modules:
            env[lib] = getattr(sys.modules[lib], "__version__", None) or _dist_version(lib)
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        env["threads"] = torch.get_num_threads()
        env["device"] = "cuda:" + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return env


def _dist_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def part_environment(path: Path) -> dict:
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(ENV_KEY, b"{}"))


def mixed_environments(folder: Path) -> str:
    """'' when every part of `folder` was written under the same settings, else what differs
    (e.g. "threads 1 (2 parts) vs 2 (1 part)"): such a stage is only statistically equivalent to an
    uninterrupted one (README "Reproducibility")."""
    seen: dict[str, int] = {}
    for p in sorted(Path(folder).glob("*.parquet")):
        try:
            key = json.dumps(part_environment(p), sort_keys=True)
        except (OSError, pa.ArrowInvalid):
            continue
        seen[key] = seen.get(key, 0) + 1
    if len(seen) < 2:
        return ""
    envs = [(json.loads(k), n) for k, n in seen.items()]
    # A key only some parts have (torch's threads in a process that never loaded torch) decides nothing.
    shared = set.intersection(*(set(e) for e, _ in envs))
    keys = sorted(k for k in shared if len({str(e[k]) for e, _ in envs}) > 1)
    if not keys:
        return ""
    return "parts written under different settings: " + "; ".join(
        f"{k} " + " vs ".join(f"{e.get(k, '-')} ({n} part{'s' * (n > 1)})" for e, n in envs) for k in keys)

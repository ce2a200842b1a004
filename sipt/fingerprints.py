"""Fingerprints of a stage's inputs: other stages' outputs, external files, named inputs, the oracle's rules."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

SUCCESS = "_SUCCESS.json"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def files_fingerprint(paths: list[Path]) -> str:
    """Cheap fingerprint of external input files: path, size and modification time of each."""
    parts = []
    for p in sorted(Path(x) for x in paths):
        st = p.stat()
        parts.append(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}")
    return _sha("\n".join(parts).encode())


def content_fingerprint(path: Path) -> str:
    """Fingerprint of a file, or of a folder's files by their names (relative to it) and bytes: the
    same for a copied or moved one, unlike `files_fingerprint`. In a folder, files starting with `_`
    (markers) are left out."""
    path = Path(path)
    root = path.parent if path.is_file() else path
    files = [path] if path.is_file() else sorted(x for x in path.rglob("*") if x.is_file() and not x.name.startswith("_"))
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(root).as_posix()}\0{p.stat().st_size}\0".encode())
        with p.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def files_ref(paths) -> str:
    """An input reference to external files (folders are expanded to the files inside them)."""
    expanded = []
    for p in map(Path, paths):
        expanded += sorted(str(x.resolve()) for x in p.rglob("*") if x.is_file()) if p.is_dir() else [str(p.resolve())]
    return "files:" + json.dumps(expanded)


def fingerprint(run_dir: Path, ref: str) -> str | None:
    """Current fingerprint of an input reference, as recorded in a manifest's `inputs`.

    `ref` is a folder relative to the run (its `_SUCCESS.json` is hashed), `files:<json list>` for
    external files, `name:<text>` for inputs that can only be named (a hub dataset), or
    `oracle:rules` for the toy world oracle's current rule version.
    """
    if ref.startswith("files:"):
        paths = [Path(p) for p in json.loads(ref[6:])]
        if not all(p.exists() for p in paths):
            return None
        return files_fingerprint(paths)
    if ref.startswith("name:"):
        return _sha(ref.encode())
    if ref == "oracle:rules":  # the toy world oracle's verdict rules, as the code now has them
        from sipt.oracle import ORACLE_VERSION

        return _sha(f"oracle-v{ORACLE_VERSION}".encode())
    marker = Path(run_dir) / ref / SUCCESS
    return _sha(marker.read_bytes()) if marker.exists() else None

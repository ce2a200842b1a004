"""One writer per stage folder: the lock files under `<run>/.locks/` and who holds them."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from sipt.errors import SiptError

HOST = socket.gethostname()


def lock_path(run_dir: Path, out: Path) -> Path:
    """The lock file of a stage folder: `<run>/.locks/iter-002.eval.lock`, `<run>/.locks/samples.lock`."""
    try:
        rel = Path(out).relative_to(run_dir)
    except ValueError:  # a folder outside the run: lock it beside itself
        return Path(out).parent / f".{Path(out).name}.lock"
    return Path(run_dir) / ".locks" / (".".join(rel.parts) + ".lock")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _gone(holder: dict) -> bool:
    """The lock's writer ran on this host and has exited (a lock of another host cannot be checked)."""
    return holder.get("host") == HOST and not _pid_alive(int(holder.get("pid", 0) or 0))


def _who(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('started')}: "
            f"`{holder.get('command', '')}`")


class Lock:
    """One writer per stage folder: an exclusive `flock` on a file that holds the writer's pid, host,
    start time and command. The kernel drops the flock when the process dies, so a lock left by a
    killed process is taken over; a live holder makes `acquire` raise with its pid and host. A lock
    file written on another host cannot be checked from here (flock may not reach across hosts) and
    is refused with the path to delete once that process is known to be gone."""

    def __init__(self, path: Path, what: str):
        self.path, self.what, self.fd = Path(path), what, None

    def acquire(self) -> None:
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # another process's release removed the empty .locks/ just now
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_lock(fd) or {}
                os.close(fd)
                raise SiptError(
                    f"{self.what}: another sipt process is writing it ({_who(holder)})"
                    + ("; that process has exited, but a child of it still holds the lock: stop it"
                       if _gone(holder) else "; wait for it to finish, or stop it")
                ) from None
            try:  # the holder may have released (and removed) the file between our open and flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = _read_lock(fd)
        if holder and holder.get("host") != HOST:
            os.close(fd)
            raise SiptError(f"{self.what}: locked by {_who(holder)}, which cannot be checked from host {HOST}. "
                            f"If that process is no longer running, delete {self.path}")
        # free, or left by a process of this host that is gone (the flock went with it): ours now
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": HOST, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                  "command": " ".join(sys.argv)[:300]}).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # before closing: a waiter that opened it sees another inode
        os.close(self.fd)
        self.fd = None
        try:
            if self.path.parent.name == ".locks":
                self.path.parent.rmdir()  # the last lock of the run leaves no empty .locks/ behind
        except OSError:
            pass


def _read_lock(fd_or_path) -> dict | None:
    try:
        if isinstance(fd_or_path, int):
            raw = os.pread(fd_or_path, 65536, 0)
        else:
            raw = Path(fd_or_path).read_bytes()
        holder = json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def lock_holder(run_dir: Path, folder: Path) -> dict | None:
    """Who is writing `folder` now, from its lock file: None when nobody (no lock, or the process
    that left it is gone). A lock of another host is reported as held (it cannot be checked)."""
    holder = _read_lock(lock_path(run_dir, folder))
    return None if holder is None or _gone(holder) else holder

"""Exclusive folder locks: one process at a time assembles a store or writes a result folder.

A lock is a file (``.lock``) in the folder, on which the holder takes an exclusive,
non-blocking ``flock`` and writes its PID, host, action and start time. The kernel releases
the ``flock`` when its process ends, ``kill -9`` included, so a killed run never leaves a
folder locked; the file is removed on release. A process that opened the file just before
that sees another file at the path, or none, and tries again. On a file system without
``flock`` support (ENOLCK, ENOSYS, EOPNOTSUPP) the folder is used without a lock.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os

from .errors import os_reason

LOCK_FILE = ".lock"
_HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
_UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)


@contextlib.contextmanager
def folder_lock(folder: str, label: str, action: str, error):
    """Hold ``folder/.lock`` while the block runs; ``error`` (an NtkdistError class) with one
    line naming the holder, "{label} is being {action} by process … on … since …", if
    another process holds it. ``label`` names the folder in messages ("store 'k.zarr'")."""
    path = os.path.join(folder, LOCK_FILE)
    fd = _acquire(path, label, error)
    if fd is None:  # no locking on this file system
        yield
        return
    try:
        import socket
        import time

        info = {"pid": os.getpid(), "host": socket.gethostname(), "action": action,
                "since": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        with contextlib.suppress(OSError):  # a full disk: the flock still holds
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _acquire(path: str, label: str, error) -> int | None:
    """The lock file's descriptor with the lock held, or None where the file system has no
    ``flock``; ``error`` naming the holder if another process has it."""
    import fcntl

    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # never written through a link planted there
                raise error(f"cannot lock {label}: {path!r} is a symbolic link; remove it "
                            "and rerun") from None
            raise error(f"cannot write {label}: {os_reason(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd) if exc.errno in _HELD else None
            os.close(fd)
            if exc.errno in _HELD:
                raise error(f"{label} is being {describe_holder(holder)}; wait for it to end, "
                            "or stop that process (its lock ends with it) and rerun") from None
            if exc.errno in _UNSUPPORTED:
                return None
            raise error(f"cannot lock {label}: {os_reason(exc)}") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except OSError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed the file as we opened it: lock the new one


def lock_holder(folder: str) -> str | None:
    """Who holds ``folder``'s lock ("assembled by process … since …"), or None."""
    import fcntl

    try:
        fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return describe_holder(_holder(fd)) if exc.errno in _HELD else None
    finally:
        os.close(fd)
    return None


def _holder(fd: int) -> dict:
    """The holder's record in a lock file (empty if unreadable)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def describe_holder(info: dict) -> str:
    """'assembled by process 123 on host since 2026-…', from a lock file's record."""
    action = info.get("action") or "used"
    if "pid" not in info:
        return f"{action} by another process"
    return (f"{action} by process {info['pid']} on {info.get('host', '?')} "
            f"since {info.get('since', '?')}")

"""An exclusive lock file across processes (and hosts on a shared file system), for
conversions that several evaluation processes may want at once."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from hybrid_megatron.errors import ConfigError


class LockHeld(Exception):
    """`file_lock(wait=False)` found the lock taken by a live process."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def file_lock(
    path: Path, timeout: float = 4 * 3600, poll: float = 0.5, wait: bool = True
) -> Iterator[None]:
    """An exclusive lock file across processes (and hosts on a shared file system).

    A lock left by a dead process on this host is taken over; one held by a live process is
    waited for up to `timeout` seconds, or, with `wait=False`, raises `LockHeld` at once.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    start = time.monotonic()
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                holder = {}
            if holder.get("host") == me["host"] and not _pid_alive(int(holder.get("pid", -1))):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            if not wait:
                raise LockHeld(str(path)) from None
            if time.monotonic() - start > timeout:
                raise ConfigError(
                    f"Waited {timeout:.0f}s for lock {path} held by {holder or 'another process'}"
                    ". Delete the file if no conversion is running."
                ) from None
            time.sleep(poll)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

"""Write a conversion's output next to its target, then move it into place.

Nothing at the target path is touched until the new output is complete: it is built in a
hidden sibling directory (`.NAME.tmp-HOST-PID-XXXXXXXX`) and renamed over the target at the
end (an existing target is only replaced with `overwrite=True`, and only after the new output
is complete). A conversion killed meanwhile (SIGKILL) leaves its staging dir; the next
conversion to the same output removes it once its process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

from hybrid_megatron.errors import ConfigError, DiskFullError
from hybrid_megatron.paths import overlap, real_path


class OutputExistsError(ConfigError):
    """The output path holds files and overwriting was not requested."""


class OutputOverlapsSourceError(ConfigError):
    """The output path is, contains or lies inside what the command reads."""


def check_not_source(
    output: str | os.PathLike,
    source: str | os.PathLike,
    what: str,
    hint: str,
    *,
    new_inside_ok: bool = False,
) -> None:
    """Refuse an `output` that is, contains or lies inside `source`, even with overwrite.

    `new_inside_ok`: an output inside `source` is allowed when it does not exist yet or is
    an earlier Hugging Face output (holds config.json), e.g. RUN_DIR/hf for a run dir source.
    """
    how = overlap(output, source)
    if how is None:
        return
    if how == "lies inside" and new_inside_ok:
        out = Path(output)
        if not out.exists() or (out / "config.json").is_file():
            return
    resolved = f" (resolved: {real_path(output)})" if real_path(output) != Path(output) else ""
    raise OutputOverlapsSourceError(
        f"Output {output}{resolved} {how} the source {what} {source}: writing there could "
        f"destroy what is read; nothing was changed (--overwrite does not lift this). {hint}"
    )


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an existing, non-empty output unless `overwrite`."""
    if output.is_file() or output.is_symlink():
        raise OutputExistsError(
            f"Output path {output} is an existing file; choose a directory path that does not "
            "exist yet."
        )
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"Output directory {output} already exists and is not empty; nothing was changed. "
            "Choose a new path, or pass overwrite=True (--overwrite) to replace it."
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _sibling(output: Path, kind: str) -> Path:
    """A hidden sibling of `output` naming this host and process, so that a rerun can tell
    whether the process that made it is gone."""
    owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return output.parent / f".{output.name}.{kind}-{owner}"


def clean_stale_staging(output: Path) -> list[Path]:
    """Remove the staging dirs of `output` left by killed conversions on this host (their
    process is gone); a previous output moved aside by a conversion killed while publishing
    is put back if `output` is missing. Nothing else is touched. Returns what was removed."""
    from hybrid_megatron.checkpoint.layout import warn

    pattern = re.compile(
        rf"^\.{re.escape(output.name)}\.(?P<kind>tmp|old)-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{{8}}$"
    )
    host = socket.gethostname()
    removed = []
    if not output.parent.is_dir():
        return removed
    for entry in sorted(output.parent.iterdir()):
        m = pattern.match(entry.name)
        if not m or not entry.is_dir() or entry.is_symlink():
            continue
        if m["host"] != host or _pid_alive(int(m["pid"])):
            continue  # another host's, or its conversion still runs
        if m["kind"] == "old" and not output.exists():
            os.replace(entry, output)
            warn(f"Restored {output} from {entry.name}, left by a conversion killed while "
                 "replacing it.")  # fmt: skip
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
        warn(f"Removed {entry}: a staging directory left by a killed conversion (process "
             f"{m['pid']} is gone).")  # fmt: skip
    return removed


@contextlib.contextmanager
def staged_output(
    output: str | os.PathLike, overwrite: bool = False, needed_bytes: int | None = None
) -> Iterator[Path]:
    """Yield a fresh temp dir beside `output`; on success it becomes `output`, on error it goes.

    Staging dirs of earlier conversions killed on this host are removed first. A full disk
    (ENOSPC) raises `DiskFullError` saying what was kept and how much space was needed
    (`needed_bytes`, an estimate of the output's size).
    """
    output = Path(output).absolute()
    clean_stale_staging(output)
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(output, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        _publish(tmp, output, overwrite)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_disk_full(err):
            raise DiskFullError(_disk_full_message(output, needed_bytes)) from err
        raise


def _is_disk_full(err: BaseException) -> bool:
    """ENOSPC anywhere in the exception chain (writers such as torch's distributed
    checkpointing wrap the OSError), or in a wrapped message."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return True
        current = current.__cause__ or current.__context__
    return os.strerror(errno.ENOSPC) in str(err)


def _size(num_bytes: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if num_bytes < 1000 or unit == "TB":
            return f"{num_bytes:.0f} {unit}" if unit == "bytes" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    raise AssertionError


def _disk_full_message(output: Path, needed_bytes: int | None) -> str:
    free = shutil.disk_usage(output.parent).free
    kept = (
        f"the existing {output} was kept unchanged"
        if output.exists()
        else f"nothing was written to {output}"
    )
    need = f"about {_size(needed_bytes)} needed, " if needed_bytes else ""
    return (
        f"The disk holding {output.parent} is full (no space left on device): the partial "
        f"output was removed, {kept} and the source was only read. Space: {need}"
        f"{_size(free)} free there now. Free space or choose an output on another disk, then "
        "rerun."
    )


def _publish(tmp: Path, output: Path, overwrite: bool) -> None:
    check_output(output, overwrite)  # it may have appeared meanwhile
    old = None
    if output.is_dir():
        old = _sibling(output, "old")
        os.replace(output, old)
    os.replace(tmp, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

"""Disk-full (ENOSPC) failures of a checkpoint save, turned into a message that says so."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from hybrid_megatron.checkpoint.layout import find_latest_valid, read_marker


def is_disk_full(err: BaseException | None) -> bool:
    """True when `err` (or what caused it, also across Megatron's writer processes, which
    pass errors on as text) is ENOSPC."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(err) or "[Errno 28]" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def save_failed_for_space(err: BaseException, ckpt_dir: Path) -> bool:
    """ENOSPC in the error, or (torch's serializer reports a full disk as "unexpected pos")
    less free space left than a checkpoint takes."""
    if is_disk_full(err):
        return True
    try:
        free = shutil.disk_usage(ckpt_dir.parent).free
    except OSError:
        return False
    return free < max(_needed(ckpt_dir)[0], 1 << 20)


def _needed(ckpt_dir: Path) -> tuple[int, str]:
    """Bytes a checkpoint takes (the newest intact one, else what this save wrote) + why."""
    kept = find_latest_valid(ckpt_dir.parent, verify_checksums=False, quiet=True)
    if kept is not None:
        need = sum(f["size"] for f in read_marker(kept.path)["files"].values())
        return need, f"about {_gb(need)} (the size of {kept.path.name})"
    written = _size(ckpt_dir)
    return written, f"more than the {_gb(written)} written before it failed"


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def disk_full_message(ckpt_dir: Path, remove_partial: bool) -> str:
    """What happened, what was kept and how much space a checkpoint needs. The incomplete
    directory of the failed save is removed (it never was a checkpoint) to give the space
    back, when `remove_partial`."""
    root = ckpt_dir.parent
    _, need_text = _needed(ckpt_dir)
    try:
        free = _gb(shutil.disk_usage(root).free)
    except OSError:
        free = "unknown"
    if remove_partial:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    kept = find_latest_valid(root, verify_checksums=False, quiet=True)
    if kept is not None:
        kept_text = f"the newest intact checkpoint {kept.path.name} (step {kept.iteration}) is kept"
        resume = f"resume from step {kept.iteration}"
    else:
        kept_text = "no earlier checkpoint exists"
        resume = "start over"
    return (
        f"No space left on device while saving checkpoint {ckpt_dir.name} under {root}: "
        f"a checkpoint needs {need_text}, {free} was free. Training stopped; {kept_text}"
        + ("; the incomplete save was removed" if remove_partial else "")
        + f". Free some space (or lower checkpoint.keep_last, or move the run dir), then run "
        f"the same command again to {resume}."
    )

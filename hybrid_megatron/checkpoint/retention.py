"""What a training job does with the checkpoints in its run dir (rank 0, under the run lock).

Rules (the README's "What is guaranteed" relies on them):

- A checkpoint that does not verify (partial save, missing/truncated/corrupt file) is never
  loaded and never deleted: it is moved aside to `iter_N.partial-<time>` or
  `iter_N.corrupt-<time>` with a warning naming it and why, so the run can save step N again.
- Retention (`checkpoint.keep_last`) counts only checkpoints that verify, and never deletes the
  checkpoint this run resumed from or the one it has just written.
- `latest_checkpointed_iteration.txt` always names a checkpoint that exists and verified.

Verification (sizes, CRC32 when checksums are on) reads every file, so each checkpoint is
verified at most once per process (a checkpoint this process wrote counts as verified).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from hybrid_megatron.checkpoint.layout import (
    COMPLETE_MARKER,
    LATEST_FILE,
    CheckpointInfo,
    atomic_write_text,
    checkpoint_problem,
    list_checkpoint_dirs,
    warn,
)

_verified: dict[Path, int] = {}  # checkpoint dir -> mtime_ns of its marker when verified


def _marker_stamp(path: Path) -> int | None:
    try:
        return (path / COMPLETE_MARKER).stat().st_mtime_ns
    except OSError:
        return None


def mark_verified(path: Path) -> None:
    """Record that `path` verified (or was just written and marked by this process)."""
    stamp = _marker_stamp(path)
    if stamp is not None:
        _verified[path.resolve()] = stamp


def problem_of(path: Path, verify_checksums: bool) -> str | None:
    """`checkpoint_problem`, remembered for checkpoints that verified and did not change."""
    stamp = _marker_stamp(path)
    if stamp is not None and _verified.get(path.resolve()) == stamp:
        return None
    problem = checkpoint_problem(path, verify_checksums)
    if problem is None:
        mark_verified(path)
    return problem


def set_aside(path: Path, problem: str) -> Path:
    """Rename an unusable checkpoint to iter_N.{partial,corrupt}-<time> (never deleted)."""
    kind = "partial" if "partial checkpoint" in problem else "corrupt"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.{kind}-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{kind}-{stamp}-{n}")
    path.rename(target)
    _verified.pop(path.resolve(), None)
    warn(
        f"Checkpoint {path} cannot be used: {problem}. Moved it aside to {target.name} (not "
        "deleted; inspect it, then delete it to free the space)."
    )
    return target


def resume_point(ckpt_root: Path, verify_checksums: bool) -> CheckpointInfo | None:
    """Newest checkpoint that verifies; every newer unusable one is set aside first.

    The "latest" pointer is rewritten to name the checkpoint found.
    """
    found = None
    for info in reversed(list_checkpoint_dirs(ckpt_root)):
        problem = problem_of(info.path, verify_checksums)
        if problem is None:
            found = info
            break
        set_aside(info.path, problem)
    latest = ckpt_root / LATEST_FILE
    if found is not None:
        if not latest.is_file() or latest.read_text().strip() != str(found.iteration):
            atomic_write_text(latest, f"{found.iteration}\n")
    elif latest.is_file():
        latest.unlink()
    return found


def apply_retention(
    ckpt_root: Path,
    keep_last: int | None,
    protect: Iterable[Path] = (),
    verify_checksums: bool = True,
) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep_last` that verify.

    Checkpoints in `protect` (resumed from, just written) are never deleted; one that does not
    verify is set aside, not counted; directories without a marker are left alone.
    """
    if keep_last is None:
        return []
    protected = {p.resolve() for p in protect}
    kept, removed = 0, []
    for info in reversed(list_checkpoint_dirs(ckpt_root)):
        if not (info.path / COMPLETE_MARKER).is_file():
            continue
        problem = problem_of(info.path, verify_checksums)
        if problem is not None:
            set_aside(info.path, problem)
            continue
        if kept < keep_last or info.path.resolve() in protected:
            kept += 1
            continue
        shutil.rmtree(info.path, ignore_errors=True)
        _verified.pop(info.path.resolve(), None)
        removed.append(info.path)
    return removed

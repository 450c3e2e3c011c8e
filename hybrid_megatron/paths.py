"""Path relations on resolved paths (symlinks, `~` and `..` cannot hide them)."""

from __future__ import annotations

import os
from pathlib import Path


def real_path(path: str | os.PathLike) -> Path:
    """`path` with `~`, `..` and symlinks resolved (also for paths that do not exist yet)."""
    return Path(path).expanduser().resolve()


def overlap(path: str | os.PathLike, other: str | os.PathLike) -> str | None:
    """How `path` relates to `other`: 'is', 'lies inside', 'contains', or None (disjoint)."""
    a, b = real_path(path), real_path(other)
    if a == b:
        return "is"
    if b in a.parents:
        return "lies inside"
    if a in b.parents:
        return "contains"
    return None

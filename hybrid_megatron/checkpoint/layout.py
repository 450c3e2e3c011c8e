"""On-disk layout of a run's checkpoints, completeness markers and integrity checks.

    RUN_DIR/checkpoints/
        iter_0000100/                 Megatron-Core dist checkpoint (torch_dist)
            run_config.yaml           the RunConfig that wrote it
            hm_complete.json          written last: iteration, layout, file sizes (+ CRC32)
        latest_checkpointed_iteration.txt   newest complete iteration (atomic rename)

A directory without `hm_complete.json`, or whose files disagree with it, is partial or
corrupt: it is skipped with a warning naming it and is never loaded (a training job moves it
aside, see `retention`).
"""

from __future__ import annotations

import json
import os
import re
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

from hybrid_megatron.errors import ConfigError

COMPLETE_MARKER = "hm_complete.json"
RUN_CONFIG_FILE = "run_config.yaml"
LATEST_FILE = "latest_checkpointed_iteration.txt"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used (missing, partial, corrupt, incompatible)."""


@dataclass(frozen=True)
class CheckpointInfo:
    iteration: int
    path: Path


def warn(message: str) -> None:
    """A user-facing warning on stderr (once per job: rank 0 only)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"hybrid-megatron: warning: {message}", file=sys.stderr, flush=True)


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file, fsync and rename (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_crc32(path: Path, chunk: int = 1 << 22) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def _payload_files(ckpt_dir: Path) -> list[Path]:
    return sorted(p for p in ckpt_dir.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER)


def write_complete_marker(ckpt_dir: Path, iteration: int, extra: dict, checksums: bool) -> None:
    """Record every file of a finished save; this is what makes the checkpoint usable."""
    files = {}
    for p in _payload_files(ckpt_dir):
        entry: dict = {"size": p.stat().st_size}
        if checksums:
            entry["crc32"] = file_crc32(p)
        files[str(p.relative_to(ckpt_dir))] = entry
    marker = {"iteration": iteration, "format": "torch_dist", **extra, "files": files}
    atomic_write_text(ckpt_dir / COMPLETE_MARKER, json.dumps(marker, indent=1))


def read_marker(ckpt_dir: Path) -> dict:
    return json.loads((ckpt_dir / COMPLETE_MARKER).read_text())


def checkpoint_problem(ckpt_dir: Path, verify_checksums: bool = True) -> str | None:
    """Why `ckpt_dir` cannot be loaded, or None when it is complete and intact."""
    marker_path = ckpt_dir / COMPLETE_MARKER
    if not ckpt_dir.is_dir():
        return "directory does not exist"
    if not marker_path.is_file():
        return f"no {COMPLETE_MARKER} (the save did not finish: partial checkpoint)"
    try:
        marker = json.loads(marker_path.read_text())
        files = marker["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return f"{COMPLETE_MARKER} is unreadable ({e})"
    for rel, entry in files.items():
        p = ckpt_dir / rel
        if not p.is_file():
            return f"file {rel} is missing"
        size = p.stat().st_size
        if size != entry["size"]:
            return f"file {rel} has {size} bytes, expected {entry['size']} (truncated or altered)"
        if verify_checksums and "crc32" in entry and file_crc32(p) != entry["crc32"]:
            return f"file {rel} fails its CRC32 check (corrupt)"
    return None


def is_iter_dir(path: Path) -> bool:
    """Whether `path` is named like one checkpoint (iter_NNNNNNN)."""
    return _ITER_RE.match(Path(path).name) is not None


def list_checkpoint_dirs(ckpt_root: Path) -> list[CheckpointInfo]:
    """All iter_* directories under `ckpt_root`, oldest first (complete or not)."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = _ITER_RE.match(p.name)
        if m and p.is_dir():
            found.append(CheckpointInfo(int(m.group(1)), p))
    return sorted(found, key=lambda c: c.iteration)


def complete_checkpoints(ckpt_root: Path) -> list[CheckpointInfo]:
    """iter_* directories that have a completion marker (cheap: no file verification)."""
    return [c for c in list_checkpoint_dirs(ckpt_root) if (c.path / COMPLETE_MARKER).is_file()]


def find_latest_valid(
    ckpt_root: Path, verify_checksums: bool = True, quiet: bool = False
) -> CheckpointInfo | None:
    """Newest complete and intact checkpoint; warns, naming each newer one it skips."""
    for info in reversed(list_checkpoint_dirs(ckpt_root)):
        problem = checkpoint_problem(info.path, verify_checksums)
        if problem is None:
            return info
        if not quiet:
            warn(
                f"Skipping checkpoint {info.path}: {problem}. It will not be loaded; delete it "
                "when you no longer need it for inspection."
            )
    return None


def resolve_checkpoint(path: str | os.PathLike, verify_checksums: bool = True) -> CheckpointInfo:
    """A run dir, its checkpoints/ dir or one iter_* dir -> a verified complete checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"Checkpoint path {path} does not exist. Pass a run directory, its checkpoints/ "
            "directory or one iter_NNNNNNN directory."
        )
    m = _ITER_RE.match(path.name)
    if m:
        problem = checkpoint_problem(path, verify_checksums)
        if problem:
            raise CheckpointError(
                f"Checkpoint {path} cannot be used: {problem}. Pick an earlier complete "
                f"checkpoint (one with {COMPLETE_MARKER}) or pass the run directory to use the "
                "newest complete one."
            )
        return CheckpointInfo(int(m.group(1)), path)
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    info = find_latest_valid(root, verify_checksums)
    if info is None:
        raise CheckpointError(
            f"No complete checkpoint under {root}: no iter_NNNNNNN directory with an intact "
            f"{COMPLETE_MARKER}. Train (or convert) first, or point at another directory."
        )
    return info

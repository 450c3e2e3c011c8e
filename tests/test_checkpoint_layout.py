"""Checkpoint completeness and integrity checks (no training needed)."""

from __future__ import annotations

import json

import pytest

from hybrid_megatron.checkpoint.layout import (
    COMPLETE_MARKER,
    CheckpointError,
    checkpoint_problem,
    find_latest_valid,
    resolve_checkpoint,
    write_complete_marker,
)
from hybrid_megatron.checkpoint.retention import apply_retention, resume_point


def _fake_checkpoint(root, iteration: int, complete: bool = True):
    path = root / "checkpoints" / f"iter_{iteration:07d}"
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(bytes(range(256)) * 64)
    (path / "common.pt").write_bytes(b"common" * 10)
    if complete:
        write_complete_marker(path, iteration, {"layout": {"tensor": 1}}, checksums=True)
    return path


def test_complete_checkpoint_has_no_problem(tmp_path):
    path = _fake_checkpoint(tmp_path, 5)
    assert checkpoint_problem(path) is None
    marker = json.loads((path / COMPLETE_MARKER).read_text())
    assert marker["iteration"] == 5 and set(marker["files"]) == {"__0_0.distcp", "common.pt"}


def test_partial_truncated_corrupt_and_missing_files_are_named(tmp_path):
    partial = _fake_checkpoint(tmp_path, 1, complete=False)
    assert "partial checkpoint" in checkpoint_problem(partial)

    truncated = _fake_checkpoint(tmp_path, 2)
    with open(truncated / "__0_0.distcp", "r+b") as f:
        f.truncate(100)
    assert "__0_0.distcp has 100 bytes" in checkpoint_problem(truncated)

    corrupt = _fake_checkpoint(tmp_path, 3)
    data = bytearray((corrupt / "__0_0.distcp").read_bytes())
    data[1000] ^= 0xFF  # same size, one flipped byte
    (corrupt / "__0_0.distcp").write_bytes(bytes(data))
    assert "CRC32" in checkpoint_problem(corrupt)
    assert checkpoint_problem(corrupt, verify_checksums=False) is None

    missing = _fake_checkpoint(tmp_path, 4)
    (missing / "common.pt").unlink()
    assert "common.pt is missing" in checkpoint_problem(missing)

    garbled = _fake_checkpoint(tmp_path, 6)
    (garbled / COMPLETE_MARKER).write_text("{not json")
    assert "unreadable" in checkpoint_problem(garbled)


def test_latest_valid_skips_bad_newer_checkpoints_with_a_warning(tmp_path, capsys):
    good = _fake_checkpoint(tmp_path, 10)
    bad = _fake_checkpoint(tmp_path, 20)
    (bad / "common.pt").write_bytes(b"x")
    _fake_checkpoint(tmp_path, 30, complete=False)
    info = find_latest_valid(tmp_path / "checkpoints")
    assert info.iteration == 10 and info.path == good
    err = capsys.readouterr().err
    assert "Skipping checkpoint" in err and "iter_0000030" in err and "iter_0000020" in err


def test_resolve_checkpoint_accepts_run_dir_checkpoints_dir_and_iter_dir(tmp_path):
    path = _fake_checkpoint(tmp_path, 7)
    for arg in (tmp_path, tmp_path / "checkpoints", path):
        assert resolve_checkpoint(arg).path == path
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    partial = _fake_checkpoint(tmp_path, 8, complete=False)
    with pytest.raises(CheckpointError, match="partial checkpoint.*earlier complete"):
        resolve_checkpoint(partial)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="No complete checkpoint"):
        resolve_checkpoint(empty)


def test_retention_deletes_only_old_complete_checkpoints(tmp_path):
    for it in (1, 2, 3, 4):
        _fake_checkpoint(tmp_path, it)
    partial = _fake_checkpoint(tmp_path, 5, complete=False)
    removed = apply_retention(tmp_path / "checkpoints", keep_last=2)
    assert sorted(p.name for p in removed) == ["iter_0000001", "iter_0000002"]
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["iter_0000003", "iter_0000004", "iter_0000005"]
    assert partial.exists()
    assert apply_retention(tmp_path / "checkpoints", keep_last=None) == []


def _flip_byte(path) -> None:
    data = bytearray((path / "__0_0.distcp").read_bytes())
    data[1000] ^= 0xFF
    (path / "__0_0.distcp").write_bytes(bytes(data))


def _names(root) -> list[str]:
    return sorted(p.name for p in (root / "checkpoints").iterdir())


def test_retention_counts_only_checkpoints_that_verify(tmp_path):
    """Issue 14.1: a corrupt newer checkpoint must not count towards keep_last (it used to,
    and the good older one was deleted)."""
    ckpts = tmp_path / "checkpoints"
    good = _fake_checkpoint(tmp_path, 10)
    _flip_byte(_fake_checkpoint(tmp_path, 20))
    _flip_byte(_fake_checkpoint(tmp_path, 30))
    removed = apply_retention(ckpts, keep_last=1)
    assert removed == [] and good.is_dir()
    names = _names(tmp_path)
    assert "iter_0000010" in names and "iter_0000020" not in names and "iter_0000030" not in names
    assert any(n.startswith("iter_0000020.corrupt-") for n in names), names
    assert any(n.startswith("iter_0000030.corrupt-") for n in names), names


def test_retention_never_deletes_protected_checkpoints(tmp_path):
    """The checkpoint a run resumed from and the one it just wrote survive keep_last=1."""
    ckpts = tmp_path / "checkpoints"
    old, resumed, written = (_fake_checkpoint(tmp_path, i) for i in (5, 10, 15))
    removed = apply_retention(ckpts, keep_last=1, protect=[written, resumed])
    assert removed == [old]
    assert resumed.is_dir() and written.is_dir()


def test_resume_point_sets_unusable_newer_checkpoints_aside(tmp_path, capsys):
    """Issue 14.2: corrupt and partial checkpoints newer than the resume point are renamed
    (never deleted), with a warning naming them, and the "latest" pointer follows."""
    ckpts = tmp_path / "checkpoints"
    good = _fake_checkpoint(tmp_path, 10)
    corrupt = _fake_checkpoint(tmp_path, 20)
    _flip_byte(corrupt)
    partial = _fake_checkpoint(tmp_path, 30, complete=False)
    (ckpts / "latest_checkpointed_iteration.txt").write_text("20\n")
    info = resume_point(ckpts, verify_checksums=True)
    assert info.path == good
    names = _names(tmp_path)
    assert [n for n in names if n.startswith("iter_0000020.corrupt-")]
    assert [n for n in names if n.startswith("iter_0000030.partial-")]
    assert not corrupt.exists() and not partial.exists()
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text() == "10\n"
    err = capsys.readouterr().err
    assert str(corrupt) in err and "CRC32" in err and "Moved it aside" in err
    assert str(partial) in err and "partial checkpoint" in err

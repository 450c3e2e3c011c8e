"""Result files of an evaluation directory.

    DIR/eval_config.json              settings that shape samples and predictions (checked on
                                      restart: a mismatch or an unreadable file is refused)
    DIR/samples/rank{r}-of-{w}.jsonl  one JSON row per finished sample, appended + flushed
    DIR/samples/rank{r}-of-{w}.done   written when that rank finished its share
    DIR/converted/                    Megatron checkpoints converted for evaluation

Rows are keyed (`plan.item_key`); readers merge every rank file of every world size and keep
the first row of each key, so a sweep can be restarted with another world size. A line cut
off by a kill is skipped, and the next append starts on a fresh line.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

from hybrid_megatron.errors import ConfigError
from hybrid_megatron.eval.sharding import Shard
from hybrid_megatron.jsonl import read_records

SAMPLES_DIR = "samples"
CONFIG_FILE = "eval_config.json"
CONVERTED_DIR = "converted"


def sample_file(out_dir: Path, shard: Shard) -> Path:
    return Path(out_dir) / SAMPLES_DIR / f"{shard.tag}.jsonl"


def done_file(out_dir: Path, shard: Shard) -> Path:
    return Path(out_dir) / SAMPLES_DIR / f"{shard.tag}.done"


class RowWriter:
    """Appends JSON rows to one rank's file, flushing each so a kill loses at most one row."""

    def __init__(self, path: Path, fsync: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._file: IO[str] = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115
        self._file.seek(0, os.SEEK_END)
        if self._file.tell() > 0:
            self._file.seek(self._file.tell() - 1)
            last = self._file.read(1)
            self._file.seek(0, os.SEEK_END)
            if last != "\n":  # a row cut off by a kill: start on a fresh line
                self._file.write("\n")

    def write(self, row: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_jsonl(path: Path) -> tuple[list[dict], int]:
    return read_records(path, "key")


def sample_files(out_dir: Path) -> list[Path]:
    return sorted((Path(out_dir) / SAMPLES_DIR).glob("*.jsonl"))


def read_rows(out_dirs: Path | Iterable[Path]) -> list[dict]:
    """All rows of the sample files under each dir, first row per key (file order)."""
    dirs = [Path(out_dirs)] if isinstance(out_dirs, (str, Path)) else [Path(d) for d in out_dirs]
    seen: dict[str, dict] = {}
    bad = 0
    for d in dirs:
        for path in sample_files(d):
            rows, n_bad = _read_jsonl(path)
            bad += n_bad
            for row in rows:
                seen.setdefault(row["key"], row)
    if bad:
        warnings.warn(f"skipped {bad} unreadable line(s) (cut off by a kill)", stacklevel=2)
    return list(seen.values())


def write_done(out_dir: Path, shard: Shard, digest: str, finished: int) -> None:
    path = done_file(out_dir, shard)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"plan": digest, "rank": shard.rank, "finished": finished}))
    os.replace(tmp, path)


def clear_done(out_dir: Path, shard: Shard) -> None:
    done_file(out_dir, shard).unlink(missing_ok=True)


def ranks_done(out_dir: Path, world: int, digest: str) -> list[int]:
    """Ranks of a `world`-process invocation of plan `digest` that finished their share."""
    done = []
    for r in range(world):
        path = done_file(out_dir, Shard(r, world))
        try:
            if json.loads(path.read_text()).get("plan") == digest:
                done.append(r)
        except (OSError, json.JSONDecodeError):
            continue
    return done


def check_settings(out_dir: Path, settings: Mapping[str, Any]) -> None:
    """Record the sample-shaping settings, or refuse a restart whose settings differ."""
    path = Path(out_dir) / CONFIG_FILE
    settings = json.loads(json.dumps(settings))  # normalise (tuples -> lists, keys -> str)
    # Looked at first: every invocation writes the settings before any sample file, so sample
    # files seen here mean the settings file exists below, unless it was removed.
    has_samples = bool(sample_files(out_dir))
    if path.exists():
        try:
            old = json.loads(path.read_text())
            if not isinstance(old, dict):
                raise ValueError(f"a JSON {type(old).__name__}, not an object")
        except (OSError, ValueError) as err:  # JSONDecodeError, UnicodeDecodeError included
            raise ConfigError(
                f"{path} is unreadable ({err}). It records the settings the results in "
                f"{out_dir} were made with, so they cannot be checked or resumed; nothing was "
                "changed. Restore the file, or write to a new --output directory."
            ) from err
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            details = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
            raise ConfigError(
                f"{out_dir} holds results made with other settings ({details}). Resume with "
                "the same settings, or write to a new --output directory."
            )
        return
    if has_samples:
        raise ConfigError(
            f"{out_dir} holds sample files but no {CONFIG_FILE}, so the settings they were made "
            "with are unknown; nothing was changed. Write to a new --output directory."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(settings, indent=1, sort_keys=True))
    os.replace(tmp, path)

"""Reading append-only JSONL logs that a crash may have cut short."""

from __future__ import annotations

import json
from pathlib import Path


def read_records(path: str | Path, key: str) -> tuple[list[dict], int]:
    """The JSON objects of `path` that have `key`, in file order, and how many non-blank
    lines were skipped (not JSON, such as a line cut off by a crash, or lacking `key`)."""
    rows, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(row, dict) and key in row:
                rows.append(row)
            else:
                bad += 1
    return rows, bad

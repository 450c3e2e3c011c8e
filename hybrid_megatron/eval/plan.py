"""Work items of an evaluation sweep and their stable keys.

A sweep is models x tasks x lengths (x needle depths in grid mode) x sample indices; each
combination is one `WorkItem` whose `key` names it in result files, so a restarted (or
re-sharded) sweep recognises finished work. The order is fixed (models, tasks, lengths,
depths, indices as given), and so is the sharding by position in that order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

PPL_TASK = "ppl"


def depth_label(depth: float | None) -> str:
    return "-" if depth is None else f"{float(depth):g}"


def item_key(model: str, task: str, length: int, depth: float | None, index: int) -> str:
    """`model|task|length|depth|index` ('-' for no depth)."""
    return f"{model}|{task}|{int(length)}|{depth_label(depth)}|{int(index)}"


@dataclass(frozen=True)
class WorkItem:
    model: str
    task: str
    length: int
    depth: float | None
    index: int

    @property
    def key(self) -> str:
        return item_key(self.model, self.task, self.length, self.depth, self.index)

    @property
    def group(self) -> tuple[str, str, int, float | None]:
        """Items of one group share generated prompts' settings (model, task, length, depth)."""
        return (self.model, self.task, self.length, self.depth)


def build_plan(
    models: Sequence[str],
    tasks: Sequence[str],
    lengths: Sequence[int],
    num_samples: int,
    depths: Sequence[float] | None = None,
    grid_tasks: Sequence[str] | None = None,
) -> list[WorkItem]:
    """All items in sweep order. `depths` (grid mode) applies to `grid_tasks` (default: every
    task but ppl); the other tasks get one item per sample without a depth."""
    items = []
    for model in models:
        for task in tasks:
            gridded = task != PPL_TASK if grid_tasks is None else task in grid_tasks
            task_depths: Sequence[float | None] = (
                depths if depths is not None and gridded else [None]
            )
            for length in lengths:
                for depth in task_depths:
                    items.extend(
                        WorkItem(model, task, int(length), depth, i) for i in range(num_samples)
                    )
    return items


def plan_digest(items: Sequence[WorkItem]) -> str:
    """A short hash of the item keys in order: equal for every rank of one invocation."""
    h = hashlib.sha1()
    for it in items:
        h.update(it.key.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


_SUFFIXES = {"k": 1024, "m": 1024 * 1024}


def parse_length(text: str) -> int:
    """'4096', '4k', '4K', '1m' -> tokens (k = 1024)."""
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * _SUFFIXES[t[-1]] if t[-1:] in _SUFFIXES else float(t)
    except ValueError:
        raise ValueError(f"'{text}' is not a length (examples: 4096, 4k, 128k)") from None
    if value <= 0 or value != int(value):
        raise ValueError(f"length '{text}' must be a positive whole number of tokens")
    return int(value)

"""Analyses sharded over launcher ranks: rank r of w computes items i with i % w == r.

Under torchrun (or srun with MASTER_ADDR / MASTER_PORT set, as `hybrid-megatron launch`
does), `shard_map` gathers every rank's results with one gloo `all_gather_object`, so each
rank ends with all results in item order; rank 0 writes the outputs. A single process
computes everything itself and creates no process group.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

from hybrid_megatron.errors import ConfigError
from hybrid_megatron.procenv import launch_ranks

T = TypeVar("T")
R = TypeVar("R")


def ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process."""
    return launch_ranks(os.environ)


def is_writer() -> bool:
    """The rank that writes outputs and prints progress."""
    return ranks()[0] == 0


def analysis_device(device: str | torch.device | None) -> torch.device:
    """'auto' / 'cuda' -> this rank's GPU (by local rank) when CUDA is there, else CPU."""
    from hybrid_megatron.eval.models import resolve_device

    return resolve_device(device, ranks()[2])


def load_analysis_model(
    model_path: str,
    device: str,
    dtype: str | None,
    tokenizer: str | None,
    verify_conversion: bool,
) -> tuple:
    """`eval`'s model loading on this rank's device: (model, tokenizer, EvalModelInfo)."""
    from hybrid_megatron.eval.models import load_eval_model

    return load_eval_model(
        model_path,
        analysis_device(device),
        dtype,
        tokenizer=tokenizer,
        verify_conversion=verify_conversion,
    )


def _group() -> None:
    if dist.is_initialized():
        return
    if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
        raise ConfigError(
            "this analysis runs on several ranks but MASTER_ADDR / MASTER_PORT are not set; "
            "start it with torchrun (or srun with those variables), or as one process."
        )
    rank, world, _ = ranks()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())


def shard_map(items: Sequence[T], fn: Callable[[T], R]) -> list[R]:
    """[fn(item) for item in items], each item computed by one rank, gathered on all."""
    rank, world, _ = ranks()
    mine = {i: fn(items[i]) for i in range(rank, len(items), world)}
    if world == 1:
        return [mine[i] for i in range(len(items))]
    _group()
    gathered: list[dict[int, R] | None] = [None] * world
    dist.all_gather_object(gathered, mine)
    merged: dict[int, R] = {}
    for part in gathered:
        merged.update(part or {})
    return [merged[i] for i in range(len(items))]

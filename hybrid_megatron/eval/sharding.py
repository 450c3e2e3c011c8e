"""Which work items this process evaluates: rank r of w takes items i with i % w == r.

Ranks come from the launcher's environment (torchrun: RANK / WORLD_SIZE / LOCAL_RANK; Slurm
job steps started by srun: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, used only inside a
step, i.e. with SLURM_STEP_ID set, so a batch script running `hybrid-megatron eval` directly
in a multi-task allocation is one process, not rank 0 of many). No process group is created:
each rank writes its own result file, so ranks never wait for each other.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from hybrid_megatron.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ConfigError(f"rank {self.rank} is not in a world of {self.world} processes.")

    @property
    def tag(self) -> str:
        return f"rank{self.rank}-of-{self.world}"


def _int(env: Mapping[str, str], *names: str, default: int) -> int:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                msg = f"environment variable {name}={value!r} is not an integer."
                raise ConfigError(msg) from None
    return default


def shard_from_env(env: Mapping[str, str] | None = None) -> Shard:
    """This process's shard from torchrun or Slurm variables (rank 0 of 1 when unset)."""
    env = os.environ if env is None else env
    in_step = bool(env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID"))
    slurm = (lambda name: (name,)) if in_step else (lambda name: ())
    return Shard(
        rank=_int(env, "RANK", *slurm("SLURM_PROCID"), default=0),
        world=_int(env, "WORLD_SIZE", *slurm("SLURM_NTASKS"), default=1),
        local_rank=_int(env, "LOCAL_RANK", *slurm("SLURM_LOCALID"), default=0),
    )


def take(items: Sequence[T], shard: Shard) -> list[T]:
    """The items of `shard`: every `world`-th item starting at `rank`."""
    return list(items[shard.rank :: shard.world])

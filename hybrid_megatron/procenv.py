"""What the process environment says about this process's place in a job (no heavy imports).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; Slurm sets SLURM_PROCID / SLURM_NTASKS /
SLURM_LOCALID, which count only inside an srun step (a batch shell of a multi-task allocation
also has SLURM_NTASKS, but it is one process).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

WORKER_ENV = "HYBRID_MEGATRON_WORKER"  # set on worker processes a plain `train` started itself


def launch_ranks(env: Mapping[str, str]) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables, else from Slurm's task
    variables (inside an srun step only)."""
    slurm = env if "SLURM_STEP_ID" in env else {}
    return (
        int(env.get("RANK", slurm.get("SLURM_PROCID", 0))),
        int(env.get("WORLD_SIZE", slurm.get("SLURM_NTASKS", 1))),
        int(env.get("LOCAL_RANK", slurm.get("SLURM_LOCALID", 0))),
    )


def launched() -> bool:
    """True under a launcher (torchrun, srun, our own workers): ranks are set by it."""
    return "RANK" in os.environ or ("SLURM_STEP_ID" in os.environ and "SLURM_PROCID" in os.environ)


def rank() -> int:
    return launch_ranks(os.environ)[0]


def world_size() -> int:
    return launch_ranks(os.environ)[1]


def is_rank0() -> bool:
    return rank() == 0


def is_own_worker() -> bool:
    """A worker process that a plain `hybrid-megatron train` started (it does the rest)."""
    return os.environ.get(WORKER_ENV) == "1"


def available_cores() -> int:
    """CPU cores this process may run on (affinity / cgroup cpusets respected)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)

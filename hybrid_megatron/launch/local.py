"""`launch local`: the same run config on one machine, one torchrun worker per rank."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from hybrid_megatron.errors import ConfigError


def local_command(
    config: str, sets: list[str], nproc: int, run_dir: str | None = None
) -> list[str]:
    """The torchrun command for `nproc` ranks, after checking the config for that world size."""
    from hybrid_megatron.config import load_config, validate_batch_layout

    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}.")
    cfg = load_config(config, list(sets))
    try:
        cfg.validate(world_size=nproc)
        validate_batch_layout(cfg, nproc)
    except ConfigError as err:
        raise ConfigError(f"--nproc {nproc}: {err}") from None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", "-m", "hybrid_megatron.cli", "train"]
    cmd.append(str(Path(config)))
    if run_dir:
        cmd += ["--run-dir", run_dir]
    return cmd + [a for s in sets for a in ("--set", s)]


def run_local(cmd: list[str], dry_run: bool = False) -> int:
    """Print the command; unless `dry_run`, replace this process with it (signals go straight
    to torchrun, which passes SIGTERM/SIGINT on to the ranks: they checkpoint and stop)."""
    print(shlex.join(cmd), flush=True)
    if dry_run:
        return 0
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    os.execve(cmd[0], cmd, env)
    return 0  # not reached

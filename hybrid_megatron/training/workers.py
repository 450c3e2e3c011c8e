"""CPU training from one plain command: data-parallel worker processes of one thread each.

On CPU, P gloo processes with one thread each train a small model about P times faster than
one process with P threads: the small matrix products of a small model do not keep several
threads busy, while data parallelism splits the work cleanly (bench/bench_threads.py measures
both side by side). So a plain `hybrid-megatron train` on CPU starts one worker per core with
torchrun (`train.cpu_processes` overrides), waits for them and then runs the rest of the
pipeline itself. Under torchrun or srun nothing is started: the launcher owns the processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

from hybrid_megatron.config import RunConfig
from hybrid_megatron.lifetime import die_with_parent
from hybrid_megatron.procenv import WORKER_ENV, available_cores


def trains_on_cpu(cfg: RunConfig) -> bool:
    if cfg.train.device == "cpu":
        return True
    if cfg.train.device == "cuda":
        return False
    import torch

    return not torch.cuda.is_available()


def plan_cpu_processes(cfg: RunConfig, cores: int | None = None) -> int:
    """How many worker processes a plain CPU `train` starts (1: train in this process).

    At most `train.cpu_processes` (default: the available cores); a multiple of the model
    parallel size (TP x PP x CP) whose data-parallel size divides the global batch into
    micro-batches.
    """
    if not trains_on_cpu(cfg):
        return 1
    p, t = cfg.parallel, cfg.train
    model_parallel = p.tensor * p.pipeline * p.context
    limit = t.cpu_processes if t.cpu_processes is not None else (cores or available_cores())
    for n in range(max(limit, model_parallel), 0, -1):
        if n % model_parallel or (n > limit and n != model_parallel):
            continue
        dp = n // model_parallel
        if t.global_batch_size % (t.micro_batch_size * dp) == 0:
            return n
    return model_parallel


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when this process dies, even by SIGKILL, so
    a killed `train` does not leave its workers running on."""
    die_with_parent(signal.SIGTERM)


def run_workers(argv: Sequence[str], nproc: int) -> int:
    """Run `hybrid-megatron ARGV` as `nproc` torchrun workers (one thread each); exit code.

    torchrun runs in its own session, so Ctrl-C reaches only this process. A Ctrl-C or
    SIGTERM here is passed to the workers as SIGTERM: they finish the step, save a checkpoint
    and exit 0 (they print how to resume), torchrun sees a clean finish, and so does the
    caller. A second Ctrl-C stops the workers at once (SIGKILL).
    """
    import psutil

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **{WORKER_ENV: "1"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "hybrid_megatron.cli", *argv]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)
    stops = 0

    def stop(signum: int, _frame: object) -> None:
        nonlocal stops
        stops += 1
        try:
            workers = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.send_signal(signal.SIGTERM if stops == 1 else signal.SIGKILL)
        if stops == 1:
            print("stopping: the workers save a checkpoint first (Ctrl-C again to kill them)",
                  file=sys.stderr, flush=True)  # fmt: skip

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

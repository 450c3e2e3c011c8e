"""Run a test function in N gloo processes and collect each rank's return value."""

from __future__ import annotations

import io
import os
import socket
import traceback

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _to_bytes(value) -> bytes:
    """Serialized result: tensors put on the queue as-is travel as shared-memory file
    descriptors that vanish when the worker exits before the parent reads them."""
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def _worker(rank, world_size, port, fn, args, queue):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    try:
        queue.put((rank, "ok", _to_bytes(fn(*args))))
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        from hybrid_megatron import distributed

        distributed.destroy()


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    """Call `fn(*args)` on `world_size` spawned ranks; return results ordered by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                for p in procs:  # peers would wait on a collective until timeout
                    p.kill()
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]

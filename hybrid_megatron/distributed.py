"""Process groups: torch.distributed (NCCL on GPU, gloo on CPU) + Megatron model parallel state."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from hybrid_megatron.config import ParallelConfig
from hybrid_megatron.megatron_compat.cpu import enable_cpu_mode
from hybrid_megatron.procenv import launch_ranks


def use_cuda(device: str = "auto") -> bool:
    if device == "cpu":
        return False
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is visible.")
    return torch.cuda.is_available()


def initialize(parallel: ParallelConfig, seed: int = 1234, device: str = "auto") -> torch.device:
    """Start torch.distributed (from torchrun/srun env vars, or a 1-process group) and
    Megatron's model-parallel groups; seed every RNG stream. Returns this rank's device."""
    cuda = use_cuda(device)
    if not cuda:
        enable_cpu_mode(force=torch.cuda.is_available())
    if not dist.is_initialized():
        rank, world, local = launch_ranks(os.environ)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()) if world == 1 else "29500")
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=10),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor,
            pipeline_model_parallel_size=parallel.pipeline,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
            context_parallel_size=parallel.context,
        )
    seed_everything(seed)
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed python/torch RNGs (offset by pipeline rank) and Megatron's named RNG streams."""
    import random

    import numpy as np

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

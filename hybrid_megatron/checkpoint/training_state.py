"""Save and resume the full training state as Megatron-Core dist checkpoints.

A checkpoint holds the model chunks, the optimizer (reshardable across TP/PP/DP when saved
`fully_reshardable`), the LR scheduler, the iteration and data position, and every rank's RNG
states. Saving is collective; rank 0 then writes the completion marker and only after that
moves the "latest" pointer and applies the retention policy.
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from hybrid_megatron.checkpoint.layout import (
    LATEST_FILE,
    RUN_CONFIG_FILE,
    CheckpointError,
    CheckpointInfo,
    atomic_write_text,
    iter_dir_name,
    read_marker,
    write_complete_marker,
)
from hybrid_megatron.checkpoint.model_state import model_sharded_state_dict, unwrap
from hybrid_megatron.checkpoint.retention import (
    apply_retention,
    mark_verified,
    problem_of,
    set_aside,
)
from hybrid_megatron.checkpoint.space import disk_full_message, save_failed_for_space
from hybrid_megatron.config import RunConfig, to_dict
from hybrid_megatron.errors import DiskFullError
from hybrid_megatron.megatron_compat.optimizer_state import untie_adam_steps
from hybrid_megatron.training.optimizer import init_empty_optimizer_state

# Testing hook: "kill_during_save:N" SIGKILLs rank 0 after the tensors of iteration N are
# written but before the checkpoint is marked complete (simulates a node dying mid-save).
FAULT_ENV = "HYBRID_MEGATRON_FAULT"


@dataclass
class TrainingProgress:
    """Where training stands: optimizer steps taken and samples consumed."""

    iteration: int = 0
    consumed_samples: int = 0


def parallel_layout() -> dict:
    return {
        "tensor": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
        "context": parallel_state.get_context_parallel_world_size(),
        "data": parallel_state.get_data_parallel_world_size(),
        "virtual_pipeline": parallel_state.get_virtual_pipeline_model_parallel_world_size(),
    }


def _rng_state() -> dict:
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(state: dict | None) -> ShardedObject:
    """One RNG entry per (pipeline, tensor) rank; data-parallel ranks are replicas of it...
    except that their states may differ, so each DP rank is its own shard too, and so is each
    context-parallel rank (a CP axis only when CP > 1, so CP=1 checkpoints keep their keys)."""
    ps = parallel_state
    shape = [ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()]
    offset = [ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()]
    if ps.get_context_parallel_world_size() > 1:
        shape.append(ps.get_context_parallel_world_size())
        offset.append(ps.get_context_parallel_rank())
    shape.append(ps.get_data_parallel_world_size())
    offset.append(ps.get_data_parallel_rank())
    return ShardedObject("rng_state", state, tuple(shape), tuple(offset), replica_id=0)


def _state_dict(
    chunks,
    optimizer,
    scheduler,
    progress: TrainingProgress | None,
    optimizer_format: str,
    is_loading: bool,
    include_rng: bool,
    include_optimizer: bool,
) -> dict:
    model_sd = model_sharded_state_dict(chunks)
    sd: dict = dict(model_sd)
    if include_optimizer:
        sd["optimizer"] = optimizer.sharded_state_dict(
            model_sd,  # nested per chunk: Megatron maps params through all its values
            is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": optimizer_format},
        )
        sd["opt_param_scheduler"] = scheduler.state_dict()
    if progress is not None:
        sd["iteration"] = progress.iteration
        sd["consumed_samples"] = progress.consumed_samples
    if include_rng:
        sd["rng_state"] = _rng_sharded_object(None if is_loading else _rng_state())
    return sd


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_training_checkpoint(
    cfg: RunConfig,
    ckpt_root: Path,
    chunks: list[torch.nn.Module],
    optimizer,
    scheduler,
    progress: TrainingProgress,
    protect: Sequence[Path] = (),
) -> Path:
    """Collectively save; returns the checkpoint dir once it is complete and marked latest.

    Retention then never deletes this checkpoint or those in `protect` (resumed from)."""
    ckpt_dir = ckpt_root / iter_dir_name(progress.iteration)
    rank0 = dist.get_rank() == 0
    if rank0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if ckpt_dir.exists():
            problem = problem_of(ckpt_dir, cfg.checkpoint.checksums)
            if problem is None:
                raise CheckpointError(
                    f"Refusing to overwrite the complete checkpoint {ckpt_dir}. Resume from it "
                    "(checkpoint.resume: true) or use another run directory."
                )
            set_aside(ckpt_dir, problem)
        ckpt_dir.mkdir()
    _barrier()
    sd = _state_dict(
        chunks,
        optimizer,
        scheduler,
        progress,
        cfg.checkpoint.optimizer_format,
        is_loading=False,
        include_rng=True,
        include_optimizer=True,
    )
    try:
        dist_checkpointing.save(sd, str(ckpt_dir))
        _barrier()
        if rank0:
            _maybe_inject_fault(progress.iteration)
            _mark_complete(cfg, ckpt_dir, progress)
            atomic_write_text(ckpt_root / LATEST_FILE, f"{progress.iteration}\n")
    except BaseException as err:  # torch's CheckpointException is a BaseException
        if isinstance(err, KeyboardInterrupt | SystemExit) or not save_failed_for_space(
            err, ckpt_dir
        ):
            raise
        raise DiskFullError(disk_full_message(ckpt_dir, remove_partial=rank0)) from err
    if rank0:
        apply_retention(
            ckpt_root,
            cfg.checkpoint.keep_last,
            protect=[ckpt_dir, *protect],
            verify_checksums=cfg.checkpoint.checksums,
        )
    _barrier()
    return ckpt_dir


def _mark_complete(cfg: RunConfig, ckpt_dir: Path, progress: TrainingProgress) -> None:
    """Record the run config and the completion marker: this makes the checkpoint usable."""
    (ckpt_dir / RUN_CONFIG_FILE).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    write_complete_marker(
        ckpt_dir,
        progress.iteration,
        {
            "consumed_samples": progress.consumed_samples,
            "layout": parallel_layout(),
            "optimizer_format": cfg.checkpoint.optimizer_format,
        },
        checksums=cfg.checkpoint.checksums,
    )
    mark_verified(ckpt_dir)


def _maybe_inject_fault(iteration: int) -> None:
    fault = os.environ.get(FAULT_ENV, "")
    if fault.startswith("kill_during_save:") and int(fault.split(":")[1]) == iteration:
        # Like a node dying: take checkpoint writer helper processes down too.
        if os.getpgid(0) == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def load_training_checkpoint(
    cfg: RunConfig,
    info: CheckpointInfo,
    chunks: list[torch.nn.Module],
    optimizer,
    scheduler,
) -> TrainingProgress:
    """Restore everything saved by `save_training_checkpoint`, resharding to this layout.

    RNG states are restored only when the parallel layout is unchanged (they are per rank).
    The optimizer state is restored under a new TP/PP layout when it was saved
    `fully_reshardable`; otherwise the load fails with a message naming the fix.
    """
    marker = read_marker(info.path)
    saved_layout = marker.get("layout", {})
    same_layout = {"context": 1, **saved_layout} == parallel_layout()  # older: no "context"
    saved_format = marker.get("optimizer_format", cfg.checkpoint.optimizer_format)
    mp_keys = ("tensor", "pipeline", "virtual_pipeline")
    model_parallel_changed = any(saved_layout.get(k) != parallel_layout()[k] for k in mp_keys)
    if model_parallel_changed and saved_format != "fully_reshardable":
        raise CheckpointError(
            f"Checkpoint {info.path} was saved with layout {saved_layout} and optimizer format "
            f"'{saved_format}', which reshards over data parallelism only. Resume with the "
            "same tensor/pipeline sizes, or start a new run from its weights with "
            "train.init_from."
        )
    init_empty_optimizer_state(optimizer)
    sd = _state_dict(
        chunks,
        optimizer,
        scheduler,
        None,
        saved_format,
        is_loading=True,
        include_rng=same_layout,
        include_optimizer=True,
    )
    sd["iteration"] = 0
    sd["consumed_samples"] = 0
    loaded = dist_checkpointing.load(sd, str(info.path))
    for i, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        unwrap(chunk).load_state_dict(loaded[key], strict=True)
    optimizer.load_state_dict(loaded["optimizer"])
    untie_adam_steps(optimizer)
    scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    return TrainingProgress(int(loaded["iteration"]), int(loaded["consumed_samples"]))


def load_weights_only(info: CheckpointInfo, chunks: list[torch.nn.Module]) -> None:
    """Initialise model weights from a checkpoint (any layout), nothing else."""
    from hybrid_megatron.checkpoint.model_state import load_model_state

    load_model_state(chunks, info.path)

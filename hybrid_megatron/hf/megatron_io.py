"""The Megatron side of conversion: one CPU process holding the whole model (TP=1, PP=1).

Dist checkpoints saved under any TP/PP layout load into that model (Megatron reshards them),
and what it saves loads under any layout whose padded vocabulary matches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

from hybrid_megatron.config import ParallelConfig, RunConfig, to_dict
from hybrid_megatron.errors import ConfigError


@contextlib.contextmanager
def single_process_megatron() -> Iterator[None]:
    """A 1-process gloo group with TP=PP=1 (reused when the caller already has one)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from hybrid_megatron import distributed

    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
    if world != 1:
        raise ConfigError(
            f"Checkpoint conversion runs in one process, but this one is part of a group of "
            f"{world}; run it with plain `python` / `hybrid-megatron`, not torchrun or srun."
        )
    owned = not parallel_state.model_parallel_is_initialized()
    if not owned and parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise ConfigError("Conversion needs tensor/pipeline parallel size 1 in this process.")
    distributed.initialize(ParallelConfig(), device="cpu")
    try:
        yield
    finally:
        if owned:
            distributed.destroy()


def single_layout_config(cfg: RunConfig) -> RunConfig:
    """`cfg` at TP=1/PP=1, keeping the vocabulary padding of its own tensor-parallel size."""
    m = cfg.model
    pattern = "".join(m.pattern.split()).replace("|", "")
    model = dataclasses.replace(
        m,
        pattern=pattern,
        make_vocab_size_divisible_by=m.make_vocab_size_divisible_by * cfg.parallel.tensor,
        attention_backend="auto" if m.attention_backend == "te" else m.attention_backend,
        num_moe_experts=m.num_moe_experts if "E" in pattern else None,
    )
    return dataclasses.replace(cfg, model=model, parallel=ParallelConfig())


def build_single_model(cfg: RunConfig) -> torch.nn.Module:
    """The whole model for `cfg` (any layout) as one fp32 CPU module, in eval mode."""
    from hybrid_megatron.model.build import build_model

    single = single_layout_config(cfg)
    model = build_model(single, params_dtype=torch.float32, device="cpu")
    return model.eval()


def load_weights(model: torch.nn.Module, checkpoint_dir: Path) -> None:
    from hybrid_megatron.checkpoint.model_state import load_model_state

    load_model_state([model], checkpoint_dir)


def float_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's floating-point tensors by name (no extra states)."""
    return {
        k: v
        for k, v in model.state_dict().items()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    }


@torch.no_grad()
def assign_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` into `model`; every floating tensor of the model must be given."""
    own = float_state(model)
    missing, extra = own.keys() - tensors.keys(), tensors.keys() - own.keys()
    if missing or extra:
        raise RuntimeError(
            f"weights do not match the Megatron model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(extra)[:5]}"
        )
    for name, target in own.items():
        if target.shape != tensors[name].shape:
            raise RuntimeError(
                f"{name}: shape {tuple(tensors[name].shape)} != {tuple(target.shape)}"
            )
        target.copy_(tensors[name])


@torch.no_grad()
def megatron_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, padded vocab] of the single-process model (float32)."""
    s = tokens.shape[1]
    positions = torch.arange(s).expand(tokens.shape[0], -1)
    return model(tokens, positions, None).float()


def save_weights_checkpoint(
    chunks: list[torch.nn.Module],
    cfg: RunConfig,
    run_dir: Path,
    iteration: int,
    extra: dict | None = None,
) -> Path:
    """Collectively save model weights in the training layout; returns the iter dir.

    RUN_DIR/checkpoints/iter_NNNNNNN/ holds the dist checkpoint (model under "model"), the
    run config and, written last, the completion marker; `latest_checkpointed_iteration.txt`
    names it. Usable by conversion and by `train.init_from` (weights only, no optimizer).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from hybrid_megatron.checkpoint.layout import (
        LATEST_FILE,
        RUN_CONFIG_FILE,
        atomic_write_text,
        iter_dir_name,
        write_complete_marker,
    )
    from hybrid_megatron.checkpoint.model_state import save_model_state

    root = Path(run_dir) / "checkpoints"
    ckpt = root / iter_dir_name(iteration)
    save_model_state(chunks, ckpt)
    if dist.get_rank() == 0:
        (ckpt / RUN_CONFIG_FILE).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        layout = {
            "tensor": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
            "data": parallel_state.get_data_parallel_world_size(),
            "virtual_pipeline": parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        }
        write_complete_marker(ckpt, iteration, {"layout": layout, **(extra or {})}, checksums=True)
        atomic_write_text(root / LATEST_FILE, f"{iteration}\n")
    dist.barrier()
    return ckpt

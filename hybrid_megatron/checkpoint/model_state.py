"""Save and load model weights as Megatron-Core dist checkpoints (any TP/PP layout)."""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import dist_checkpointing


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    """Sharded state dict of all local model chunks ("model" or "model0", "model1", ...)."""
    chunks = [unwrap(c) for c in chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def save_model_state(chunks: list[torch.nn.Module], path: str | Path) -> None:
    """Collectively save the weights of every rank's chunks into directory `path`."""
    path = Path(path)
    if torch.distributed.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(path))


def load_model_state(chunks: list[torch.nn.Module], path: str | Path, strict: bool = True) -> None:
    """Collectively load weights saved under any parallel layout into this layout."""
    sharded = model_sharded_state_dict(chunks)
    loaded = dist_checkpointing.load(sharded, str(path))
    for i, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        unwrap(chunk).load_state_dict(loaded[key], strict=strict)

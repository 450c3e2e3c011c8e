"""Load-balanced sequence layout of context parallelism (pure index math, no communication).

A sequence of length S is cut into 2*CP chunks of c = S / (2*CP) tokens; CP rank r holds
chunks r and 2*CP-1-r, concatenated in that order (Megatron's `get_batch_on_this_cp_rank`
order, which its rotary tables also follow). Every layer type's CP path reads this layout:
"local chunk i" (i in 0, 1) of rank r is global chunk `rank_chunks(r, cp)[i]`.

The index math (who holds which chunk, the halo transfers) is in `plan` (no torch).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hybrid_megatron.context_parallel.plan import (
    HaloTransfer,
    chunk_owner,
    halo_length,
    halo_plan,
    rank_chunks,
)

__all__ = [
    "HaloTransfer",
    "chunk_owner",
    "halo_length",
    "halo_plan",
    "rank_chunks",
    "shard_batch",
    "shard_sequence",
    "unshard_sequence",
]


def shard_sequence(x: Tensor, dim: int, rank: int, cp: int) -> Tensor:
    """This rank's part of a full-sequence tensor: chunks r and 2cp-1-r along `dim`."""
    if cp == 1:
        return x
    dim = dim % x.dim()
    s = x.shape[dim]
    if s % (2 * cp):
        raise ValueError(f"sequence length {s} is not divisible by 2 * context parallel = {2 * cp}")
    chunks = x.unflatten(dim, (2 * cp, s // (2 * cp)))
    index = torch.tensor(rank_chunks(rank, cp), device=x.device)
    return chunks.index_select(dim, index).flatten(dim, dim + 1)


def unshard_sequence(parts: list[Tensor], dim: int) -> Tensor:
    """Inverse of `shard_sequence`: the full sequence from every rank's part (rank order)."""
    cp = len(parts)
    if cp == 1:
        return parts[0]
    halves = [p.chunk(2, dim=dim) for p in parts]
    ordered = (chunk_owner(k, cp) for k in range(2 * cp))
    return torch.cat([halves[rank][local] for rank, local in ordered], dim)


def shard_batch(batch: dict[str, Tensor | None], rank: int, cp: int) -> dict[str, Tensor | None]:
    """Shard a micro-batch's [b, s] tensors (tokens, labels, loss mask, position ids)."""
    if cp == 1:
        return batch
    return {k: None if v is None else shard_sequence(v, 1, rank, cp) for k, v in batch.items()}

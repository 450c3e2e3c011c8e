"""Load-balanced sequence layout of context parallelism (pure index math, no communication).

A sequence of length S is cut into 2*CP chunks of c = S / (2*CP) tokens; CP rank r holds
chunks r and 2*CP-1-r, concatenated in that order (Megatron's `get_batch_on_this_cp_rank`
order, which its rotary tables also follow). Every layer type's CP path reads this layout:
"local chunk i" (i in 0, 1) of rank r is global chunk `rank_chunks(r, cp)[i]`.

`halo_plan` lists the transfers that give every chunk the `halo` tokens just before it
(sliding-window keys/values, Mamba conv inputs); a halo longer than a chunk spans several
chunks, owned by several ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "HaloTransfer",
    "chunk_owner",
    "halo_plan",
    "rank_chunks",
    "shard_batch",
    "shard_sequence",
    "unshard_sequence",
]


def rank_chunks(rank: int, cp: int) -> tuple[int, int]:
    """The two global chunk indices rank `rank` holds, in local order."""
    return rank, 2 * cp - 1 - rank


def chunk_owner(chunk: int, cp: int) -> tuple[int, int]:
    """(rank, local index) holding global chunk `chunk`."""
    return (chunk, 0) if chunk < cp else (2 * cp - 1 - chunk, 1)


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
    return torch.cat([halves[chunk_owner(k, cp)[0]][chunk_owner(k, cp)[1]] for k in range(2 * cp)], dim)


def shard_batch(batch: dict[str, Tensor | None], rank: int, cp: int) -> dict[str, Tensor | None]:
    """Shard a micro-batch's [b, s] tensors (tokens, labels, loss mask, position ids)."""
    if cp == 1:
        return batch
    return {k: None if v is None else shard_sequence(v, 1, rank, cp) for k, v in batch.items()}


@dataclass(frozen=True)
class HaloTransfer:
    """Rows [start, end) of global chunk `src_chunk` go in front of global chunk `dst_chunk`,
    at row `dst_offset` of its halo."""

    src_chunk: int
    dst_chunk: int
    start: int
    end: int
    dst_offset: int

    @property
    def rows(self) -> int:
        return self.end - self.start


def halo_plan(cp: int, chunk_len: int, halo: int) -> list[HaloTransfer]:
    """Every transfer that builds each chunk's halo (the min(halo, k*c) rows before chunk k).

    Ordered by destination chunk, then by source position, so a halo is assembled by
    concatenating its transfers in order.
    """
    plan = []
    for k in range(2 * cp):
        first = max(0, k * chunk_len - halo)  # first global row of chunk k's halo
        offset = 0
        for j in range(first // chunk_len, k):
            start = max(first, j * chunk_len) - j * chunk_len
            plan.append(HaloTransfer(j, k, start, chunk_len, offset))
            offset += chunk_len - start
    return plan


def halo_length(chunk: int, chunk_len: int, halo: int) -> int:
    """Rows of chunk `chunk`'s halo (shorter at the start of the sequence)."""
    return min(halo, chunk * chunk_len)

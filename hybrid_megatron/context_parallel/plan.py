"""Context-parallel index math and traffic model (no torch: `info` uses it).

Chunks: a sequence is cut into 2*CP chunks of c tokens; rank r holds chunks r and 2*CP-1-r
(local chunks 0 and 1). `halo_plan` lists the transfers that give every chunk the `halo`
tokens just before it (sliding-window K/V, Mamba conv inputs); a halo longer than a chunk
spans several chunks, owned by several ranks. `sent_per_layer` is the number of elements a
rank sends per layer and sequence in the forward pass (the backward sends as many).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

if typing.TYPE_CHECKING:
    from hybrid_megatron.config.schema import ModelConfig, ParallelConfig

__all__ = [
    "HaloTransfer",
    "chunk_owner",
    "describe",
    "halo_length",
    "halo_plan",
    "rank_chunks",
    "sent_per_layer",
]


def rank_chunks(rank: int, cp: int) -> tuple[int, int]:
    """The two global chunk indices rank `rank` holds, in local order."""
    return rank, 2 * cp - 1 - rank


def chunk_owner(chunk: int, cp: int) -> tuple[int, int]:
    """(rank, local index) holding global chunk `chunk`."""
    return (chunk, 0) if chunk < cp else (2 * cp - 1 - chunk, 1)


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


def halo_length(chunk: int, chunk_len: int, halo: int) -> int:
    """Rows of chunk `chunk`'s halo (shorter at the start of the sequence)."""
    return min(halo, chunk * chunk_len)


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


def halo_rows_sent(cp: int, chunk_len: int, halo: int) -> list[int]:
    """Rows each rank sends to other ranks to build every halo."""
    sent = [0] * cp
    for t in halo_plan(cp, chunk_len, halo):
        src, dst = chunk_owner(t.src_chunk, cp)[0], chunk_owner(t.dst_chunk, cp)[0]
        if src != dst:
            sent[src] += t.rows
    return sent


def sent_per_layer(m: ModelConfig, p: ParallelConfig, seq_length: int | None = None) -> dict:
    """Elements the busiest rank sends per layer and sequence (forward; backward equal).

    Keys: "full attention", "sliding window", "sliding window (all-gather)" (what
    gathering the whole K/V would send instead), "mamba2".
    """
    cp, tp = p.context, p.tensor
    seq = seq_length or m.seq_length
    c = seq // (2 * cp)
    kv_row = 2 * (m.query_groups // tp) * m.head_dim  # K and V of one token, this TP rank
    gather = (cp - 1) * 2 * c * kv_row
    out = {"full attention": gather}
    if m.swa.window is not None:
        out["sliding window"] = max(halo_rows_sent(cp, c, m.swa.window - 1)) * kv_row
        out["sliding window (all-gather)"] = gather
    heads = m.mamba_num_heads // tp
    conv_dim = heads * m.mamba.head_dim + 2 * (m.mamba.num_groups // tp) * m.mamba.state_dim
    states = (cp - 1) * 2 * heads * (m.mamba.head_dim * m.mamba.state_dim + 1)
    conv = max(halo_rows_sent(cp, c, m.mamba.conv_kernel - 1)) * conv_dim
    out["mamba2"] = states + conv
    return out


def describe(m: ModelConfig, p: ParallelConfig) -> list[str]:
    """Lines for `info`: the CP layout and each layer type's scheme and traffic."""
    cp = p.context
    if cp == 1:
        return ["context      none (parallel.context: 1)"]
    c = m.seq_length // (2 * cp)
    vol = sent_per_layer(m, p)
    kinds = set(m.pattern)
    lines = [
        f"context      cp={cp}: each sequence in {2 * cp} chunks of {c} tokens; CP rank r "
        f"holds chunks r and {2 * cp - 1}-r",
        "             elements sent per rank, layer and sequence (forward; backward the same):",
    ]
    if "*" in kinds:
        lines.append(
            f"             full attention   all-gather K/V, reduce-scatter dK/dV: "
            f"{vol['full attention']:,}"
        )
    if "S" in kinds and m.swa.window is not None:
        w = m.swa.window
        lines.append(
            f"             sliding window   halo of {w - 1} tokens per chunk, point-to-point: "
            f"{vol['sliding window']:,} (all-gather would send "
            f"{vol['sliding window (all-gather)']:,})"
        )
    if "M" in kinds:
        lines.append(
            f"             mamba2           conv halo of {m.mamba.conv_kernel - 1} tokens + "
            f"all-gather of chunk states: {vol['mamba2']:,}"
        )
    return lines

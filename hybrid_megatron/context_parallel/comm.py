"""Differentiable context-parallel communication over torch.distributed (gloo or NCCL).

- `gather_sequence`: all-gather of a load-balanced sharded tensor into the full sequence in
  order; backward reduce-scatters (sums) the full-sequence gradient back to the owners.
- `exchange_halo`: each local chunk receives the `halo` rows just before it, point-to-point
  from the rank(s) holding them (one message per ordered rank pair); backward returns the
  halo's gradient to its owners and adds it there.

`record_volume()` counts the elements this rank sends, per tag and direction (the numbers
of the README and `bench/bench_cp_volume.py`). All-gather / reduce-scatter are counted as a
bandwidth-optimal (ring) implementation sends them: (cp - 1) x the local tensor per rank.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from hybrid_megatron.context_parallel.layout import (
    HaloTransfer,
    chunk_owner,
    halo_length,
    halo_plan,
    rank_chunks,
    shard_sequence,
    unshard_sequence,
)

__all__ = ["exchange_halo", "gather_sequence", "record_volume"]

_LOGS: list[defaultdict[str, int]] = []
# torch >= 2.13 names them *_single (the *_tensor names are deprecated there).
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@contextlib.contextmanager
def record_volume() -> Iterator[defaultdict[str, int]]:
    """Count elements sent by this rank inside the block: {"TAG.forward": n, ...}."""
    log: defaultdict[str, int] = defaultdict(int)
    _LOGS.append(log)
    try:
        yield log
    finally:
        _LOGS.remove(log)


def _count(tag: str, direction: str, numel: int) -> None:
    for log in _LOGS:
        log[f"{tag}.{direction}"] += numel


# --------------------------------------------------------------------------- all-gather
class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, group: Any, tag: str) -> Tensor:  # type: ignore[override]
        cp = group.size()
        ctx.dim, ctx.group, ctx.tag = dim, group, tag
        xs = x.movedim(dim, 0).contiguous()
        out = xs.new_empty((cp * xs.shape[0], *xs.shape[1:]))
        _ALL_GATHER(out, xs, group=group)
        _count(tag, "forward", (cp - 1) * xs.numel())
        return unshard_sequence(list(out.chunk(cp)), 0).movedim(0, dim)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        group = ctx.group
        cp = group.size()
        g = grad.movedim(ctx.dim, 0)
        parts = torch.cat([shard_sequence(g, 0, r, cp) for r in range(cp)]).contiguous()
        out = parts.new_empty((parts.shape[0] // cp, *parts.shape[1:]))
        _REDUCE_SCATTER(out, parts, op=dist.ReduceOp.SUM, group=group)
        _count(ctx.tag, "backward", (cp - 1) * out.numel())
        return out.movedim(0, ctx.dim), None, None, None


def gather_sequence(x: Tensor, dim: int, group: Any, tag: str = "gather") -> Tensor:
    """Full sequence (global order) of a load-balanced sharded `x`, differentiable."""
    if group.size() == 1:
        return x
    return _GatherSequence.apply(x, dim, group, tag)


# --------------------------------------------------------------------------- halo exchange
def _p2p(
    sends: dict[int, Tensor], recv_shapes: dict[int, tuple[int, ...]], like: Tensor, group: Any
) -> dict[int, Tensor]:
    """Send sends[peer] to each peer and receive recv_shapes[peer] from each (group ranks)."""
    reqs, received = [], {}
    for peer, shape in recv_shapes.items():
        received[peer] = like.new_empty(shape)
        reqs.append(dist.irecv(received[peer], src=dist.get_global_rank(group, peer), group=group))
    for peer, tensor in sends.items():
        reqs.append(dist.isend(tensor, dst=dist.get_global_rank(group, peer), group=group))
    for req in reqs:
        req.wait()
    return received


def _rows(xs: Tensor, local: int, chunk_len: int, t: HaloTransfer) -> Tensor:
    """The source rows of transfer `t` inside a [2c, ...] tensor of local chunks."""
    return xs[local * chunk_len + t.start : local * chunk_len + t.end]


def _owners(t: HaloTransfer, cp: int) -> tuple[int, int, int, int]:
    """(source rank, source local chunk, destination rank, destination local chunk)."""
    return (*chunk_owner(t.src_chunk, cp), *chunk_owner(t.dst_chunk, cp))


def _exchange(
    outgoing: dict[int, list[Tensor]], incoming: dict[int, list[HaloTransfer]], like: Tensor, group
) -> tuple[dict[int, list[Tensor]], int]:
    """One message per peer each way: (received rows split per transfer, elements sent)."""
    payload = {peer: torch.cat(parts).contiguous() for peer, parts in outgoing.items()}
    shapes = {p: (sum(t.rows for t in ts), *like.shape[1:]) for p, ts in incoming.items()}
    received = _p2p(payload, shapes, like, group)
    return {
        peer: list(received[peer].split([t.rows for t in ts])) for peer, ts in incoming.items()
    }, sum(t.numel() for t in payload.values())


class _HaloExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, halo: int, group: Any, tag: str):  # type: ignore[override]
        cp, me = group.size(), group.rank()
        xs = x.movedim(dim, 0)
        c = xs.shape[0] // 2
        ctx.dim, ctx.halo, ctx.group, ctx.tag, ctx.c = dim, halo, group, tag, c
        halos = [
            xs.new_zeros((halo_length(k, c, halo), *xs.shape[1:])) for k in rank_chunks(me, cp)
        ]
        outgoing: dict[int, list[Tensor]] = defaultdict(list)
        incoming: dict[int, list[HaloTransfer]] = defaultdict(list)
        for t in halo_plan(cp, c, halo):
            src, src_local, dst, dst_local = _owners(t, cp)
            if src == me and dst == me:
                halos[dst_local][t.dst_offset : t.dst_offset + t.rows] = _rows(xs, src_local, c, t)
            elif src == me:
                outgoing[dst].append(_rows(xs, src_local, c, t))
            elif dst == me:
                incoming[src].append(t)
        received, sent = _exchange(outgoing, incoming, xs, group)
        _count(tag, "forward", sent)
        for peer, ts in incoming.items():
            for t, rows in zip(ts, received[peer]):
                halos[_owners(t, cp)[3]][t.dst_offset : t.dst_offset + t.rows] = rows
        ctx.halo_rows = [h.shape[0] for h in halos]
        return tuple(torch.cat([h, ch]).movedim(0, dim) for h, ch in zip(halos, xs.chunk(2)))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        group, c = ctx.group, ctx.c
        cp, me = group.size(), group.rank()
        ref = next(g for g in grads if g is not None).movedim(ctx.dim, 0)
        gs = [
            g.movedim(ctx.dim, 0) if g is not None else ref.new_zeros((n + c, *ref.shape[1:]))
            for g, n in zip(grads, ctx.halo_rows)
        ]
        dx = torch.cat([g[n:] for g, n in zip(gs, ctx.halo_rows)]).clone()
        outgoing: dict[int, list[Tensor]] = defaultdict(list)
        incoming: dict[int, list[HaloTransfer]] = defaultdict(list)
        for t in halo_plan(cp, c, ctx.halo):  # every transfer in reverse: halo grad -> owner
            src, src_local, dst, dst_local = _owners(t, cp)
            if dst == me:
                piece = gs[dst_local][t.dst_offset : t.dst_offset + t.rows]
                if src == me:
                    _rows(dx, src_local, c, t).add_(piece)
                else:
                    outgoing[src].append(piece)
            elif src == me:
                incoming[dst].append(t)
        received, sent = _exchange(outgoing, incoming, dx, group)
        _count(ctx.tag, "backward", sent)
        for peer, ts in incoming.items():
            for t, rows in zip(ts, received[peer]):
                _rows(dx, _owners(t, cp)[1], c, t).add_(rows)
        return dx.movedim(0, ctx.dim), None, None, None, None


def exchange_halo(
    x: Tensor, dim: int, halo: int, group: Any, tag: str = "halo"
) -> tuple[Tensor, Tensor]:
    """For each of this rank's two chunks of `x` (along `dim`), [halo rows before it; chunk].

    The halo of global chunk k has min(halo, k * chunk) rows (none at the sequence start).
    (With one rank the two chunks are the halves of the sequence; only local copies.)
    """
    return _HaloExchange.apply(x, dim, halo, group, tag)

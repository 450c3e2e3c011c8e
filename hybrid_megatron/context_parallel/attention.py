"""Exact context-parallel causal attention around any local kernel.

Inputs are this rank's load-balanced shards, layout [b, h, 2c, d] (local chunks i = 0, 1 are
global chunks k = r and 2cp-1-r). The local kernel is called with bottom-right aligned
queries (its `sq <= sk` mode: the queries are the last sq positions of the keys), so every
backend of `kernels.attention` (sdpa, flex, flash-attn) runs unchanged:

- Full attention: K/V are all-gathered in sequence order (Llama 3's scheme); chunk k attends
  to keys [0, (k+1)c). Backward reduce-scatters dK/dV. Sends 2(cp-1) x local K/V per rank
  and direction: O(sequence).
- Sliding window W: chunk k needs only the W-1 keys before it. `exchange_halo` fetches them
  point-to-point (several chunks / ranks when W-1 > c) and the kernel runs on [halo; chunk].
  Sends at most 2 x 2 x (W-1) x row per rank and direction: O(W), independent of sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from hybrid_megatron.context_parallel.comm import exchange_halo, gather_sequence
from hybrid_megatron.context_parallel.layout import rank_chunks

__all__ = ["context_parallel_attention"]

Kernel = Callable[[Tensor, Tensor, Tensor, int | None], Tensor]


def context_parallel_attention(
    q: Tensor, k: Tensor, v: Tensor, window: int | None, group: Any, kernel: Kernel
) -> Tensor:
    """Causal (window None) or sliding-window attention of this rank's shards over the whole
    sequence. `kernel(q, k, v, window)` is the local bottom-right aligned kernel."""
    cp, rank = group.size(), group.rank()
    c = q.shape[2] // 2
    qs = q.split(c, dim=2)
    kv = torch.stack([k, v])  # one exchange for both: [2, b, hkv, 2c, d]
    outs = []
    if window is None:
        full = gather_sequence(kv, 3, group, tag="attention")
        for qi, chunk in zip(qs, rank_chunks(rank, cp)):
            prefix = full[:, :, :, : (chunk + 1) * c]
            outs.append(kernel(qi, prefix[0], prefix[1], None))
    else:
        extended = exchange_halo(kv, 3, window - 1, group, tag="swa")
        for qi, ext in zip(qs, extended):
            outs.append(kernel(qi, ext[0], ext[1], window))
    return torch.cat(outs, dim=2)

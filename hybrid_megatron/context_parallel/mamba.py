"""Exact context-parallel Mamba-2: conv halo + SSM state passing (no head split).

On each of this rank's two chunks (global chunk k):

1. conv: the depthwise causal conv needs the `conv_kernel - 1` xBC rows before the chunk;
   they come by `exchange_halo` (the SWA mechanism with a tiny window).
2. SSD from a zero state: y0_k and the chunk's final state s_k (any SSD kernel that returns
   final states: the torch chunked scan or mamba-ssm's).
3. The true state entering chunk k is S_k = sum_{j<k} (prod_{j<m<k} a_m) s_j, with
   a_m = exp(sum over chunk m of dt * A). Every rank all-gathers (s_j, log a_j) of all 2cp
   chunks (2 states + 2 decays per rank) and runs this 2cp-step scan itself.
4. The correction is exact: y_k = y0_k + exp(cumsum(dt * A))_t * (C_t . S_k).

Traffic per rank and direction: (cp-1) x 2 x b x heads x (head_dim x state + 1) for the
states plus at most 2 x (conv_kernel-1) x conv channels x b for the conv halo; independent of
the sequence. Megatron-Core's all-to-all alternative moves z, x, B, C, dt of the whole local
sequence (O(sequence x d_inner)) and needs heads divisible by tensor x context.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from hybrid_megatron.context_parallel.comm import exchange_halo, gather_sequence
from hybrid_megatron.context_parallel.layout import rank_chunks

__all__ = ["context_parallel_conv", "context_parallel_ssd"]


def context_parallel_conv(
    xBC: Tensor, conv: Callable[[Tensor, Tensor], Tensor], width: int, group: Any
) -> Tensor:
    """Causal conv of this rank's [b, 2c, ch] shard. `conv(x [b, ch, l], initial_state
    [b, ch, width-1])` is the local conv with its preceding inputs."""
    c = xBC.shape[1] // 2
    outs = []
    for ext in exchange_halo(xBC, 1, width - 1, group, tag="mamba_conv"):
        halo, chunk = ext[:, : ext.shape[1] - c], ext[:, ext.shape[1] - c :]
        halo = F.pad(halo, (0, 0, width - 1 - halo.shape[1], 0))  # zeros before the start
        outs.append(conv(chunk.transpose(1, 2), halo.transpose(1, 2)).transpose(1, 2))
    return torch.cat(outs, dim=1)


def _process_dt(dt: Tensor, dt_bias: Tensor, dtype: torch.dtype) -> Tensor:
    """dt as the SSD kernels use it: softplus(dt + bias), clamped at 0."""
    return F.softplus(dt.to(dtype) + dt_bias.to(dtype)).clamp(min=0.0)


def context_parallel_ssd(
    ssd: Callable[..., Any],
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor,
    dt_bias: Tensor,
    group: Any,
) -> Tensor:
    """SSD of this rank's shards (x [b, 2c, h, p], dt [b, 2c, h], B/C [b, 2c, g, n]) with the
    state entering each chunk from all earlier chunks. dt gets bias + softplus."""
    cp, rank = group.size(), group.rank()
    b, l2, h, p = x.shape
    c = l2 // 2
    g = B.shape[2]
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    ys, finals, log_decays, cums = [], [], [], []
    for i in range(2):
        sl = slice(i * c, (i + 1) * c)
        y0, final = ssd(
            x[:, sl],
            dt[:, sl],
            A,
            B[:, sl],
            C[:, sl],
            chunk_size,
            D=D,
            dt_bias=dt_bias,
            dt_softplus=True,
            return_final_states=True,
        )
        cum = torch.cumsum(_process_dt(dt[:, sl], dt_bias, cdt) * A.to(cdt), dim=1)  # [b, c, h]
        ys.append(y0)
        finals.append(final.to(cdt))
        log_decays.append(cum[:, -1])
        cums.append(cum)
    # Every chunk's (state, log decay) in sequence order: [2cp, b, h, p * n + 1].
    own = torch.stack(
        [torch.cat([f.flatten(2), d[..., None]], -1) for f, d in zip(finals, log_decays)]
    )
    every = gather_sequence(own, 0, group, tag="mamba_state")
    states, decays = every[..., :-1].unflatten(-1, (p, -1)), every[..., -1]
    entering, state = [], torch.zeros_like(states[0])
    for k in range(2 * cp):
        entering.append(state)
        state = state * torch.exp(decays[k])[..., None, None] + states[k]
    out = []
    for i, k in enumerate(rank_chunks(rank, cp)):
        Ch = C[:, i * c : (i + 1) * c].to(cdt).repeat_interleave(h // g, dim=2)  # [b, c, h, n]
        corr = torch.einsum("blhn,bhpn->blhp", Ch, entering[k]) * torch.exp(cums[i])[..., None]
        out.append((ys[i].to(cdt) + corr).to(ys[i].dtype))
    return torch.cat(out, dim=1)

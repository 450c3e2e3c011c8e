"""Pure-torch Mamba-2 helper ops: depthwise causal conv1d (prefill + decode) and the
grouped gated RMSNorm.

Shape legend: b batch, d channels, l sequence length, w conv width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = ["causal_conv1d", "causal_conv1d_update", "gated_rms_norm"]


def _activate(x: Tensor, activation: str | None) -> Tensor:
    if activation is None:
        return x
    if activation in ("silu", "swish"):
        return F.silu(x)
    raise ValueError(f"unsupported activation {activation!r}; use None, 'silu' or 'swish'")


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = "silu",
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Depthwise causal conv: out[:, c, t] = act(bias[c] + sum_k weight[c, k] * x[:, c, t-w+1+k]).

    Args:
        x: [b, d, l]; weight: [d, w]; bias: [d]; activation: None, "silu" or "swish".
        initial_state: [b, d, w-1] inputs preceding x (zeros if None).
        return_final_state: also return the last w-1 inputs [b, d, w-1] (seed for decode or
            the ``initial_state`` of the next segment).

    Returns:
        out [b, d, l] in x.dtype (and the final state, same dtype as x).
    """
    d, w = weight.shape
    if initial_state is None:
        xp = F.pad(x, (w - 1, 0))
    else:
        xp = torch.cat([initial_state.to(x.dtype), x], dim=-1)
    b_ = None if bias is None else bias.to(x.dtype)
    out = _activate(F.conv1d(xp, weight.to(x.dtype).unsqueeze(1), b_, groups=d), activation)
    if return_final_state:
        return out, xp[..., xp.shape[-1] - (w - 1) :]
    return out


def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
) -> Tensor:
    """Decode step(s) of :func:`causal_conv1d`; **updates ``conv_state`` in place**.

    Args:
        x: [b, d] (one token) or [b, d, l] (a few tokens).
        conv_state: [b, d, s] rolling window of the most recent inputs, s >= w-1 (usually
            s = w). The new inputs are appended and the oldest dropped.
        weight: [d, w]; bias: [d]; activation: None, "silu" or "swish".

    Returns:
        out with the shape of x, in x.dtype.
    """
    single = x.dim() == 2
    xs = x.unsqueeze(-1) if single else x
    d, w = weight.shape
    s = conv_state.shape[-1]
    if s < w - 1:
        raise ValueError(f"conv_state length {s} < width - 1 = {w - 1}")
    xcat = torch.cat([conv_state.to(xs.dtype), xs], dim=-1)  # [b, d, s + l]
    conv_state.copy_(xcat[..., xcat.shape[-1] - s :])
    window = xcat[..., xcat.shape[-1] - (xs.shape[-1] + w - 1) :]
    b_ = None if bias is None else bias.to(xs.dtype)
    out = _activate(F.conv1d(window, weight.to(xs.dtype).unsqueeze(1), b_, groups=d), activation)
    return out.squeeze(-1) if single else out


def gated_rms_norm(
    x: Tensor,
    z: Tensor | None,
    weight: Tensor,
    eps: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> Tensor:
    """Mamba-2 grouped gated RMSNorm over the last dim (d channels).

    norm_before_gate=False: ``rmsnorm_g(x * silu(z)) * weight``;
    norm_before_gate=True:  ``rmsnorm_g(x) * weight * silu(z)``;
    where rmsnorm_g normalises each contiguous group of ``group_size`` channels (default: all
    d) by its own RMS. x, z: [..., d]; weight: [d]. Computed in float32 (float64 for float64
    input); returns x.dtype.
    """
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    d = x.shape[-1]
    gs = d if group_size is None else group_size
    if d % gs:
        raise ValueError(f"last dim {d} is not divisible by group_size {gs}")
    xf = x.to(cdt)
    gate = None if z is None else F.silu(z.to(cdt))
    if gate is not None and not norm_before_gate:
        xf = xf * gate
    xg = xf.unflatten(-1, (d // gs, gs))
    xg = xg * torch.rsqrt(xg.pow(2).mean(dim=-1, keepdim=True) + eps)
    out = xg.flatten(-2) * weight.to(cdt)
    if gate is not None and norm_before_gate:
        out = out * gate
    return out.to(x.dtype)

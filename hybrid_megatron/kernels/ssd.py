"""Pure-torch Mamba-2 state-space-duality (SSD) kernels and backend dispatch.

Shape legend: b batch, l sequence length, h heads, p head dim, g B/C groups (h % g == 0,
head ``i`` uses group ``i // (h // g)``), n state dim, c chunks, L chunk length.

The SSM recurrence implemented here (per head, with ``dt`` after bias/softplus/clamp):

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T      h_t: [p, n]
    y_t = h_t C_t + D * x_t ;   y_t *= silu(z_t) if z is given

``ssd_chunk_scan`` mirrors ``mamba_ssm``'s ``mamba_chunk_scan_combined`` (positional
arguments up to ``dt_bias`` match; pass the rest by keyword) so callers can use either one
through :func:`select_ssd_impl`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
DtLimit = tuple[float, float]

__all__ = [
    "mamba_backend_available",
    "select_ssd_impl",
    "ssd_chunk_scan",
    "ssd_sequential_reference",
    "ssd_step",
]


# --------------------------------------------------------------------------- helpers


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _process_dt(dt: Tensor, dt_bias: Tensor | None, dt_softplus: bool, dt_limit: DtLimit) -> Tensor:
    """dt (+ bias) -> softplus (optional) -> clamp to ``dt_limit`` (always, like mamba_ssm)."""
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)  # threshold=20 -> identity above 20, as in mamba_ssm
    return dt.clamp(min=dt_limit[0], max=dt_limit[1])


def _skip_and_gate(y: Tensor, x: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """y + D * x, then * silu(z). y, x, z: [..., h, p]; D: [h] or [h, p]."""
    if D is not None:
        D = D.to(y.dtype)
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _check_shapes(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> None:
    b, l, h, _ = x.shape
    if dt.shape != (b, l, h) or A.shape != (h,):
        raise ValueError(f"expected dt [{b}, {l}, {h}] and A [{h}], got {dt.shape}, {A.shape}")
    if B.dim() != 4 or B.shape[:2] != (b, l) or C.shape != B.shape or h % B.shape[2]:
        raise ValueError(f"B/C must be [b, l, g, n] with h % g == 0; got {B.shape}, {C.shape}")


def _segsum_exp_t(x: Tensor) -> Tensor:
    """Causal decay matrix, transposed. x [..., T] -> out [..., T, T] with
    out[..., j, i] = exp(sum_{k=j+1..i} x_k) for i >= j, and 1 (not 0) for i < j: callers
    multiply by a factor that is already zero there.

    The segment sums come from a masked cumsum, not ``cumsum_i - cumsum_j``, so they are free
    of cancellation, and only non-positive sums (for x <= 0) are exponentiated. The
    transposed layout makes the cumsum run over the contiguous last dim (faster)."""
    T = x.size(-1)
    upper = torch.ones(T, T, dtype=x.dtype, device=x.device).triu(diagonal=1)
    return torch.exp((x[..., None, :] * upper).cumsum(dim=-1))  # x_i * [i > j], summed over i


def _recurrence_step(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor
) -> tuple[Tensor, Tensor]:
    """One recurrence step, heads already expanded. state [b, h, p, n], x [b, h, p],
    dt [b, h], A [h], B/C [b, h, n] -> (new_state [b, h, p, n], y [b, h, p]) (no D / z)."""
    decay = torch.exp(dt * A)[..., None, None]
    state = state * decay + (dt[..., None] * x)[..., None] * B[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", state, C)
    return state, y


# --------------------------------------------------------------------------- SSD scans


def ssd_chunk_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    *,
    dt_softplus: bool = False,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
    dt_limit: DtLimit = (0.0, float("inf")),
) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked SSD scan (semantics of ``mamba_ssm``'s ``mamba_chunk_scan_combined``).

    Args:
        x: [b, l, h, p]; dt: [b, l, h]; A: [h] (negative); B, C: [b, l, g, n].
        chunk_size: chunk length L; ``l`` need not be a multiple (padded internally).
        D: [h] or [h, p] skip; z: [b, l, h, p] gate (``y * silu(z)``); dt_bias: [h].
        dt_softplus: apply softplus to ``dt + dt_bias``; dt_limit: clamp range for dt
            (applied always; the default clamps negative dt to 0, like mamba_ssm).
        initial_states: [b, h, p, n] state before the first token.
        return_final_states: also return the state after the last token.

    Returns:
        y [b, l, h, p] in x.dtype, and if asked the final state [b, h, p, n] in the compute
        dtype (float32, or float64 for float64 inputs). Differentiable by autograd.

    Algorithm: per chunk, the output from in-chunk tokens is a masked quadratic form
    (C B^T * exp(segsum(dt A))) @ (dt x); each chunk's end state is accumulated, passed from
    chunk to chunk with the chunk's total decay, and read out by C with in-chunk decay.
    """
    _check_shapes(x, dt, A, B, C)
    b, seqlen, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g  # heads per group
    cdt = _compute_dtype(x)
    xc, Bc, Cc = x.to(cdt), B.to(cdt), C.to(cdt)
    dtc = _process_dt(dt.to(cdt), dt_bias, dt_softplus, dt_limit)  # [b, l, h]

    L = int(chunk_size)
    pad = (-seqlen) % L
    nc = (seqlen + pad) // L
    xdt, dA = xc * dtc[..., None], dtc * A.to(cdt)
    Bp, Cp = Bc, Cc
    if pad:  # padded tokens get dt = 0: decay 1 and no input, so y and states are unchanged
        xdt, Bp, Cp = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (xdt, Bp, Cp))
        dA = F.pad(dA, (0, 0, 0, pad))

    # Layout with heads split as (g, r): B/C are shared by the r heads of their group.
    xdt = xdt.view(b, nc, L, g, r, p).permute(0, 3, 4, 1, 2, 5).contiguous()  # [b,g,r,c,L,p]
    dA = dA.view(b, nc, L, g, r).permute(0, 3, 4, 1, 2).contiguous()  # [b, g, r, c, L]
    Bp = Bp.view(b, nc, L, g, n).permute(0, 3, 1, 2, 4)  # [b, g, c, L, n]
    Cp = Cp.view(b, nc, L, g, n).permute(0, 3, 1, 2, 4)  # [b, g, c, L, n]
    dA_cs = dA.cumsum(dim=-1)  # [b, g, r, c, L]

    # 1) intra-chunk (diagonal blocks): y_i += sum_{j<=i} C_i.B_j exp(sum_{j<k<=i} dA_k) xdt_j
    #    built transposed ([j, i]); the causal mask is applied once per group, on B C^T.
    causal_t = torch.ones(L, L, dtype=torch.bool, device=x.device).triu()  # [j, i]: i >= j
    scores_t = (Bp @ Cp.transpose(-1, -2)).masked_fill(~causal_t, 0.0)  # [b, g, c, L, L]
    weights_t = scores_t.unsqueeze(2) * _segsum_exp_t(dA)  # [b, g, r, c, L(j), L(i)]
    y = weights_t.transpose(-1, -2) @ xdt  # [b, g, r, c, L, p]

    # 2) each chunk's own contribution to the state at its end. (The einsums fold the r heads
    #    into the matmul instead of materialising r copies of B / C.)
    decay_to_end = torch.exp(dA_cs[..., -1:] - dA_cs)  # [b, g, r, c, L], exponents <= 0
    xdt_to_end = xdt * decay_to_end[..., None]
    chunk_states = torch.einsum("bgrclp,bgcln->bgrcpn", xdt_to_end, Bp)  # [b, g, r, c, p, n]

    # 3) pass states across chunks (O(c) loop; the state entering chunk k is stored)
    chunk_decay = torch.exp(dA_cs[..., -1])  # [b, g, r, c]
    if initial_states is None:
        state = xdt.new_zeros(b, g, r, p, n)
    else:
        state = initial_states.to(cdt).reshape(b, g, r, p, n)
    entering = []
    for k in range(nc):
        entering.append(state)
        state = state * chunk_decay[..., k, None, None] + chunk_states[:, :, :, k]
    prev_states = torch.stack(entering, dim=3)  # [b, g, r, c, p, n]

    # 4) read out incoming states: y_i += exp(dA_cs_i) C_i . state_in
    y_in = torch.einsum("bgcln,bgrcpn->bgrclp", Cp, prev_states)  # [b, g, r, c, L, p]
    y = y + y_in * torch.exp(dA_cs)[..., None]

    y = y.permute(0, 3, 4, 1, 2, 5).reshape(b, nc * L, h, p)[:, :seqlen]
    y = _skip_and_gate(y, xc, D, z).to(x.dtype)
    if return_final_states:
        return y, state.reshape(b, h, p, n)
    return y


def ssd_sequential_reference(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int | None = None,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    *,
    dt_softplus: bool = False,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
    dt_limit: DtLimit = (0.0, float("inf")),
) -> Tensor | tuple[Tensor, Tensor]:
    """Token-by-token recurrence; same arguments/returns as :func:`ssd_chunk_scan`
    (``chunk_size`` is ignored). Slow; the ground truth for tests."""
    _check_shapes(x, dt, A, B, C)
    b, seqlen, h, p = x.shape
    r = h // B.shape[2]
    cdt = _compute_dtype(x)
    xc, Ac = x.to(cdt), A.to(cdt)
    dtc = _process_dt(dt.to(cdt), dt_bias, dt_softplus, dt_limit)
    Bh = B.to(cdt).repeat_interleave(r, dim=2)  # [b, l, h, n]
    Ch = C.to(cdt).repeat_interleave(r, dim=2)
    n = B.shape[3]
    state = xc.new_zeros(b, h, p, n) if initial_states is None else initial_states.to(cdt)
    ys = []
    for t in range(seqlen):
        state, y_t = _recurrence_step(state, xc[:, t], dtc[:, t], Ac, Bh[:, t], Ch[:, t])
        ys.append(y_t)
    y = torch.stack(ys, dim=1) if ys else xc.new_zeros(b, 0, h, p)
    y = _skip_and_gate(y, xc, D, z).to(x.dtype)
    if return_final_states:
        return y, state
    return y


def ssd_step(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: DtLimit = (0.0, float("inf")),
) -> Tensor:
    """One-token decode step. **Updates ``state`` in place** (like mamba_ssm's
    ``selective_state_update``) and returns y.

    Args:
        state: [b, h, p, n] SSM state (keep it float32; math runs in float32 or float64).
        x: [b, h, p]; dt: [b, h]; A: [h]; B, C: [b, g, n]; D: [h] or [h, p];
        z: [b, h, p]; dt_bias: [h]; dt_softplus / dt_limit as in :func:`ssd_chunk_scan`.

    Returns:
        y [b, h, p] in x.dtype.
    """
    r = x.shape[1] // B.shape[1]
    cdt = torch.promote_types(_compute_dtype(x), state.dtype)
    xc = x.to(cdt)
    dtc = _process_dt(dt.to(cdt), dt_bias, dt_softplus, dt_limit)
    Bh = B.to(cdt).repeat_interleave(r, dim=1)
    Ch = C.to(cdt).repeat_interleave(r, dim=1)
    new_state, y = _recurrence_step(state.to(cdt), xc, dtc, A.to(cdt), Bh, Ch)
    state.copy_(new_state)
    return _skip_and_gate(y, xc, D, z).to(x.dtype)


# --------------------------------------------------------------------------- dispatch


@functools.cache
def mamba_backend_available() -> bool:
    """True if mamba_ssm's Triton SSD kernel and causal_conv1d import cleanly."""
    try:
        import causal_conv1d  # noqa: F401
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError or odd Triton/CUDA errors on CPU hosts
        return False
    return True


def select_ssd_impl(backend: str = "auto") -> Callable[..., object]:
    """Return the chunked-scan callable for ``backend``.

    "torch": :func:`ssd_chunk_scan`. "mamba_ssm": ``mamba_chunk_scan_combined`` (RuntimeError
    if not importable). "auto": mamba_ssm for CUDA inputs when importable, else torch; when
    mamba_ssm is unavailable this is exactly :func:`ssd_chunk_scan`.
    """
    if backend == "torch":
        return ssd_chunk_scan
    if backend not in ("auto", "mamba_ssm"):
        raise ValueError(f"unknown SSD backend {backend!r}; use 'auto', 'torch' or 'mamba_ssm'")
    if not mamba_backend_available():
        if backend == "auto":
            return ssd_chunk_scan
        raise RuntimeError(
            "SSD backend 'mamba_ssm' requested but the 'mamba_ssm' / 'causal_conv1d' packages "
            "cannot be imported. Install them (`pip install mamba-ssm causal-conv1d`, needs a "
            "CUDA build) or set the SSD backend to 'torch'."
        )
    try:  # (try/except keeps the optional import out of transformers' remote-code check)
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError as e:  # pragma: no cover - mamba_backend_available() checked it
        raise RuntimeError("mamba_ssm became unavailable") from e

    if backend == "mamba_ssm":
        return mamba_chunk_scan_combined

    def _auto(x: Tensor, *args: object, **kwargs: object) -> object:
        impl = mamba_chunk_scan_combined if x.is_cuda else ssd_chunk_scan
        return impl(x, *args, **kwargs)

    return _auto

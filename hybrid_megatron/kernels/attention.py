"""Causal attention core: full causal, sliding-window (SWA) and GQA, with backend dispatch.

Layout
    ``q`` is ``[b, hq, sq, d]``, ``k`` and ``v`` are ``[b, hkv, sk, d]`` with ``hq % hkv == 0``
    (grouped-query attention; query head ``h`` reads kv head ``h // (hq // hkv)``). The output is
    ``[b, hq, sq, d]``. Attention is always causal. ``sq <= sk`` is allowed: the queries are the
    *last* ``sq`` positions of the key sequence (bottom-right aligned causal mask), as needed by a
    KV-cached decoder (``sq == 1``). Query row ``r`` therefore sits at absolute position
    ``i = r + (sk - sq)``.

Window semantics
    ``window=W`` means a query at absolute position ``i`` sees the keys ``j`` with
    ``i - W < j <= i``: exactly ``W`` positions *including the current token* (``W=1`` attends
    only to itself). ``window=None`` is full causal attention; any ``W >= sk`` is equivalent to
    it and is treated as such. In flash-attn / Transformer Engine / Megatron-Core terms this is
    ``window_size=(W - 1, 0)``, see :func:`to_left_right_window`.

Backends
    ``sdpa``        ``torch.nn.functional.scaled_dot_product_attention``; ``is_causal`` for
                    square full-causal calls, otherwise an explicit (cached) boolean mask.
    ``flex``        ``torch.nn.attention.flex_attention`` with a block-sparse mask built
                    analytically (O((n / 128) * (W / 128)) blocks, no dense n x n mask is ever
                    evaluated), so SWA costs O(n * W). ``torch.compile``-d lazily; every new
                    (shape, window) compiles once (~5-20 s on CPU). Set
                    ``HYBRID_MEGATRON_FLEX_EAGER=1`` (or pass ``flex_eager=True``) for the
                    uncompiled, dense reference path when debugging. PyTorch's flex has no
                    CPU backward, so on CPU gradients come from a banded, chunked SDPA
                    recomputation (also O(n * W)); on CUDA flex's own backward is used.
    ``flash_attn``  ``flash_attn_func`` (CUDA, fp16/bf16 only).
    ``te``          Transformer Engine; only reported here. TE attention is wired through
                    Megatron-Core's ``TEDotProductAttention`` at the model-spec level.
    ``auto``        flash_attn if usable (CUDA, fp16/bf16), else flex for SWA when
                    ``sq == sk >= max(FLEX_MIN_SEQ_LEN, FLEX_MIN_SEQ_PER_WINDOW * W)``, else sdpa.

Padding
    ``key_padding_mask`` (``[b, sk]``, True = a real key) hides padded keys, as batched
    generation of left-padded prompts needs; such calls run on SDPA with an explicit mask
    whatever the backend. A query that sees no real key (a padding position itself) attends to
    its own position so its row stays finite; its output is meaningless and must be ignored.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "BACKENDS",
    "FLEX_MIN_SEQ_LEN",
    "FLEX_MIN_SEQ_PER_WINDOW",
    "FLEX_COMPILED_DTYPES",
    "attention",
    "available_backends",
    "resolve_backend",
    "sdpa_mask",
    "to_left_right_window",
]

BACKENDS = ("auto", "sdpa", "flex", "flash_attn", "te")

# Under "auto" (no usable flash-attn), SWA runs on compiled flex instead of masked SDPA once
# sk >= max(FLEX_MIN_SEQ_LEN, FLEX_MIN_SEQ_PER_WINDOW * W). Measured here (CPU, 2 cores, torch
# 2.13, fp32 fwd, b=1, 8 heads, d=64, median of 9), sdpa/flex time ratio:
#   W=128:  0.53 @256, 1.01 @512, 1.89 @1K, 2.84 @2K, 6.15 @4K (bench_attention.py: 16-27 @16K)
#   W=1024: 0.81 @1.5K, 0.93 @2K, 1.40 @3K, 1.75 @4K, 3.11 @8K
# i.e. flex wins once sk is ~2-3x the window. 2048 adds margin for the one-off flex compile per
# shape (~5-20 s on CPU) and keeps short runs and tests on SDPA; beyond it masked SDPA is
# O(sk^2) in time and memory (the dense mask alone is sk^2 bytes) while flex is O(sk * W).
FLEX_MIN_SEQ_LEN = 2048
FLEX_MIN_SEQ_PER_WINDOW = 2

FLEX_BLOCK_SIZE = 128
FLEX_EAGER_ENV = "HYBRID_MEGATRON_FLEX_EAGER"
_MASK_CACHE_SIZE = 8
_CPU_BWD_CHUNK = 256  # query rows per step of the CPU flex backward
_PADDED_CHUNK = 256  # query rows per step of padded (batched-generation) attention

_PACKAGES = {
    "flex": "torch.nn.attention.flex_attention",
    "flash_attn": "flash_attn",
    "te": "transformer_engine",
}
_INSTALL_HINTS = {
    "flex": "upgrade PyTorch to >= 2.5",
    "flash_attn": "install the flash-attn extra (`pip install flash-attn --no-build-isolation`)",
    "te": "install the Transformer Engine extra (`pip install transformer_engine[pytorch]`)",
}


def to_left_right_window(window: int | None) -> tuple[int, int]:
    """Convert ``window=W`` (W keys including the current one) to flash-attn's ``(left, right)``.

    ``W -> (W - 1, 0)``; ``None`` (full causal) -> ``(-1, 0)`` (unbounded left context).
    """
    window = _check_window(window)
    return (-1, 0) if window is None else (window - 1, 0)


def _check_window(window: Any) -> int | None:
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    return window


@functools.cache
def _importable(backend: str) -> bool:
    if backend == "sdpa":
        return hasattr(F, "scaled_dot_product_attention")
    try:
        module = importlib.import_module(_PACKAGES[backend])
    except Exception:  # broken installs (missing CUDA libs, ABI mismatch) count as unavailable
        return False
    return backend != "flash_attn" or hasattr(module, "flash_attn_func")


def available_backends() -> dict[str, bool]:
    """Which concrete backends can be imported in this environment ("auto" is always True)."""
    return {"auto": True, **{name: _importable(name) for name in BACKENDS[1:]}}


def _unavailable(backend: str) -> RuntimeError:
    return RuntimeError(
        f"attention backend {backend!r} requested but package {_PACKAGES[backend]!r} is not "
        f"importable; {_INSTALL_HINTS[backend]}, or set `attention_backend: sdpa` in the config."
    )


def _flash_ok(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


# Dtypes compiled flex_attention lowers (Inductor refuses float64 on CPU: InductorError).
FLEX_COMPILED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_flex_dtype(dtype: torch.dtype, eager: bool) -> None:
    if not eager and dtype not in FLEX_COMPILED_DTYPES:
        raise ValueError(
            f"attention backend 'flex' (compiled flex_attention) does not support {dtype}; "
            "supported: float32, float16, bfloat16. Use backend 'sdpa' or 'auto' for this dtype "
            "(or HYBRID_MEGATRON_FLEX_EAGER=1 for the slow uncompiled reference)."
        )


def resolve_backend(
    backend: str,
    *,
    device: torch.device,
    window: int | None,
    seq_len: int,
    dtype: torch.dtype,
    q_len: int | None = None,
) -> str:
    """Return the concrete backend ``attention`` would use; raise if an explicit one can't run.

    ``seq_len`` is the key length ``sk``; ``q_len`` (default: ``seq_len``) the query length.
    Under "auto" flex is only chosen for ``q_len == seq_len``: with a KV cache the key length
    grows every step, and each new shape would mean another flex compilation.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    window = _check_window(window)
    device = torch.device(device)
    avail = available_backends()
    if backend == "auto":
        if avail["flash_attn"] and _flash_ok(device, dtype):
            return "flash_attn"
        square = q_len is None or q_len == seq_len
        if (
            avail["flex"]
            and window is not None
            and square
            and dtype in FLEX_COMPILED_DTYPES
            and seq_len >= max(FLEX_MIN_SEQ_LEN, FLEX_MIN_SEQ_PER_WINDOW * window)
        ):
            return "flex"
        return "sdpa"
    if not avail[backend]:
        raise _unavailable(backend)
    if backend == "flash_attn" and not _flash_ok(device, dtype):
        raise RuntimeError(
            f"attention backend 'flash_attn' needs CUDA fp16/bf16 tensors, got device={device}, "
            f"dtype={dtype}; use backend 'auto', 'sdpa' or 'flex' instead."
        )
    return backend


def _check_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected 4-D [b, h, s, d] tensors, got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    (b, hq, sq, d), (bk, hkv, sk, dk) = q.shape, k.shape
    if b != bk or d != dk:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head dim")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    if sq > sk:
        raise ValueError(f"query length ({sq}) must not exceed key length ({sk})")


# --------------------------------------------------------------------------------------- SDPA
def _band_mask(
    q_start: int, q_len: int, k_start: int, k_len: int, window: int | None, device: torch.device
) -> Tensor:
    """Boolean mask (True = attend) for query / key absolute positions from the given starts."""
    i = torch.arange(q_start, q_start + q_len, device=device).unsqueeze(1)
    j = torch.arange(k_start, k_start + k_len, device=device).unsqueeze(0)
    mask = j <= i
    if window is not None:
        mask &= j > i - window
    return mask


@functools.lru_cache(maxsize=_MASK_CACHE_SIZE)
def sdpa_mask(sq: int, sk: int, window: int | None, device: torch.device) -> Tensor:
    """Cached boolean ``[sq, sk]`` mask (True = attend): bottom-right causal, optionally SWA."""
    return _band_mask(sk - sq, sq, 0, sk, window, device)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, window: int | None, scale: float | None) -> Tensor:
    sq, sk = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if window is None and sq == sk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = sdpa_mask(sq, sk, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _sdpa_padded(
    q: Tensor, k: Tensor, v: Tensor, window: int | None, scale: float | None, keys: Tensor
) -> Tensor:
    """SDPA where `keys` [b, sk] (True = real) hides padded keys (see "Padding" above).

    Long query blocks run in chunks of `_PADDED_CHUNK` queries, each over only the keys its
    band can see (from the window start, or 0, to its last query): O(sq * (chunk + W)) for
    SWA and half the dense work for causal attention, where one dense [b, sq, sk] mask would
    cost O(sq * sk) in time and memory (a decode step, sq = 1, is a single chunk).
    """
    sq, sk = q.shape[-2], k.shape[-2]
    offset, gqa = sk - sq, q.shape[1] != k.shape[1]
    keys = keys.to(q.device)
    outs = []
    for r0 in range(0, sq, _PADDED_CHUNK):
        r1 = min(r0 + _PADDED_CHUNK, sq)
        k0 = 0 if window is None else max(0, r0 + offset - window + 1)
        k1 = r1 + offset
        allowed = _band_mask(r0 + offset, r1 - r0, k0, k1 - k0, window, q.device)
        allowed = allowed & keys[:, None, None, k0:k1]
        rows = torch.arange(r1 - r0, device=q.device)
        allowed[..., rows, rows + (r0 + offset - k0)] = True  # each query sees itself: no empty row
        outs.append(
            F.scaled_dot_product_attention(
                q[:, :, r0:r1],
                k[:, :, k0:k1],
                v[:, :, k0:k1],
                attn_mask=allowed,
                scale=scale,
                enable_gqa=gqa,
            )  # fmt: skip
        )
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


# --------------------------------------------------------------------------------------- flex
def _flex_mask_mod(offset: int, window: int | None) -> Callable[..., Tensor]:
    if window is None:

        def causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return kv_idx <= q_idx + offset

        return causal

    def sliding_window(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        i = q_idx + offset
        return (kv_idx <= i) & (kv_idx > i - window)

    return sliding_window


@functools.lru_cache(maxsize=_MASK_CACHE_SIZE)
def flex_block_mask(sq: int, sk: int, window: int | None, device: torch.device) -> Any:
    """Block-sparse mask for flex_attention, computed per 128x128 tile without a dense mask.

    A tile is skipped when no (query, key) pair in it is visible, "full" (no mask_mod call) when
    it lies completely inside the sequence and every pair is visible, otherwise partial.
    """
    from torch.nn.attention.flex_attention import BlockMask

    bs, offset = FLEX_BLOCK_SIZE, sk - sq
    w = sk + 1 if window is None else window  # an unbounded window, expressed as a number
    q_start = torch.arange(0, sq, bs, device=device)
    q_end = torch.clamp(q_start + bs, max=sq) - 1
    k_start = torch.arange(0, sk, bs, device=device)
    k_end = torch.clamp(k_start + bs, max=sk) - 1
    a0, a1 = (q_start + offset)[:, None], (q_end + offset)[:, None]  # absolute query positions
    ks, ke = k_start[None, :], k_end[None, :]
    visible = (ks <= a1) & (ke > a0 - w)
    complete = ((q_end - q_start + 1) == bs)[:, None] & ((k_end - k_start + 1) == bs)[None, :]
    full = complete & (ke <= a0) & (ks > a1 - w)
    partial = visible & ~full

    def to_indices(sel: Tensor) -> tuple[Tensor, Tensor]:
        num = sel.sum(-1, dtype=torch.int32)
        idx = torch.argsort(sel.to(torch.int8), dim=-1, descending=True, stable=True)
        return num[None, None], idx.to(torch.int32)[None, None]

    kv_num, kv_idx = to_indices(partial)
    full_num, full_idx = to_indices(full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=bs,
        mask_mod=_flex_mask_mod(offset, window),
        seq_lengths=(sq, sk),
    )


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_eager_env() -> bool:
    return os.environ.get(FLEX_EAGER_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _flex_forward(
    q: Tensor, k: Tensor, v: Tensor, window: int | None, scale: float | None, eager: bool
) -> Tensor:
    block_mask = flex_block_mask(q.shape[-2], k.shape[-2], window, q.device)
    gqa = q.shape[1] != k.shape[1]
    if not eager:
        return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():  # the "unfused implementation" warning is the point here
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)


def _banded_grads(
    q: Tensor, k: Tensor, v: Tensor, dout: Tensor, window: int | None, scale: float | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Attention gradients by chunked recomputation; each query chunk only reads its key band.

    O(sq * (chunk + W)) time for SWA, O(chunk * (chunk + W)) extra memory per step.
    """
    sq, sk = q.shape[-2], k.shape[-2]
    offset, gqa = sk - sq, q.shape[1] != k.shape[1]
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for r0 in range(0, sq, _CPU_BWD_CHUNK):
        r1 = min(r0 + _CPU_BWD_CHUNK, sq)
        k0 = 0 if window is None else max(0, r0 + offset - window + 1)
        k1 = r1 + offset
        mask = _band_mask(r0 + offset, r1 - r0, k0, k1 - k0, window, q.device)
        with torch.enable_grad():
            qc = q[:, :, r0:r1].detach().requires_grad_()
            kc = k[:, :, k0:k1].detach().requires_grad_()
            vc = v[:, :, k0:k1].detach().requires_grad_()
            out = F.scaled_dot_product_attention(
                qc, kc, vc, attn_mask=mask, scale=scale, enable_gqa=gqa
            )
            gq, gk, gv = torch.autograd.grad(out, (qc, kc, vc), dout[:, :, r0:r1])
        dq[:, :, r0:r1] = gq
        dk[:, :, k0:k1] += gk
        dv[:, :, k0:k1] += gv
    return dq, dk, dv


class _FlexWithCPUGrad(torch.autograd.Function):
    """Flex forward; backward by banded recomputation (PyTorch's flex has no CPU backward)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        window: int | None,
        scale: float | None,
        eager: bool,
    ) -> Tensor:
        ctx.save_for_backward(q, k, v)
        ctx.window, ctx.scale = window, scale
        return _flex_forward(q.detach(), k.detach(), v.detach(), window, scale, eager)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        q, k, v = ctx.saved_tensors
        return (*_banded_grads(q, k, v, dout, ctx.window, ctx.scale), None, None, None)


def _flex(
    q: Tensor, k: Tensor, v: Tensor, window: int | None, scale: float | None, eager: bool
) -> Tensor:
    if q.device.type == "cpu" and any(t.requires_grad for t in (q, k, v)):
        if torch.is_grad_enabled():
            return _FlexWithCPUGrad.apply(q, k, v, window, scale, eager)
        q, k, v = q.detach(), k.detach(), v.detach()  # flex refuses requires_grad CPU inputs
    return _flex_forward(q, k, v, window, scale, eager)


# --------------------------------------------------------------------------------- flash_attn
def _flash(q: Tensor, k: Tensor, v: Tensor, window: int | None, scale: float | None) -> Tensor:
    # try/except keeps this optional import out of transformers' remote-code import check.
    try:
        from flash_attn import flash_attn_func
    except ImportError as e:
        raise _unavailable("flash_attn") from e

    kwargs: dict[str, Any] = {"softmax_scale": scale, "causal": True}
    if window is not None:  # omitted otherwise, so flash-attn < 2.3 still works for full causal
        kwargs["window_size"] = to_left_right_window(window)
    # flash-attn wants [b, s, h, d]; GQA and bottom-right causal alignment are native.
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kwargs)
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------------- public
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int | None = None,
    backend: str = "auto",
    softmax_scale: float | None = None,
    flex_eager: bool | None = None,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Causal (optionally sliding-window) attention; see the module docstring for semantics.

    ``softmax_scale`` defaults to ``1 / sqrt(d)``. ``flex_eager`` forces (True) or forbids
    (False) the uncompiled flex path; ``None`` reads ``HYBRID_MEGATRON_FLEX_EAGER``.
    ``key_padding_mask`` ([b, sk] bool, True = real key) hides padded keys (SDPA path).
    """
    window = _check_window(window)
    _check_shapes(q, k, v)
    sq, sk = q.shape[-2], k.shape[-2]
    if window is not None and window >= sk:
        window = None  # every visible key is within the window: plain causal attention
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (q.shape[0], sk):
            raise ValueError(
                f"key_padding_mask must be [batch, key length] = {[q.shape[0], sk]}, got "
                f"{list(key_padding_mask.shape)}"
            )
        if not bool(key_padding_mask.all()):
            return _sdpa_padded(q, k, v, window, softmax_scale, key_padding_mask.bool())
    name = resolve_backend(
        backend, device=q.device, window=window, seq_len=sk, dtype=q.dtype, q_len=sq
    )
    if name == "sdpa":
        return _sdpa(q, k, v, window, softmax_scale)
    if name == "flex":
        eager = _flex_eager_env() if flex_eager is None else flex_eager
        _check_flex_dtype(q.dtype, eager)
        return _flex(q, k, v, window, softmax_scale, eager)
    if name == "flash_attn":
        return _flash(q, k, v, window, softmax_scale)
    raise RuntimeError(
        "backend 'te' cannot be called through hybrid_megatron.kernels.attention.attention(): "
        "Transformer Engine attention is selected at the model-spec level (Megatron-Core "
        "TEDotProductAttention). Use 'auto', 'sdpa', 'flex' or 'flash_attn' here."
    )

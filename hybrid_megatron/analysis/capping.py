"""Receptive-field capping of chosen layers of a HybridMegatron HF model at inference.

    with capped(model, layers, k=256, sinks=4):
        loss = token_losses(model, ids)          # or model.generate(...)

- attention layers: a query sees at most the last `k` keys (itself included), i.e. the
  layer's window becomes min(window, k); full-attention layers additionally keep the first
  `sinks` tokens visible (attention sinks). The model's own kernels run the windowed case;
  sinks use an explicit masked softmax. Cached decoding is capped the same way.
- Mamba-2 layers: the conv and SSM states are reset every `k` tokens (positions 0, k,
  2k, ...), so a position sees between 1 and k tokens of that layer's input; `sinks` do
  not apply.

A cap that removes nothing (k at least the number of keys a call sees, or the sequence
length for Mamba) runs the unchanged code path, so its outputs equal the uncapped ones
exactly. Batches must be unpadded (analysis runs one sequence at a time).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from hybrid_megatron.errors import ConfigError

Tensor = torch.Tensor
ATTENTION = ("full_attention", "sliding_attention")
MAMBA = "mamba"
QUERY_CHUNK = 1024  # queries per masked-softmax block of the sink path


class CappedWindow(int):
    """An attention layer's window while capped: int(cap) is the cap itself; the original
    window and the sink count ride along for the patched kernels."""

    original: int | None
    sinks: int

    def __new__(cls, cap: int, original: int | None, sinks: int) -> CappedWindow:
        obj = super().__new__(cls, cap)
        obj.original, obj.sinks = original, sinks
        return obj


def sink_mask(sq: int, sk: int, cap: int, sinks: int, device: torch.device) -> Tensor:
    """[sq, sk] bool: the last sq of sk positions see the last `cap` keys and the first
    `sinks` keys (causally)."""
    i = torch.arange(sk - sq, sk, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return (j <= i) & ((j > i - cap) | (j < sinks))


def sink_attention(
    q: Tensor, k: Tensor, v: Tensor, cap: int, sinks: int, keys: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Explicit GQA attention under `sink_mask` (blocks of queries); (out [b, h, sq, d],
    probabilities [b, h, sq, sk] when the queries fit one block, else None)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    sq, sk = q.shape[2], k.shape[2]
    mask = sink_mask(sq, sk, cap, sinks, q.device)
    if keys is not None:
        rows = torch.arange(sq, device=q.device)
        mask = mask[None] & keys[:, None, :]
        mask[:, rows, rows + sk - sq] = True
        mask = mask[:, None]
    outs, probs = [], []
    for a in range(0, sq, QUERY_CHUNK):
        m = mask[..., a : a + QUERY_CHUNK, :]
        scores = (q[:, :, a : a + QUERY_CHUNK] @ k.transpose(-1, -2)).float()
        p = (scores / math.sqrt(q.shape[-1])).masked_fill(~m, float("-inf")).softmax(-1)
        p = p.to(q.dtype)
        outs.append(p @ v)
        probs.append(p)
    return torch.cat(outs, dim=2), probs[0] if len(probs) == 1 else None


def _patched_kernels(module: Any) -> tuple[Any, Any]:
    """Dispatchers for the modeling module's `attention_kernel` and `eager_attention`."""
    kernel, eager = module.attention_kernel, module.eager_attention

    def _effective(window: Any, sk: int) -> tuple[int | None, int]:
        """(window to use, sinks) for a call seeing sk keys."""
        visible = sk if window.original is None else min(window.original, sk)
        if int(window) >= visible:
            return window.original, 0  # the cap removes nothing: the layer's own path
        sinks = window.sinks if window.original is None else 0
        return int(window), sinks

    def attention_kernel(q, k, v, *, window=None, key_padding_mask=None, **kw):
        if not isinstance(window, CappedWindow):
            return kernel(q, k, v, window=window, key_padding_mask=key_padding_mask, **kw)
        w, sinks = _effective(window, k.shape[2])
        if not sinks:
            return kernel(q, k, v, window=w, key_padding_mask=key_padding_mask, **kw)
        return sink_attention(q, k, v, w, sinks, key_padding_mask)[0]

    def eager_attention(q, k, v, window, keys=None):
        if not isinstance(window, CappedWindow):
            return eager(q, k, v, window, keys)
        w, sinks = _effective(window, k.shape[2])
        if not sinks:
            return eager(q, k, v, w, keys)
        out, probs = sink_attention(q, k, v, w, sinks, keys)
        if probs is None:
            raise ValueError(
                f"attention weights of more than {QUERY_CHUNK} queries with sink tokens are not "
                "materialised; feed fewer queries at once"
            )
        return out, probs

    return attention_kernel, eager_attention


def _mamba_forward(mixer: Any, k: int) -> Any:
    """A mixer forward whose states restart from zero at positions 0, k, 2k, ..."""
    original = mixer.forward

    def forward(hidden: Tensor, state: Any, padding: Any) -> Tensor:
        if getattr(padding, "tokens", None) is not None:
            raise ValueError("capped Mamba layers take unpadded batches (one sequence at a time)")
        if state is None:
            if hidden.shape[1] <= k:
                return original(hidden, None, padding)
            pieces = [
                original(hidden[:, a : a + k], None, padding) for a in range(0, hidden.shape[1], k)
            ]
            return torch.cat(pieces, dim=1)
        outs, a = [], 0
        while a < hidden.shape[1]:
            pos = getattr(state, "_capped_pos", 0)
            if pos and pos % k == 0:
                state.reset()
            take = min(hidden.shape[1] - a, k - pos % k)
            outs.append(original(hidden[:, a : a + take], state, padding))
            state._capped_pos = pos + take
            a += take
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    return forward


def layer_types(model: Any) -> list[str]:
    """The model's layer types; refuses models that are not HybridMegatron."""
    config = model.config
    if getattr(config, "model_type", None) != "hybrid_megatron":
        raise ConfigError(
            f"capping works on HybridMegatron models; {type(model).__name__} is not one "
            "(convert Megatron checkpoints with `hybrid-megatron convert` or pass a run dir)."
        )
    return list(config.layer_types)


def select_layers(model: Any, target: str) -> list[int]:
    """Layers of `target`: 'full' (full attention), 'efficient' (sliding-window attention and
    Mamba-2) or a comma list of layer indices (attention or Mamba layers)."""
    types = layer_types(model)
    if target == "full":
        chosen = [i for i, t in enumerate(types) if t == "full_attention"]
    elif target == "efficient":
        chosen = [i for i, t in enumerate(types) if t in ("sliding_attention", MAMBA)]
    else:
        try:
            chosen = sorted({int(x) for x in target.split(",") if x.strip()})
        except ValueError:
            raise ConfigError(
                f"--target {target!r}: use 'full', 'efficient' or layer indices like '3,7'"
            ) from None
        bad = [i for i in chosen if not 0 <= i < len(types) or types[i] not in (*ATTENTION, MAMBA)]
        if bad or not chosen:
            kinds = {i: t for i, t in enumerate(types) if t in (*ATTENTION, MAMBA)}
            raise ConfigError(
                f"--target {target!r}: layers {bad or chosen} are not attention or Mamba layers; "
                f"this model's are {kinds}"
            )
    if not chosen:
        raise ConfigError(f"--target {target}: this model has no such layers ({types})")
    return chosen


@contextlib.contextmanager
def capped(model: Any, layers: Sequence[int], k: int, sinks: int = 0) -> Iterator[None]:
    """Cap `layers` of `model` to `k` tokens (+ `sinks` on full attention) inside the block."""
    if k < 1 or sinks < 0:
        raise ConfigError(f"capping needs k >= 1 and sinks >= 0 (got k={k}, sinks={sinks})")
    types = layer_types(model)
    decoder_layers = model.model.layers
    attn_modules = [decoder_layers[i].self_attn for i in layers if types[i] in ATTENTION]
    mixers = [decoder_layers[i].mixer for i in layers if types[i] == MAMBA]
    modeling = sys.modules[type(model).__module__]
    saved_kernels = (modeling.attention_kernel, modeling.eager_attention)
    saved_windows = [a.window for a in attn_modules]
    try:
        if attn_modules:
            modeling.attention_kernel, modeling.eager_attention = _patched_kernels(modeling)
        for a in attn_modules:
            a.window = CappedWindow(k, a.window, sinks)
        for m in mixers:
            m.forward = _mamba_forward(m, k)
        yield
    finally:
        modeling.attention_kernel, modeling.eager_attention = saved_kernels
        for a, w in zip(attn_modules, saved_windows, strict=True):
            a.window = w
        for m in mixers:
            m.__dict__.pop("forward", None)

"""Attention weights of chosen query positions, from any attention layer of a causal LM.

Full `output_attentions` forwards materialise [heads, n, n] per layer; at long prompts that
is far too much memory, and only a few query rows are needed. `AttentionProbe` instead
prefills the context with the model's fast kernel into a cache and then feeds the probed
tokens with eager attention and `output_attentions=True`: each attention layer returns
[heads, queries, keys] for those queries only, over exactly the keys it can see (all of
them for full attention, the last `window` for sliding-window layers). `attend` returns
them placed at absolute key positions (zeros outside a layer's window).

Works for HybridMegatron models (attention layers from `config.layer_types`) and for other
transformers causal LMs whose every layer is attention (Llama-style), batch size 1.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

Tensor = torch.Tensor
FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclass(frozen=True)
class AttentionLayout:
    """Which layers are attention layers, their kind and window, and the head counts."""

    layers: tuple[int, ...]  # model layer indices of the attention layers, in order
    kinds: tuple[str, ...]  # FULL or SLIDING per attention layer
    windows: tuple[int | None, ...]  # keys a query sees (itself included); None = all
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def window_of(self, layer: int) -> int | None:
        return self.windows[self.layers.index(layer)]

    def kind_of(self, layer: int) -> str:
        return self.kinds[self.layers.index(layer)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "attention_layers": list(self.layers),
            "kinds": list(self.kinds),
            "windows": list(self.windows),
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
        }


def attention_layout(model: Any) -> AttentionLayout:
    """The attention layers of `model` (a HybridMegatron or Llama-style causal LM)."""
    config = model.config
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    n = int(config.num_hidden_layers)
    if getattr(config, "model_type", None) == "hybrid_megatron":
        types = list(config.layer_types)
        layers = tuple(i for i, t in enumerate(types) if t in (FULL, SLIDING))
        kinds = tuple(types[i] for i in layers)
        windows = tuple(config.layer_window(i) for i in layers)
    else:
        window = getattr(config, "sliding_window", None)
        # no layer_types (Mistral-style): a configured window applies to every layer
        types = list(getattr(config, "layer_types", None) or [SLIDING if window else FULL] * n)
        layers = tuple(range(n))
        kinds = tuple(SLIDING if types[i] == SLIDING and window else FULL for i in layers)
        windows = tuple(window if k == SLIDING else None for k in kinds)
    return AttentionLayout(layers, kinds, windows, n, heads, kv, head_dim)


@contextlib.contextmanager
def eager_attention(model: Any) -> Iterator[None]:
    """Run `model` with eager attention (the only kind returning weights) inside the block."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = before


@dataclass
class ProbeStep:
    """One probed forward: logits of the fed tokens and attention rows per attention layer."""

    logits: Tensor  # [m, vocab] (float32, on CPU)
    attentions: dict[int, Tensor]  # layer -> [heads, m, n_total] at absolute key positions
    positions: Tensor  # [m] absolute positions of the fed (query) tokens


class AttentionProbe:
    """A cached pass over one sequence whose probed tokens return their attention rows.

    probe = AttentionProbe(model)
    probe.prefill(ids[:-2])            # fast kernel, no weights
    step = probe.attend(ids[-2:])      # eager: weights of these two queries
    """

    def __init__(self, model: Any, layout: AttentionLayout | None = None) -> None:
        self.model = model
        self.layout = layout or attention_layout(model)
        self.device = next(model.parameters()).device
        self.cache: Any = None
        self.seen = 0
        # transformers renamed the cache argument (`cache` from 5.24): use the model's own
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def _forward(self, ids: Tensor, output_attentions: bool) -> Any:
        ids = ids.reshape(1, -1).to(self.device)
        kwargs: dict[str, Any] = {"use_cache": True, "return_dict": True}
        if self.cache is not None:
            kwargs[self._cache_arg] = self.cache
        out = self.model(input_ids=ids, output_attentions=output_attentions, **kwargs)
        self.cache = getattr(out, "past_key_values", None)
        if self.cache is None:
            self.cache = getattr(out, "cache", None)
        self.seen += ids.shape[1]
        return out

    @torch.no_grad()
    def prefill(self, ids: Tensor) -> Tensor:
        """Feed `ids` (1-D) with the model's own kernel; return the last position's logits."""
        if ids.numel() == 0:
            raise ValueError("prefill needs at least one token")
        out = self._forward(ids, output_attentions=False)
        return out.logits[0, -1].float().cpu()

    @torch.no_grad()
    def attend(self, ids: Tensor) -> ProbeStep:
        """Feed `ids` (1-D) with eager attention; their attention rows at absolute positions."""
        m = int(ids.numel())
        with eager_attention(self.model):
            out = self._forward(ids, output_attentions=True)
        weights = [w for w in (out.attentions or ()) if w is not None]
        if len(weights) != len(self.layout.layers):
            raise RuntimeError(
                f"the model returned attention weights for {len(weights)} layers but has "
                f"{len(self.layout.layers)} attention layers"
            )
        total = self.seen
        rows: dict[int, Tensor] = {}
        for layer, w in zip(self.layout.layers, weights, strict=True):
            w = w[0, :, -m:].float().cpu()  # [heads, m, keys it saw]
            placed = torch.zeros(w.shape[0], m, total)
            placed[:, :, total - w.shape[-1] :] = w  # keys are the last w.shape[-1] positions
            rows[layer] = placed
        return ProbeStep(
            logits=out.logits[0, -m:].float().cpu(),
            attentions=rows,
            positions=torch.arange(total - m, total),
        )


def attention_rows(model: Any, ids: Tensor, queries: int) -> ProbeStep:
    """Attention of the last `queries` positions of `ids` (1-D), by prefill + eager probe."""
    n = int(ids.numel())
    if not 1 <= queries <= n:
        raise ValueError(f"queries must be in [1, {n}], got {queries}")
    probe = AttentionProbe(model)
    if n > queries:
        probe.prefill(ids[: n - queries])
    return probe.attend(ids[n - queries :])

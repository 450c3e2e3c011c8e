"""Generation cache of hybrid LMs, bounded wherever the layer type allows.

One state object per layer:

- full attention: key/value buffers that grow with the sequence (capacity doubling, so
  appending a token is amortised O(1) copies);
- sliding-window attention (window W): only the last W - 1 keys/values, the most any future
  token can see besides itself, whatever the prompt length;
- Mamba-2: the causal-conv state (last conv_kernel - 1 inputs) and the SSM state
  [batch, heads, head_dim, state_dim] (float32), constant size;
- MLP: nothing.

`HybridMegatronCache` subclasses transformers' `Cache` so `generate()` treats it as a cache,
but keeps its own per-layer states (transformers' layer classes change between versions).
Rolling back tokens (`crop`) is impossible for recurrent states and is refused.

transformers has handed the cache to models under different names over its versions
(`past_key_values` up to 5.23, `cache` from 5.24, `cache_params` for Mamba-style models):
`take_cache` accepts each of them and refuses what the model could not use, so a renamed
argument can never again silently start every decoding step from an empty cache.
This file is shipped next to converted weights (remote code).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache

from .configuration_hybrid_megatron import MAMBA, SLIDING_ATTENTION, HybridMegatronConfig

Tensor = torch.Tensor
_MIN_CAPACITY = 256


def _storage_bytes(*tensors: Tensor | None) -> int:
    """Bytes held by the storages behind `tensors` (views of a larger buffer count it all)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


class _LayerState:
    """Interface shared by the per-layer states (what `Cache`'s helpers read)."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False
    is_sliding = False

    def __init__(self) -> None:
        self.seen = 0  # tokens processed so far

    @property
    def is_initialized(self) -> bool:
        return self.seen > 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def tensors(self) -> list[Tensor]:
        return []

    def nbytes(self) -> int:
        return _storage_bytes(*self.tensors())

    def _apply(self, fn: Any) -> None:
        """Apply `fn` to every batch-major state tensor."""

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._apply(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        self.seen = 0

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(
            "HybridMegatronCache cannot drop tokens (Mamba and sliding-window states do not "
            "keep the past); use greedy/sampling/beam search, not assisted or contrastive decoding."
        )

    def offload(self) -> None:  # states stay where the model is
        pass

    def prefetch(self) -> None:
        pass


class AttentionState(_LayerState):
    """Keys/values of one attention layer: all of them, or the last `window - 1`."""

    def __init__(self, window: int | None) -> None:
        super().__init__()
        self.window = window
        self.is_sliding = window is not None
        self._k: Tensor | None = None  # [b, kv_heads, capacity, head_dim]
        self._v: Tensor | None = None
        self.length = 0  # valid positions in the buffers

    @property
    def keys(self) -> Tensor | None:
        return None if self._k is None else self._k[:, :, : self.length]

    @property
    def values(self) -> Tensor | None:
        return None if self._v is None else self._v[:, :, : self.length]

    def get_max_length(self) -> int:
        return -1 if self.window is None else self.window

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this step's k/v [b, kv_heads, s, d]; return all keys/values to attend to."""
        self.seen += k.shape[2]
        if self.window is not None:
            return self._update_window(k, v)
        return self._update_full(k, v)

    def _update_full(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        new_len = self.length + k.shape[2]
        if self._k is None or new_len > self._k.shape[2]:
            capacity = max(new_len, 2 * (0 if self._k is None else self._k.shape[2]), _MIN_CAPACITY)
            grown_k = k.new_empty(*k.shape[:2], capacity, k.shape[3])
            grown_v = v.new_empty(*v.shape[:2], capacity, v.shape[3])
            if self._k is not None:
                grown_k[:, :, : self.length] = self.keys
                grown_v[:, :, : self.length] = self.values
            self._k, self._v = grown_k, grown_v
        self._k[:, :, self.length : new_len] = k
        self._v[:, :, self.length : new_len] = v
        self.length = new_len
        return self.keys, self.values

    def _update_window(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self._k is not None and self.length:
            k = torch.cat([self._k, k], dim=2)
            v = torch.cat([self._v, v], dim=2)
        keep = min(self.window - 1, k.shape[2])
        # Copies, so a long prompt's keys are not kept alive behind a view.
        self._k = k[:, :, k.shape[2] - keep :].clone()
        self._v = v[:, :, v.shape[2] - keep :].clone()
        self.length = keep
        return k, v

    def tensors(self) -> list[Tensor]:
        return [t for t in (self._k, self._v) if t is not None]

    def _apply(self, fn: Any) -> None:
        if self._k is not None:
            self._k, self._v = fn(self._k), fn(self._v)

    def reset(self) -> None:
        super().reset()
        self._k = self._v = None
        self.length = 0


class MambaState(_LayerState):
    """Conv and SSM state of one Mamba-2 layer (constant size)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv: Tensor | None = None  # [b, conv_dim, conv_kernel - 1]
        self.ssm: Tensor | None = None  # [b, heads, head_dim, state_dim], float32

    @property
    def has_previous(self) -> bool:
        return self.conv is not None

    def set(self, conv: Tensor, ssm: Tensor, tokens: int) -> None:
        self.conv, self.ssm = conv, ssm
        self.seen += tokens

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.conv, self.ssm) if t is not None]

    def _apply(self, fn: Any) -> None:
        if self.conv is not None:
            self.conv, self.ssm = fn(self.conv), fn(self.ssm)

    def reset(self) -> None:
        super().reset()
        self.conv = self.ssm = None


class NoState(_LayerState):
    """MLP layers keep nothing between steps."""


def _state_for(config: HybridMegatronConfig, layer_idx: int) -> _LayerState:
    kind = config.layer_types[layer_idx]
    if kind == MAMBA:
        return MambaState()
    if kind in (SLIDING_ATTENTION, "full_attention"):
        return AttentionState(config.layer_window(layer_idx))
    return NoState()


class HybridMegatronCache(Cache):
    """Per-layer generation state of a HybridMegatron model (see the module docstring)."""

    def __init__(self, config: HybridMegatronConfig, **_: Any) -> None:
        states = [_state_for(config, i) for i in range(config.num_hidden_layers)]
        try:
            super().__init__(layers=states)
        except TypeError:  # transformers versions with another Cache constructor
            super().__init__()
        self.layers = states
        self.layer_class_to_replicate = None
        self.offloading = False

    def __len__(self) -> int:
        return len(self.layers)

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Tokens processed so far (the same for every layer)."""
        return max((s.seen for s in self.layers), default=0)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_max_cache_shape(self, layer_idx: int | None = 0) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        state = self.layers[layer_idx]
        if isinstance(state, AttentionState):
            return state.length + query_length, 0
        return query_length, 0

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [s.is_sliding for s in self.layers]

    def reorder_cache(self, beam_idx: Tensor) -> None:
        for s in self.layers:
            s.reorder_cache(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        for s in self.layers:
            s.batch_select_indices(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for s in self.layers:
            s.batch_repeat_interleave(repeats)

    def reset(self) -> None:
        for s in self.layers:
            s.reset()

    def crop(self, max_length: int) -> None:
        _LayerState().crop(max_length)

    def activate_past_recording(self) -> None:
        raise NotImplementedError("HybridMegatronCache cannot record past states for rollback.")

    def nbytes_per_layer(self) -> list[int]:
        """Bytes of tensor storage each layer's state holds (memory checks, benchmarks)."""
        return [s.nbytes() for s in self.layers]


# Keyword names under which transformers versions pass a generation cache to a model.
CACHE_ARGUMENT_NAMES = ("past_key_values", "cache", "cache_params")


def take_cache(kwargs: dict[str, Any]) -> HybridMegatronCache | None:
    """Pop the cache from `kwargs`, under whichever name it came; refuse what cannot be used.

    Raises ValueError when caches come under two names, TypeError when the cache is not a
    HybridMegatronCache or when a cache object is left in `kwargs` under another name (it
    would otherwise be ignored and decoding would restart from an empty state).
    """
    given = {name: kwargs.pop(name) for name in CACHE_ARGUMENT_NAMES if name in kwargs}
    given = {name: value for name, value in given.items() if value is not None}
    if len(given) > 1:
        raise ValueError(
            f"Got a generation cache under several names ({', '.join(given)}); pass it once, "
            "as past_key_values."
        )
    for name, value in kwargs.items():
        if isinstance(value, Cache) or (
            isinstance(value, (tuple, list)) and value and isinstance(value[0], (tuple, list))
        ):
            raise TypeError(
                f"Got a cache-like {type(value).__name__} as `{name}`, a name HybridMegatron "
                f"models do not read (they read {', '.join(CACHE_ARGUMENT_NAMES)}). Pass the "
                "HybridMegatronCache as past_key_values; if a transformers release renamed the "
                "argument again, update hybrid_megatron (CACHE_ARGUMENT_NAMES)."
            )
    if not given:
        return None
    ((name, cache),) = given.items()
    if not isinstance(cache, HybridMegatronCache):
        raise TypeError(
            f"`{name}` must be a HybridMegatronCache (or None); got {type(cache).__name__}. "
            "HybridMegatron models keep per-layer SWA/Mamba states that transformers' generic "
            "caches (DynamicCache, tuples) cannot hold: let the model create its cache "
            "(use_cache=True) or build one with HybridMegatronCache(model.config)."
        )
    return cache

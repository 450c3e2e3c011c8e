"""Layers of the Hugging Face hybrid model: norms, MLP, RoPE, attention, Mamba-2, decoder layer.

Shipped next to converted weights with `modeling_hybrid_megatron.py` (remote code); see that
module's docstring for the numerics and the padding rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention as attention_kernel
from .cache_hybrid_megatron import AttentionState, MambaState
from .configuration_hybrid_megatron import (
    ATTENTION_TYPES,
    MAMBA,
    MLP,
    HybridMegatronConfig,
)
from .mamba_ops import causal_conv1d, causal_conv1d_update, gated_rms_norm
from .ssd import select_ssd_impl, ssd_step

Tensor = torch.Tensor
# attn_implementation -> backend of the attention kernel ("eager" is computed here).
KERNEL_BACKENDS = {"sdpa": "sdpa", "flex_attention": "flex", "flash_attention_2": "flash_attn"}


class HybridMegatronRMSNorm(nn.Module):
    """RMSNorm as in Megatron's local spec (torch's rms_norm)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class HybridMegatronGatedRMSNorm(nn.Module):
    """Mamba-2's grouped RMSNorm of y * silu(z)."""

    def __init__(self, hidden_size: int, group_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        return gated_rms_norm(y, z, self.weight, eps=self.eps, group_size=self.group_size)


class HybridMegatronMLP(nn.Module):
    """SwiGLU (gate_proj, up_proj, down_proj) or GELU (up_proj, down_proj) MLP."""

    def __init__(self, config: HybridMegatronConfig) -> None:
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gated = config.mlp_gated
        self.act = F.silu if config.hidden_act == "silu" else F.gelu
        if self.gated:
            self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


def rope_cos_sin(
    positions: Tensor, theta: float, dim: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos/sin tables [b or 1, 1, s, dim] for rotate-half RoPE (Megatron's formula, float32)."""
    exponent = torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim
    inv_freq = 1.0 / (theta**exponent)
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # [b, s, dim / 2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    first, second = t.chunk(2, dim=-1)
    return t * cos + torch.cat([-second, first], dim=-1) * sin


def eager_attention(
    q: Tensor, k: Tensor, v: Tensor, window: int | None, keys: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Explicit causal (windowed) GQA attention; returns (output, probabilities [b, h, sq, sk]).

    Same semantics as the kernel: queries are the last sq of sk positions, a window W lets
    a query see itself and the W - 1 positions before it; `keys` [b, sk] (True = real) hides
    padded keys (a query seeing none attends to itself).
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    sq, sk = q.shape[2], k.shape[2]
    scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
    i = torch.arange(sk - sq, sk, device=q.device)[:, None]
    j = torch.arange(sk, device=q.device)[None, :]
    visible = j <= i
    if window is not None:
        visible &= j > i - window
    if keys is not None:
        visible = (visible & keys[:, None, None, :]) | (j == i)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1).to(q.dtype)
    return probs @ v, probs


@dataclass
class Padding:
    """Where a padded batch's real tokens are (None members: no padding in this forward)."""

    keys: Tensor | None = None  # [b, cached + new] bool: real keys, cache included
    tokens: Tensor | None = None  # [b, new] bool: real tokens of this forward
    right: bool = False  # padding on the right: states after it must not be continued from

    @classmethod
    def from_attention_mask(
        cls, mask: Tensor | None, new: int, past: int, caching: bool
    ) -> Padding:
        """Check `mask` ([b, past + new], 1 = real) and describe it; refuse what is unsupported."""
        if mask is None:
            return cls()
        if mask.dim() != 2 or mask.shape[1] != past + new:
            raise ValueError(
                f"attention_mask must be 2-D [batch, cached + new tokens] = [*, {past + new}] "
                f"(the cache holds {past} tokens); got {list(mask.shape)}."
            )
        real = mask.bool()
        if bool(real.all()):
            return cls()
        left = bool((real[:, 1:] >= real[:, :-1]).all())  # 0...0 1...1
        right = bool((real[:, 1:] <= real[:, :-1]).all())  # 1...1 0...0
        if not (left or (right and not caching)):
            raise ValueError(
                "HybridMegatron models take left padding (attention_mask 0...0 1...1 per row) "
                "anywhere, and right padding (1...1 0...0) only without a cache (use_cache="
                "False); a mask with gaps between real tokens is not supported (the Mamba-2 "
                "state cannot skip tokens)."
            )
        return cls(keys=real, tokens=real[:, past:], right=not left)

    def key_mask(self, length: int) -> Tensor | None:
        """Mask of the last `length` keys (an attention layer's cached window plus new keys)."""
        return None if self.keys is None else self.keys[:, -length:]


def positions_from_mask(mask: Tensor | None, new: int, past: int, device: torch.device) -> Tensor:
    """Position ids [b or 1, new] of the new tokens: real tokens counted from 0 in each row."""
    if mask is None:
        return torch.arange(past, past + new, device=device)[None]
    return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new:].to(device)


class HybridMegatronAttention(nn.Module):
    """Causal self-attention: full or sliding-window, RoPE or NoPE, GQA."""

    def __init__(self, config: HybridMegatronConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.window = config.layer_window(layer_idx)
        self.rope_theta = config.rope_theta_for(config.layer_types[layer_idx])
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)

    def forward(
        self,
        x: Tensor,
        rope: dict[float, tuple[Tensor, Tensor]],
        state: AttentionState | None,
        padding: Padding,
        output_attentions: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.rope_theta is not None:
            cos, sin = rope[self.rope_theta]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if state is not None:
            k, v = state.update(k, v)
        impl = self.config._attn_implementation or "sdpa"
        keys = padding.key_mask(k.shape[2])
        weights = None
        if impl == "eager":
            out, weights = eager_attention(q, k, v, self.window, keys)
        else:
            backend = KERNEL_BACKENDS.get(impl)
            if backend is None:
                raise ValueError(
                    f"attn_implementation={impl!r} is not supported by HybridMegatron models; "
                    f"use one of {['eager', *KERNEL_BACKENDS]}."
                )
            if backend == "flex" and q.shape[2] != k.shape[2]:
                backend = "sdpa"  # cached decoding: a flex compile per key length would not pay
            out = attention_kernel(
                q, k, v, window=self.window, backend=backend, key_padding_mask=keys
            )
        out = out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return self.o_proj(out), (weights if output_attentions else None)


class HybridMegatronMamba2Mixer(nn.Module):
    """Mamba-2 mixer with Megatron-Core's parameter layout (TP=1)."""

    def __init__(self, config: HybridMegatronConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.mamba_n_heads
        self.head_dim = config.mamba_d_head
        self.n_groups = config.mamba_n_groups
        self.d_state = config.mamba_d_state
        self.d_inner = config.d_inner
        self.conv_dim = config.mamba_conv_dim
        self.chunk_size = config.mamba_chunk_size
        h = config.hidden_size
        self.in_proj = nn.Linear(
            h, 2 * self.d_inner + 2 * self.n_groups * self.d_state + self.num_heads, bias=False
        )
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            kernel_size=config.mamba_d_conv,
            groups=self.conv_dim,
            padding=config.mamba_d_conv - 1,
            bias=True,
        )
        self.dt_bias = nn.Parameter(torch.zeros(self.num_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = HybridMegatronGatedRMSNorm(
            self.d_inner, self.d_inner // self.n_groups, config.mamba_rms_norm_eps
        )
        self.out_proj = nn.Linear(self.d_inner, h, bias=False)

    def _split_xbc(self, xbc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        gn = self.n_groups * self.d_state
        return torch.split(xbc, [self.d_inner, gn, gn], dim=-1)

    def forward(self, hidden: Tensor, state: MambaState | None, padding: Padding) -> Tensor:
        b, s, _ = hidden.shape
        real = None if padding.tokens is None else padding.tokens[..., None].to(hidden.dtype)
        if real is not None:
            hidden = hidden * real  # padded tokens contribute nothing (in_proj has no bias)
        z, xbc, dt = torch.split(
            self.in_proj(hidden), [self.d_inner, self.conv_dim, self.num_heads], dim=-1
        )
        A = -torch.exp(self.A_log.float())
        weight = self.conv1d.weight.squeeze(1)
        if state is not None and state.has_previous and s == 1:
            y = self._step(xbc[:, 0], dt[:, 0], A, weight, state).view(b, 1, self.d_inner)
        else:
            y = self._scan(xbc, dt, A, weight, state, real)
        return self.out_proj(self.norm(y, z))

    def _scan(
        self,
        xbc: Tensor,
        dt: Tensor,
        A: Tensor,
        weight: Tensor,
        state: MambaState | None,
        real: Tensor | None = None,
    ) -> Tensor:
        """Whole-sequence path (training-equivalent); continues from and updates `state`."""
        b, s, _ = xbc.shape
        previous = state is not None and state.has_previous
        conv = causal_conv1d(
            xbc.transpose(1, 2),
            weight,
            self.conv1d.bias,
            "silu",
            initial_state=state.conv if previous else None,
            return_final_state=state is not None,
        )
        if state is not None:
            conv, conv_state = conv
        conv = conv.transpose(1, 2)
        if real is not None:
            conv = conv * real  # the conv bias must not leak into the scan at padded tokens
        x, B, C = self._split_xbc(conv)
        extra: dict[str, Any] = {}
        if state is not None:
            extra = {"initial_states": state.ssm if previous else None, "return_final_states": True}
        y = select_ssd_impl(self.config.mamba_backend)(
            x.reshape(b, s, self.num_heads, self.head_dim),
            dt,
            A,
            B.reshape(b, s, self.n_groups, self.d_state),
            C.reshape(b, s, self.n_groups, self.d_state),
            self.chunk_size,
            D=self.D,
            dt_bias=self.dt_bias,
            dt_softplus=True,
            **extra,
        )
        if state is not None:
            y, ssm_state = y
            state.set(conv_state.clone(), ssm_state.float(), s)
        return y.reshape(b, s, self.d_inner)

    def _step(
        self, xbc: Tensor, dt: Tensor, A: Tensor, weight: Tensor, state: MambaState
    ) -> Tensor:
        """One-token decode: conv and SSM states are updated in place."""
        b = xbc.shape[0]
        xbc = causal_conv1d_update(xbc, state.conv, weight, self.conv1d.bias, "silu")
        x, B, C = self._split_xbc(xbc)
        y = ssd_step(
            state.ssm,
            x.reshape(b, self.num_heads, self.head_dim),
            dt,
            A,
            B.reshape(b, self.n_groups, self.d_state),
            C.reshape(b, self.n_groups, self.d_state),
            D=self.D,
            dt_bias=self.dt_bias,
            dt_softplus=True,
        )
        state.seen += 1
        return y


class HybridMegatronDecoderLayer(nn.Module):
    """x + block(input_layernorm(x)), the block chosen by the layer type."""

    def __init__(self, config: HybridMegatronConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.input_layernorm = HybridMegatronRMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.layer_type == MAMBA:
            self.mixer = HybridMegatronMamba2Mixer(config, layer_idx)
        elif self.layer_type in ATTENTION_TYPES:
            self.self_attn = HybridMegatronAttention(config, layer_idx)
        else:
            self.mlp = HybridMegatronMLP(config)

    def forward(
        self,
        hidden: Tensor,
        rope: dict[float, tuple[Tensor, Tensor]],
        state: Any,
        padding: Padding,
        output_attentions: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        x = self.input_layernorm(hidden)
        weights = None
        if self.layer_type == MAMBA:
            out = self.mixer(x, state, padding)
        elif self.layer_type == MLP:
            out = self.mlp(x)
        else:
            out, weights = self.self_attn(x, rope, state, padding, output_attentions)
        return hidden + out, weights

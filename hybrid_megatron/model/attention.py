"""Attention modules plugged into Megatron-Core's SelfAttention through ModuleSpecs.

`HybridCoreAttention` replaces Megatron's DotProductAttention (which materialises the full
score matrix and builds its SWA mask on CUDA) with our kernels (flex / SDPA / flash-attn).
Under context parallelism it wraps the same local kernel in `context_parallel.attention`
(all-gathered K/V for full attention, a point-to-point halo for sliding windows).
Each layer reads its window from Megatron's per-layer `window_attn_skip_freq` list by its
global layer number, exactly as TEDotProductAttention does, so both backends agree.

`HybridSelfAttention` adds per-attention-type rope theta: Megatron computes one rotary table
per model; a layer whose type uses another theta computes its own.
"""

from __future__ import annotations

from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention
from torch import Tensor

from hybrid_megatron.context_parallel.attention import context_parallel_attention
from hybrid_megatron.kernels.attention import attention as attention_kernel
from hybrid_megatron.model.transformer_config import HybridTransformerConfig


class HybridCoreAttention(MegatronModule):
    """Causal core attention (full or sliding-window, GQA) with our kernel backends.

    Takes Megatron's layout: query [sq, b, np, hn], key/value [sk, b, ng, hn] (this rank's
    heads); returns [sq, b, np * hn].
    """

    def __init__(
        self,
        config: HybridTransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        backend: str | None = None,
    ):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError("attention dropout is not supported by the hybrid attention kernels")
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale
        self.backend = backend or config.kernel_attention_backend
        if self.backend == "te":  # TE linears with our CP attention: the local kernel is ours
            self.backend = "auto"
        self.cp_group = (
            pg_collection.cp
            if pg_collection is not None and hasattr(pg_collection, "cp")
            else parallel_state.get_context_parallel_group(check_initialized=False)
        )
        self.window: int | None = None
        if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number
        ):
            self.window = config.window_size[0] + 1

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params=None,
    ) -> Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("packed sequences / attention bias need the TE backend")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        if self.cp_group is not None and self.cp_group.size() > 1:
            out = context_parallel_attention(q, k, v, self.window, self.cp_group, self._local)
        else:
            out = self._local(q, k, v, self.window)
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _local(self, q: Tensor, k: Tensor, v: Tensor, window: int | None) -> Tensor:
        """This rank's kernel; queries are the last q positions of the keys."""
        return attention_kernel(
            q, k, v, window=window, backend=self.backend, softmax_scale=self.softmax_scale
        )


class HybridSelfAttention(SelfAttention):
    """Megatron SelfAttention whose rotary theta comes from this layer's attention type."""

    def __init__(self, config: HybridTransformerConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        theta = config.layer_rope_theta[self.layer_number - 1]
        self.own_rotary: RotaryEmbedding | None = None
        if theta is not None and theta != config.rotary_base:
            self.own_rotary = RotaryEmbedding(
                kv_channels=config.kv_channels,
                rotary_percent=1.0,
                rotary_base=theta,
                use_cpu_initialization=config.use_cpu_initialization,
                cp_group=self.pg_collection.cp,
            )

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
        if self.own_rotary is not None and rotary_pos_emb is not None:
            seq_len = rotary_pos_emb.shape[0] * self.config.context_parallel_size
            rotary_pos_emb = self.own_rotary(seq_len)
        return super().forward(
            hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb, **kwargs
        )

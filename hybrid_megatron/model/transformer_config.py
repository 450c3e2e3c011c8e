"""Translate our typed config + compiled pattern into Megatron-Core's TransformerConfig."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from hybrid_megatron.config import RunConfig
from hybrid_megatron.pattern import CompiledPattern


@dataclass
class HybridTransformerConfig(TransformerConfig):
    """TransformerConfig plus the per-layer and backend settings our modules read."""

    layer_rope_theta: list = field(default_factory=list)
    """Rope theta per global layer (None for NoPE and non-attention layers)."""
    rotary_base: float = 10000.0
    """Theta of the model-level rotary table (layers of another theta compute their own)."""
    kernel_attention_backend: str = "auto"
    """Our attention kernel choice (Megatron's own `attention_backend` is TE-specific)."""
    kernel_mamba_backend: str = "auto"
    mamba_expand: int = 2
    mamba_conv_kernel: int = 4
    mamba_chunk_size: int = 128


def model_rotary_base(compiled: CompiledPattern) -> float | None:
    """Theta of the model-level rotary table: the most common theta among RoPE layers."""
    thetas = [p.rope_theta for p in compiled.layers if p.rope_theta is not None]
    if not thetas:
        return None
    return max(set(thetas), key=thetas.count)


def build_transformer_config(
    cfg: RunConfig,
    compiled: CompiledPattern | None = None,
    params_dtype: torch.dtype = torch.float32,
    use_cpu_initialization: bool = True,
) -> HybridTransformerConfig:
    """Megatron TransformerConfig for `cfg` (pattern compiled here if not given)."""
    m, p = cfg.model, cfg.parallel
    compiled = compiled or cfg.compiled
    rotary_base = model_rotary_base(compiled)
    swiglu = m.activation == "swiglu"
    return HybridTransformerConfig(
        num_layers=compiled.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.query_groups,
        kv_channels=m.head_dim,
        ffn_hidden_size=m.ffn_size,
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu,
        add_bias_linear=False,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        init_method_std=m.init_std_value,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline,
        context_parallel_size=p.context,
        sequence_parallel=p.sequence_parallel,
        pipeline_model_parallel_layout=compiled.pipeline_layout(),
        window_size=compiled.window_size,
        window_attn_skip_freq=list(compiled.window_attn_skip_freq)
        if compiled.window_size
        else None,
        no_rope_freq=list(compiled.no_rope_freq),
        layer_rope_theta=[pl.rope_theta for pl in compiled.layers],
        rotary_base=rotary_base or 10000.0,
        mamba_state_dim=m.mamba.state_dim,
        mamba_head_dim=m.mamba.head_dim,
        mamba_num_groups=m.mamba.num_groups,
        mamba_num_heads=m.mamba_num_heads,
        mamba_expand=m.mamba.expand,
        mamba_conv_kernel=m.mamba.conv_kernel,
        mamba_chunk_size=m.mamba.chunk_size,
        num_moe_experts=m.num_moe_experts,
        moe_router_topk=m.moe_router_topk,
        kernel_attention_backend=m.attention_backend,
        kernel_mamba_backend=m.mamba_backend,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=use_cpu_initialization,
    )

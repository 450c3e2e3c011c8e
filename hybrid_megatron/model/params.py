"""Parameter counts per layer type, from the config alone (no model build needed)."""

from __future__ import annotations

from hybrid_megatron.config import ModelConfig
from hybrid_megatron.pattern import LayerKind, compile_pattern


def layer_params(m: ModelConfig, kind: LayerKind) -> int:
    """Parameters of one layer of `kind` (its input norm included)."""
    h = m.hidden_size
    if kind.is_attention:
        d, heads, groups = m.head_dim, m.num_attention_heads, m.query_groups
        return h + h * (heads + 2 * groups) * d + heads * d * h
    if kind in (LayerKind.MLP, LayerKind.MOE):
        up = 2 if m.activation == "swiglu" else 1
        experts = m.num_moe_experts or 1 if kind == LayerKind.MOE else 1
        router = h * m.num_moe_experts if kind == LayerKind.MOE else 0
        return h + experts * (h * m.ffn_size * up + m.ffn_size * h) + router
    mb = m.mamba
    heads = m.mamba_num_heads
    d_inner = heads * mb.head_dim
    gn = mb.num_groups * mb.state_dim
    conv_dim = d_inner + 2 * gn
    return (
        h
        + h * (2 * d_inner + 2 * gn + heads)
        + conv_dim * (mb.conv_kernel + 1)
        + 3 * heads
        + d_inner
        + d_inner * h
    )


def count_params(m: ModelConfig) -> dict[str, int]:
    """{'embedding', 'output', 'layers', 'total', 'non_embedding'} for the unpadded vocab."""
    compiled = compile_pattern(m)
    layers = sum(layer_params(m, p.kind) for p in compiled.layers) + m.hidden_size  # final norm
    embedding = m.vocab_size * m.hidden_size
    output = 0 if m.tie_embeddings else embedding
    return {
        "embedding": embedding,
        "output": output,
        "layers": layers,
        "non_embedding": layers,
        "total": embedding + output + layers,
    }

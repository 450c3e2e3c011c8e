"""Parameter mapping between the Megatron model at TP=1/PP=1 (local spec names) and the HF model.

Megatron                                          HF
embedding.word_embeddings.weight                  model.embed_tokens.weight
decoder.final_norm.weight                         model.norm.weight
output_layer.weight (untied only)                 lm_head.weight
decoder.layers.i.norm / input_layernorm /         model.layers.i.input_layernorm.weight
  pre_mlp_layernorm .weight
decoder.layers.i.mixer.*  (Mamba-2)               model.layers.i.mixer.*  (same names)
decoder.layers.i.self_attention.linear_qkv        model.layers.i.self_attn.{q,k,v}_proj
  rows per query group g: [q heads of g, k_g, v_g]
decoder.layers.i.self_attention.linear_proj       model.layers.i.self_attn.o_proj
decoder.layers.i.mlp.linear_fc1  [gate; up]       model.layers.i.mlp.{gate,up}_proj (GELU: up_proj)
decoder.layers.i.mlp.linear_fc2                   model.layers.i.mlp.down_proj

Every source tensor must be used exactly once; anything left over is an error (it would mean
the two models differ in structure).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from hybrid_megatron.hf.configuration_hybrid_megatron import (
    ATTENTION_TYPES,
    MAMBA,
    HybridMegatronConfig,
)

Tensor = torch.Tensor
MAMBA_PARAMS = (
    "in_proj.weight",
    "conv1d.weight",
    "conv1d.bias",
    "dt_bias",
    "A_log",
    "D",
    "norm.weight",
    "out_proj.weight",
)


class WeightMappingError(RuntimeError):
    """The two state dicts do not correspond (missing or unused tensors, wrong shapes)."""


def _split_qkv(w: Tensor, c: HybridMegatronConfig) -> tuple[Tensor, Tensor, Tensor]:
    per = c.num_attention_heads // c.num_key_value_heads
    blocks = w.view(c.num_key_value_heads, per + 2, c.head_dim, w.shape[-1])
    q = blocks[:, :per].reshape(-1, w.shape[-1])
    k = blocks[:, per].reshape(-1, w.shape[-1])
    v = blocks[:, per + 1].reshape(-1, w.shape[-1])
    return q, k, v


def _fuse_qkv(q: Tensor, k: Tensor, v: Tensor, c: HybridMegatronConfig) -> Tensor:
    g, d, h = c.num_key_value_heads, c.head_dim, q.shape[-1]
    per = c.num_attention_heads // g
    blocks = [q.view(g, per, d, h), k.view(g, 1, d, h), v.view(g, 1, d, h)]
    return torch.cat(blocks, dim=1).reshape(-1, h)


class _Source:
    """Source tensors handed out once each, with a check that all were used."""

    def __init__(self, sd: Mapping[str, Tensor], what: str) -> None:
        self.tensors = {
            k: v for k, v in sd.items() if v is not None and not k.endswith("_extra_state")
        }
        self.what = what

    def take(self, key: str) -> Tensor:
        if key not in self.tensors:
            raise WeightMappingError(f"{self.what} state dict has no tensor {key!r}.")
        return self.tensors.pop(key)

    def finish(self) -> None:
        if self.tensors:
            raise WeightMappingError(
                f"{self.what} tensors without a counterpart: {sorted(self.tensors)[:8]}"
            )


def _own(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous copies that share no storage (safetensors refuses shared tensors)."""
    return {k: v.detach().clone().contiguous() for k, v in tensors.items()}


def megatron_to_hf_state(
    sd: Mapping[str, Tensor], config: HybridMegatronConfig
) -> dict[str, Tensor]:
    """HF state dict of the Megatron TP=1/PP=1 state dict `sd`."""
    src, out = _Source(sd, "Megatron"), {}
    out["model.embed_tokens.weight"] = src.take("embedding.word_embeddings.weight")
    out["model.norm.weight"] = src.take("decoder.final_norm.weight")
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = src.take("output_layer.weight")
    for i, kind in enumerate(config.layer_types):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        if kind == MAMBA:
            out[h + "input_layernorm.weight"] = src.take(m + "norm.weight")
            for name in MAMBA_PARAMS:
                out[h + "mixer." + name] = src.take(m + "mixer." + name)
        elif kind in ATTENTION_TYPES:
            out[h + "input_layernorm.weight"] = src.take(m + "input_layernorm.weight")
            q, k, v = _split_qkv(src.take(m + "self_attention.linear_qkv.weight"), config)
            out.update({h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k})
            out[h + "self_attn.v_proj.weight"] = v
            out[h + "self_attn.o_proj.weight"] = src.take(m + "self_attention.linear_proj.weight")
        else:
            out[h + "input_layernorm.weight"] = src.take(m + "pre_mlp_layernorm.weight")
            fc1 = src.take(m + "mlp.linear_fc1.weight")
            if config.mlp_gated:
                gate, up = fc1.chunk(2, dim=0)
                out.update({h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up})
            else:
                out[h + "mlp.up_proj.weight"] = fc1
            out[h + "mlp.down_proj.weight"] = src.take(m + "mlp.linear_fc2.weight")
    src.finish()
    return _own(out)


def hf_to_megatron_state(
    sd: Mapping[str, Tensor], config: HybridMegatronConfig
) -> dict[str, Tensor]:
    """Megatron TP=1/PP=1 state dict of the HF state dict `sd` (inverse of the above)."""
    src, out = _Source(sd, "HF"), {}
    out["embedding.word_embeddings.weight"] = src.take("model.embed_tokens.weight")
    out["decoder.final_norm.weight"] = src.take("model.norm.weight")
    if config.tie_word_embeddings:
        src.tensors.pop("lm_head.weight", None)  # the embedding itself
    else:
        out["output_layer.weight"] = src.take("lm_head.weight")
    for i, kind in enumerate(config.layer_types):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        norm = src.take(h + "input_layernorm.weight")
        if kind == MAMBA:
            out[m + "norm.weight"] = norm
            for name in MAMBA_PARAMS:
                out[m + "mixer." + name] = src.take(h + "mixer." + name)
        elif kind in ATTENTION_TYPES:
            out[m + "input_layernorm.weight"] = norm
            q, k, v = (src.take(h + f"self_attn.{p}_proj.weight") for p in "qkv")
            out[m + "self_attention.linear_qkv.weight"] = _fuse_qkv(q, k, v, config)
            out[m + "self_attention.linear_proj.weight"] = src.take(h + "self_attn.o_proj.weight")
        else:
            out[m + "pre_mlp_layernorm.weight"] = norm
            up = src.take(h + "mlp.up_proj.weight")
            if config.mlp_gated:
                up = torch.cat([src.take(h + "mlp.gate_proj.weight"), up], dim=0)
            out[m + "mlp.linear_fc1.weight"] = up
            out[m + "mlp.linear_fc2.weight"] = src.take(h + "mlp.down_proj.weight")
    src.finish()
    return _own(out)


def resize_vocab(weight: Tensor, rows: int, vocab_size: int) -> Tensor:
    """Pad (zeros) or cut the padding rows of an embedding/output matrix to `rows` rows.

    Only rows at or beyond `vocab_size` (padding, never a real token) may be cut.
    """
    if rows == weight.shape[0]:
        return weight
    if rows < vocab_size:
        raise WeightMappingError(f"cannot shrink the vocabulary to {rows} < {vocab_size} rows")
    if rows < weight.shape[0]:
        return weight[:rows].clone()
    pad = weight.new_zeros(rows - weight.shape[0], weight.shape[1])
    return torch.cat([weight, pad], dim=0)

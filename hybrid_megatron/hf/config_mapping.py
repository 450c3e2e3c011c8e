"""Translate between our RunConfig (model section) and HybridMegatronConfig."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from hybrid_megatron.config import ModelConfig, ParallelConfig, RunConfig, from_dict, to_dict
from hybrid_megatron.errors import ConfigError
from hybrid_megatron.hf.configuration_hybrid_megatron import (
    FULL_ATTENTION,
    MAMBA,
    MLP,
    SLIDING_ATTENTION,
    HybridMegatronConfig,
)
from hybrid_megatron.pattern import LayerKind, parse_pattern

HF_LAYER_TYPE = {
    LayerKind.MAMBA: MAMBA,
    LayerKind.FULL_ATTENTION: FULL_ATTENTION,
    LayerKind.SLIDING_WINDOW: SLIDING_ATTENTION,
    LayerKind.MLP: MLP,
}
PATTERN_SYMBOL = {v: k.value for k, v in HF_LAYER_TYPE.items()}


def check_convertible(m: ModelConfig) -> None:
    """Raise ConfigError if the model has layers the HF model lacks (MoE)."""
    kinds = [k for stage in parse_pattern(m.pattern) for k in stage]
    moe = [i + 1 for i, k in enumerate(kinds) if k not in HF_LAYER_TYPE]
    if moe:
        raise ConfigError(
            f"model.pattern '{m.pattern}' has MoE ('E') layers (layer numbers {moe}); the Hugging "
            "Face HybridMegatron model supports M, *, S and - layers only, so this checkpoint "
            "cannot be converted. Convert a dense model (use '-' instead of 'E')."
        )


def hf_config_from_run_config(
    cfg: RunConfig, padded_vocab_size: int, provenance: dict[str, Any] | None = None
) -> HybridMegatronConfig:
    """HF config of `cfg.model` whose embedding has `padded_vocab_size` rows."""
    m = cfg.model
    check_convertible(m)
    kinds = [k for stage in parse_pattern(m.pattern) for k in stage]
    megatron = {"run_config": to_dict(cfg), **(provenance or {})}
    return HybridMegatronConfig(
        vocab_size=padded_vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_size,
        layer_types=[HF_LAYER_TYPE[k] for k in kinds],
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.query_groups,
        head_dim=m.head_dim,
        sliding_window=m.swa.window,
        full_attention_use_rope=m.full_attention.rope,
        full_attention_rope_theta=m.full_attention.rope_theta,
        sliding_attention_use_rope=m.swa.rope,
        sliding_attention_rope_theta=m.swa.rope_theta,
        hidden_act="silu" if m.activation == "swiglu" else "gelu",
        mlp_gated=m.activation == "swiglu",
        rms_norm_eps=m.norm_epsilon,
        mamba_d_state=m.mamba.state_dim,
        mamba_d_head=m.mamba.head_dim,
        mamba_n_groups=m.mamba.num_groups,
        mamba_expand=m.mamba.expand,
        mamba_n_heads=m.mamba_num_heads,
        mamba_d_conv=m.mamba.conv_kernel,
        mamba_chunk_size=m.mamba.chunk_size,
        mamba_backend=m.mamba_backend,
        max_position_embeddings=m.seq_length,
        initializer_range=m.init_std_value,
        tie_word_embeddings=m.tie_embeddings,
        megatron=megatron,
    )


def _stored_run_config(config: HybridMegatronConfig) -> RunConfig:
    """The run config recorded at conversion time (or defaults), best effort."""
    stored = (config.megatron or {}).get("run_config") or {}
    try:
        return from_dict(RunConfig, stored)
    except ConfigError:  # written by another version: keep what this version understands
        cfg = RunConfig()
        for section, cls in (("model", ModelConfig), ("parallel", ParallelConfig)):
            with contextlib.suppress(ConfigError):
                setattr(cfg, section, from_dict(cls, stored.get(section) or {}))
        return cfg


def _keep_implicit(m: ModelConfig, old: ModelConfig) -> ModelConfig:
    """Leave sizes the source config derived (None) unset where they still derive the same."""
    derived = {
        "kv_channels": lambda c: c.head_dim,
        "ffn_hidden_size": lambda c: c.ffn_size,
        "num_query_groups": lambda c: c.query_groups,
        "init_std": lambda c: c.init_std_value,
    }
    for name, value_of in derived.items():
        if getattr(old, name) is None:
            candidate = dataclasses.replace(m, **{name: None})
            if value_of(candidate) == value_of(m):
                m = candidate
    if old.mamba.num_heads is None:
        candidate = dataclasses.replace(m, mamba=dataclasses.replace(m.mamba, num_heads=None))
        if candidate.mamba_num_heads == m.mamba_num_heads:
            m = candidate
    return m


def run_config_from_hf_config(config: HybridMegatronConfig) -> RunConfig:
    """RunConfig whose model is `config`'s architecture (other settings from provenance)."""
    cfg = _stored_run_config(config)
    old = cfg.model
    pattern = "".join(PATTERN_SYMBOL[t] for t in config.layer_types)
    if "".join(old.pattern.split()).replace("|", "") == pattern:
        pattern = old.pattern  # keep pipeline-stage boundaries
    elif "|" in old.pattern or cfg.parallel.pipeline > 1:
        cfg.parallel = dataclasses.replace(cfg.parallel, pipeline=1, virtual_pipeline=None)
    gated = config.mlp_gated and config.hidden_act == "silu"
    if config.mlp_gated != gated:
        raise ConfigError(
            f"HF config has mlp_gated={config.mlp_gated} with hidden_act={config.hidden_act!r}; "
            "Megatron models support SwiGLU (gated silu) or plain GELU MLPs only."
        )
    # The tokenizer's vocabulary when recorded (the HF embedding holds it padded), else all rows.
    recorded = bool((config.megatron or {}).get("run_config"))
    vocab = (
        old.vocab_size if recorded and old.vocab_size <= config.vocab_size else config.vocab_size
    )
    cfg.model = dataclasses.replace(
        old,
        pattern=pattern,
        num_layers=None,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_key_value_heads,
        kv_channels=config.head_dim,
        ffn_hidden_size=config.intermediate_size,
        activation="swiglu" if gated else "gelu",
        vocab_size=vocab,
        seq_length=config.max_position_embeddings,
        full_attention=dataclasses.replace(
            old.full_attention,
            rope=config.full_attention_use_rope,
            rope_theta=config.full_attention_rope_theta,
        ),
        swa=dataclasses.replace(
            old.swa,
            window=config.sliding_window,
            rope=config.sliding_attention_use_rope,
            rope_theta=config.sliding_attention_rope_theta,
        ),
        mamba=dataclasses.replace(
            old.mamba,
            state_dim=config.mamba_d_state,
            head_dim=config.mamba_d_head,
            num_groups=config.mamba_n_groups,
            expand=config.mamba_expand,
            conv_kernel=config.mamba_d_conv,
            chunk_size=config.mamba_chunk_size,
            num_heads=config.mamba_n_heads,
        ),
        norm_epsilon=config.rms_norm_eps,
        init_std=config.initializer_range,
        tie_embeddings=config.tie_word_embeddings,
        mamba_backend=config.mamba_backend,
        num_moe_experts=None,
    )
    cfg.model = _keep_implicit(cfg.model, old)
    if abs(config.mamba_rms_norm_eps - 1e-5) > 1e-12 and MAMBA in config.layer_types:
        raise ConfigError(
            f"HF config has mamba_rms_norm_eps={config.mamba_rms_norm_eps}; the Megatron Mamba "
            "mixer uses 1e-5. Only models with mamba_rms_norm_eps=1e-5 convert to Megatron."
        )
    cfg.validate()
    return cfg

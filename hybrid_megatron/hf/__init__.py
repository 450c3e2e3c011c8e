"""Hugging Face transformers model of our hybrids, and Megatron <-> HF checkpoint conversion.

Importing this package registers the model with transformers' Auto classes
(`AutoConfig`, `AutoModel`, `AutoModelForCausalLM`, model_type "hybrid_megatron").
Saved models also carry their source files (`auto_map`), so they load with
`trust_remote_code=True` where hybrid_megatron is not installed.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from hybrid_megatron.hf.cache_hybrid_megatron import HybridMegatronCache
from hybrid_megatron.hf.configuration_hybrid_megatron import HybridMegatronConfig
from hybrid_megatron.hf.convert import hf_to_megatron, megatron_to_hf, verify
from hybrid_megatron.hf.modeling_hybrid_megatron import (
    HybridMegatronForCausalLM,
    HybridMegatronModel,
    HybridMegatronPreTrainedModel,
)

__all__ = [
    "HybridMegatronCache",
    "HybridMegatronConfig",
    "HybridMegatronForCausalLM",
    "HybridMegatronModel",
    "HybridMegatronPreTrainedModel",
    "hf_to_megatron",
    "megatron_to_hf",
    "verify",
]


def _register() -> None:
    """Register with the Auto classes (tolerates repeated registration)."""
    pairs = (
        (AutoModel, HybridMegatronModel),
        (AutoModelForCausalLM, HybridMegatronForCausalLM),
    )
    try:
        AutoConfig.register(HybridMegatronConfig.model_type, HybridMegatronConfig, exist_ok=True)
        for auto, cls in pairs:
            auto.register(HybridMegatronConfig, cls, exist_ok=True)
    except TypeError:  # transformers without `exist_ok`
        try:
            AutoConfig.register(HybridMegatronConfig.model_type, HybridMegatronConfig)
            for auto, cls in pairs:
                auto.register(HybridMegatronConfig, cls)
        except ValueError:
            pass


_register()

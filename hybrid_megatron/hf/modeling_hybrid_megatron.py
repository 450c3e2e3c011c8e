"""Hugging Face transformers model of hybrid Mamba-2 / sliding-window / full-attention LMs.

Numerically this is hybrid_megatron's Megatron-Core model (local spec) at TP=1, computed with
the same kernels (`attention`, `ssd`, `mamba_ops`, torch only):

- pre-norm residual layers: x + block(RMSNorm(x)); final RMSNorm; tied or separate lm_head;
- attention: q/k/v projections (Megatron's fused, group-interleaved `linear_qkv` split),
  rotate-half RoPE with the layer type's theta, or none (NoPE); causal, windowed for
  sliding-window layers; GQA;
- Mamba-2: in_proj -> [z, x, B, C, dt]; depthwise causal conv + SiLU over [x, B, C];
  chunked SSD with dt bias + softplus, A = -exp(A_log), skip D; grouped gated RMSNorm of
  y * silu(z); out_proj;
- MLP: SwiGLU (silu(gate) * up) or GELU.

`attn_implementation`: "eager" (explicit softmax; the only one returning attention weights),
"sdpa", "flex_attention", "flash_attention_2" (the last three are the kernel's backends).
Padding (`attention_mask`, 1 = real token): left-padded batches (0...0 1...1 per row) work
everywhere, including cached prefill and decoding in `generate()`: padded keys are hidden from
attention, positions count real tokens only, and padded positions are zeroed before the
Mamba-2 projections and after its conv, so the conv and SSM states start from zero at the
first real token exactly as without padding (as transformers' own Mamba-2 does). Right-padded
batches (1...1 0...0) are accepted in forwards without a cache (scoring, as
lm-evaluation-harness does). Outputs at padded positions are meaningless.

This file is shipped next to converted weights together with the files it imports
(remote code); `save_pretrained` writes them all.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .attention import attention as attention_kernel
from .cache_hybrid_megatron import HybridMegatronCache, take_cache
from .configuration_hybrid_megatron import (
    AUTO_MAP,
    HybridMegatronConfig,
)
from .layers_hybrid_megatron import (
    HybridMegatronDecoderLayer,
    HybridMegatronGatedRMSNorm,
    HybridMegatronMamba2Mixer,
    HybridMegatronRMSNorm,
    Padding,
    positions_from_mask,
    rope_cos_sin,
)
from .mamba_ops import causal_conv1d
from .ssd import ssd_step

try:  # transformers >= 5: initialisers that skip weights already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # older transformers: plain torch initialisers
    from torch.nn import init

Tensor = torch.Tensor
# The output field that holds the cache: `cache` from transformers 5.24, `past_key_values` before.
CACHE_FIELD = (
    "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
)

# Source files a saved model needs besides the weights (kernels are located at save time).
CODE_FILES = (
    "configuration_hybrid_megatron.py",
    "cache_hybrid_megatron.py",
    "layers_hybrid_megatron.py",
    "modeling_hybrid_megatron.py",
)
KERNEL_FUNCTIONS = {
    "attention.py": attention_kernel,
    "ssd.py": ssd_step,
    "mamba_ops.py": causal_conv1d,
}


def _copy(tensor: Tensor, value: Tensor) -> None:
    if hasattr(init, "copy_"):
        init.copy_(tensor, value)
    else:
        with torch.no_grad():
            tensor.copy_(value)


def write_code_files(directory: str | Path) -> list[Path]:
    """Copy the modeling, config, cache and kernel sources flat into `directory`.

    Works both from the package (kernels come from hybrid_megatron.kernels) and from a model
    loaded as remote code (kernels are the sibling files it was loaded with).
    """
    directory = Path(directory)
    here = Path(__file__).resolve().parent
    written = []
    for name in CODE_FILES:
        written.append(Path(shutil.copyfile(here / name, directory / name)))
    for name, fn in KERNEL_FUNCTIONS.items():
        source = Path(sys.modules[fn.__module__].__file__)
        written.append(Path(shutil.copyfile(source, directory / name)))
    return written


def _readable_by_umask(directory: Path) -> None:
    """Give weight files the mode the umask allows (transformers writes them 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.glob("*.safetensors*"):
        path.chmod(0o666 & ~umask)


# ------------------------------------------------------------------------------- models


class HybridMegatronPreTrainedModel(PreTrainedModel):
    config_class = HybridMegatronConfig
    base_model_prefix = "model"
    _no_split_modules = ["HybridMegatronDecoderLayer"]
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _is_stateful = True  # recurrent states: no assisted/contrastive decoding

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (HybridMegatronRMSNorm, HybridMegatronGatedRMSNorm)):
            init.ones_(module.weight)
        elif isinstance(module, nn.Conv1d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            init.zeros_(module.bias)
        elif isinstance(module, HybridMegatronMamba2Mixer):
            h = module.num_heads
            _copy(module.A_log, torch.log(torch.linspace(1.0, 16.0, h)))
            init.ones_(module.D)
            dt = torch.exp(torch.linspace(math.log(1e-3), math.log(1e-1), h)).clamp(min=1e-4)
            _copy(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model creates its own HybridMegatronCache

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> Any:
        """transformers' save, plus the source files needed to load with trust_remote_code."""
        self.config.auto_map = dict(AUTO_MAP)
        out = super().save_pretrained(save_directory, *args, **kwargs)
        write_code_files(save_directory)
        _readable_by_umask(Path(save_directory))
        return out


class HybridMegatronModel(HybridMegatronPreTrainedModel):
    """Embedding, hybrid layers and final norm; returns the last hidden states."""

    def __init__(self, config: HybridMegatronConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            HybridMegatronDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = HybridMegatronRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _rope_tables(
        self, positions: Tensor, dtype: torch.dtype
    ) -> dict[float, tuple[Tensor, Tensor]]:
        thetas = {self.config.rope_theta_for(t) for t in self.config.layer_types} - {None}
        return {t: rope_cos_sin(positions, t, self.config.head_dim, dtype) for t in thetas}

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: HybridMegatronCache | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: HybridMegatronCache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple:
        """`past_key_values` and `cache` (and `cache_params`) name the same argument."""
        past_key_values = take_cache({"past_key_values": past_key_values, "cache": cache, **kwargs})
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        output_attentions = bool(output_attentions)
        if output_attentions and (self.config._attn_implementation or "sdpa") != "eager":
            raise ValueError(
                "output_attentions=True needs attn_implementation='eager' (the fused kernels do "
                "not return attention weights)."
            )
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        caching = bool(use_cache) or past_key_values is not None
        padding = Padding.from_attention_mask(attention_mask, hidden.shape[1], past, caching)
        if use_cache is None:  # no cache by default after right padding (scoring)
            use_cache = self.config.use_cache and not self.training and not padding.right
        if use_cache and past_key_values is None:
            past_key_values = HybridMegatronCache(self.config)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, hidden.shape[1], past, hidden.device)
        rope = self._rope_tables(position_ids, hidden.dtype)

        all_hidden: tuple[Tensor, ...] = ()
        all_attn: tuple[Tensor, ...] = ()
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden += (hidden,)
            state = past_key_values.layers[i] if past_key_values is not None else None
            hidden, weights = layer(hidden, rope, state, padding, output_attentions)
            if weights is not None:
                all_attn += (weights,)
        hidden = self.norm(hidden)
        if output_hidden_states:
            all_hidden += (hidden,)
        out = BaseModelOutputWithPast(
            last_hidden_state=hidden,
            hidden_states=all_hidden or None,
            attentions=all_attn or None,
            **{CACHE_FIELD: past_key_values if use_cache else None},
        )
        return out if return_dict is not False else out.to_tuple()


class HybridMegatronForCausalLM(HybridMegatronPreTrainedModel, GenerationMixin):
    """Hybrid LM with a (tied or separate) output head; `generate()` uses HybridMegatronCache."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HybridMegatronConfig) -> None:
        super().__init__(config)
        self.model = HybridMegatronModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: HybridMegatronCache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        cache: HybridMegatronCache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """`past_key_values` and `cache` (and `cache_params`) name the same argument."""
        past_key_values = take_cache({"past_key_values": past_key_values, "cache": cache, **kwargs})
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        result = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            **{CACHE_FIELD: out.get(CACHE_FIELD)},
        )
        return result if return_dict is not False else result.to_tuple()

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The inputs of the next `generate()` step, the same under every transformers version.

        Reads the cache under any name transformers uses, feeds the tokens the cache has not
        seen yet, and passes the cache back as `past_key_values`.
        """
        if inputs_embeds is not None:
            raise ValueError(
                "generate() from inputs_embeds is not supported by HybridMegatron models; pass "
                "input_ids (forward() itself accepts inputs_embeds)."
            )
        cache = take_cache(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        if past > input_ids.shape[1]:
            raise ValueError(
                f"The cache has seen {past} tokens but generate() passed only "
                f"{input_ids.shape[1]}; pass the whole sequence (prompt and generated tokens)."
            )
        inputs: dict[str, Any] = {"input_ids": input_ids[:, past:], "past_key_values": cache}
        if attention_mask is not None:  # left-padded prompts: positions count real tokens
            inputs["attention_mask"] = attention_mask
            inputs["position_ids"] = positions_from_mask(
                attention_mask, input_ids.shape[1] - past, past, input_ids.device
            )
        for name in ("use_cache", "logits_to_keep", "output_attentions", "output_hidden_states"):
            if kwargs.get(name) is not None:
                inputs[name] = kwargs[name]
        return inputs


if int(transformers.__version__.split(".")[0]) < 5:
    # transformers 4.x lists the tied parameter names instead of a {target: source} mapping.
    HybridMegatronForCausalLM._tied_weights_keys = ["lm_head.weight"]

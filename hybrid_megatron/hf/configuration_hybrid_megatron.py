"""Configuration of the Hugging Face model for hybrid Mamba-2 / sliding-window / full-attention LMs.

This file is shipped next to converted weights (remote code): it imports only transformers.

One entry of `layer_types` per layer, mirroring the layer pattern symbols of hybrid_megatron:

    "mamba"              M   Mamba-2 mixer
    "full_attention"     *   causal attention over the whole prefix
    "sliding_attention"  S   causal attention over the last `sliding_window` tokens (incl. itself)
    "mlp"                -   MLP (SwiGLU or GELU)

Each attention type has its own RoPE switch and theta (`full_attention_use_rope`,
`full_attention_rope_theta`, `sliding_attention_use_rope`, `sliding_attention_rope_theta`);
a type without RoPE is "NoPE".
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

MAMBA = "mamba"
FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
MLP = "mlp"
LAYER_TYPES = (MAMBA, FULL_ATTENTION, SLIDING_ATTENTION, MLP)
ATTENTION_TYPES = (FULL_ATTENTION, SLIDING_ATTENTION)
# Names other libraries (and newer transformers) use for the same layers.
_LAYER_TYPE_ALIASES = {
    "linear_attention": MAMBA,
    "mamba2": MAMBA,
    "attention": FULL_ATTENTION,
    "dense": MLP,
}

AUTO_MAP = {
    "AutoConfig": "configuration_hybrid_megatron.HybridMegatronConfig",
    "AutoModel": "modeling_hybrid_megatron.HybridMegatronModel",
    "AutoModelForCausalLM": "modeling_hybrid_megatron.HybridMegatronForCausalLM",
}


def normalize_layer_types(layer_types: list[str]) -> list[str]:
    """Map aliases to our names; raise ValueError naming any layer type this model lacks."""
    out = [_LAYER_TYPE_ALIASES.get(t, t) for t in layer_types]
    unknown = sorted({t for t in out if t not in LAYER_TYPES})
    if unknown:
        raise ValueError(
            f"layer_types contains {unknown}, which HybridMegatron models do not support; "
            f"supported layer types: {list(LAYER_TYPES)} (MoE layers have no HF implementation)."
        )
    return out


class HybridMegatronConfig(PretrainedConfig):
    """Architecture of a hybrid LM (see the module docstring for `layer_types`)."""

    model_type = "hybrid_megatron"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 512,
        hidden_size: int = 256,
        intermediate_size: int = 704,
        layer_types: list[str] | None = None,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        sliding_window: int | None = 128,
        full_attention_use_rope: bool = True,
        full_attention_rope_theta: float = 10000.0,
        sliding_attention_use_rope: bool = True,
        sliding_attention_rope_theta: float = 10000.0,
        hidden_act: str = "silu",
        mlp_gated: bool = True,
        rms_norm_eps: float = 1e-5,
        mamba_d_state: int = 64,
        mamba_d_head: int = 64,
        mamba_n_groups: int = 1,
        mamba_expand: int = 2,
        mamba_n_heads: int | None = None,
        mamba_d_conv: int = 4,
        mamba_chunk_size: int = 128,
        mamba_rms_norm_eps: float = 1e-5,
        mamba_backend: str = "auto",
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        megatron: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.sliding_window = sliding_window
        self.full_attention_use_rope = full_attention_use_rope
        self.full_attention_rope_theta = float(full_attention_rope_theta)
        self.sliding_attention_use_rope = sliding_attention_use_rope
        self.sliding_attention_rope_theta = float(sliding_attention_rope_theta)
        self.hidden_act = hidden_act
        self.mlp_gated = mlp_gated
        self.rms_norm_eps = rms_norm_eps
        self.mamba_d_state = mamba_d_state
        self.mamba_d_head = mamba_d_head
        self.mamba_n_groups = mamba_n_groups
        self.mamba_expand = mamba_expand
        self.mamba_n_heads = mamba_n_heads or mamba_expand * hidden_size // mamba_d_head
        self.mamba_d_conv = mamba_d_conv
        self.mamba_chunk_size = mamba_chunk_size
        self.mamba_rms_norm_eps = mamba_rms_norm_eps
        self.mamba_backend = mamba_backend
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        # Provenance for converting back: the Megatron run config, iteration and source.
        self.megatron = megatron
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        # Set after the base __init__: transformers >= 5 rewrites "mamba" to "linear_attention"
        # and checks `layer_types` against its own vocabulary there (it has no "mlp").
        types = layer_types or [MAMBA, MLP, SLIDING_ATTENTION, MLP, FULL_ATTENTION, MLP]
        self.layer_types = normalize_layer_types(list(types))
        self._check()

    @property
    def num_hidden_layers(self) -> int:
        """Number of layers, derived from `layer_types`.

        Not stored in config.json: transformers >= 5 checks `layer_types` against its own
        vocabulary whenever a config has `num_hidden_layers`, also in the generic config it
        falls back to (e.g. `AutoTokenizer.from_pretrained(dir)` without trust_remote_code).
        """
        return len(getattr(self, "layer_types", None) or ())

    @num_hidden_layers.setter
    def num_hidden_layers(self, value: int) -> None:
        if getattr(self, "layer_types", None) and value != len(self.layer_types):
            raise ValueError(
                f"num_hidden_layers={value} but layer_types lists {len(self.layer_types)} layers."
            )

    @property
    def d_inner(self) -> int:
        return self.mamba_n_heads * self.mamba_d_head

    @property
    def mamba_conv_dim(self) -> int:
        return self.d_inner + 2 * self.mamba_n_groups * self.mamba_d_state

    def layer_window(self, layer_idx: int) -> int | None:
        """Attention window of layer `layer_idx` (None: full attention or not attention)."""
        return self.sliding_window if self.layer_types[layer_idx] == SLIDING_ATTENTION else None

    def rope_theta_for(self, layer_type: str) -> float | None:
        """RoPE theta of an attention type, or None where it uses no position encoding (NoPE)."""
        if layer_type == FULL_ATTENTION:
            return self.full_attention_rope_theta if self.full_attention_use_rope else None
        if layer_type == SLIDING_ATTENTION:
            return self.sliding_attention_rope_theta if self.sliding_attention_use_rope else None
        return None

    def _check(self) -> None:
        problems = []
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if SLIDING_ATTENTION in self.layer_types and not self.sliding_window:
            problems.append("sliding_attention layers need a positive sliding_window")
        if MAMBA in self.layer_types and self.mamba_n_heads % self.mamba_n_groups:
            problems.append("mamba_n_heads must be a multiple of mamba_n_groups")
        if self.hidden_act not in ("silu", "gelu"):
            problems.append(f"hidden_act must be 'silu' or 'gelu', got {self.hidden_act!r}")
        if problems:
            raise ValueError("Invalid HybridMegatronConfig: " + "; ".join(problems) + ".")

    def validate(self) -> None:
        """transformers' config checks, with our `layer_types` vocabulary instead of its own."""
        for validator in getattr(PretrainedConfig, "__class_validators__", ()):
            if getattr(validator, "__name__", "") != "validate_layer_type":
                validator(self)
        normalize_layer_types(self.layer_types)
        self._check()

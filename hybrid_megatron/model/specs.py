"""ModuleSpecs of the hybrid stack: which class implements each piece of each layer type.

Two families, chosen by `select_linear_backend`:
- "te": Transformer Engine linears/norms and TEDotProductAttention (GPU with TE installed).
- "local": Megatron's tensor-parallel linears, torch RMSNorm and our HybridCoreAttention
  (CPU, or GPU without TE). Parameter names are mapped to TE's in checkpoints
  (`sharded_state_dict_keys_map`), so a checkpoint saved with one loads with the other.
The Mamba mixer is always `HybridMambaMixer` (mamba-ssm kernels are chosen inside it).
Under context parallelism both families use `HybridCoreAttention`, whose CP path wraps the
local kernel (flash-attn on GPU) the same way on every backend; TE's own CP is not used (its
p2p ring refuses sliding windows).
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    MoETransformerLayer,
    TransformerLayer,
    TransformerLayerSubmodules,
)

from hybrid_megatron.errors import BackendUnavailableError
from hybrid_megatron.model.attention import HybridCoreAttention, HybridSelfAttention
from hybrid_megatron.model.mamba_mixer import HybridMambaMixer, MambaMixerSubmodules
from hybrid_megatron.model.norm import RMSNorm
from hybrid_megatron.model.stack import HybridStack, HybridStackSubmodules


class HybridMLPLayer(TransformerLayer):
    """MLP-only layer: Megatron's MLPLayer, which cannot take the `vp_stage` that the
    interleaved pipeline schedule needs for layer numbering."""


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def select_linear_backend(attention_backend: str, on_cuda: bool) -> str:
    """'te' when requested or (auto) when TE is installed and we run on CUDA, else 'local'."""
    if attention_backend == "te":
        if not transformer_engine_available():
            raise BackendUnavailableError(
                "model.attention_backend is 'te' but transformer-engine is not installed; "
                "pip install 'hybrid-megatron[gpu]' or set model.attention_backend: auto."
            )
        if not on_cuda:
            raise BackendUnavailableError("model.attention_backend 'te' needs a CUDA device.")
        return "te"
    if attention_backend == "auto" and on_cuda and transformer_engine_available():
        return "te"
    return "local"


def hybrid_stack_spec(
    linear_backend: str, num_moe_experts: int | None = None, context_parallel: bool = False
) -> ModuleSpec:
    """The stack spec for `linear_backend` in ('local', 'te')."""
    if linear_backend == "te":
        from megatron.core.extensions.transformer_engine import (
            TEDotProductAttention,
            TELayerNormColumnParallelLinear,
            TENorm,
            TERowParallelLinear,
        )

        norm, qkv, fc1, core, row = (
            IdentityOp,
            TELayerNormColumnParallelLinear,
            TELayerNormColumnParallelLinear,
            TEDotProductAttention,
            TERowParallelLinear,
        )
        final_norm, in_proj = TENorm, TELayerNormColumnParallelLinear
        keys_attn, keys_mlp, keys_mamba = {}, {}, {}
        if context_parallel:
            core = HybridCoreAttention
    else:
        norm, qkv, fc1, core, row = (
            RMSNorm,
            ColumnParallelLinear,
            ColumnParallelLinear,
            HybridCoreAttention,
            RowParallelLinear,
        )
        final_norm, in_proj = RMSNorm, ColumnParallelLinear
        keys_attn = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
        keys_mlp = {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
        keys_mamba = {"norm.": "mixer.in_proj.layer_norm_"}

    moe_spec = IdentityOp
    if num_moe_experts:
        moe_spec = ModuleSpec(
            module=MoETransformerLayer,
            submodules=TransformerLayerSubmodules(
                pre_mlp_layernorm=RMSNorm if linear_backend == "local" else final_norm,
                mlp=get_moe_module_spec(
                    use_te=linear_backend == "te",
                    num_experts=num_moe_experts,
                    moe_grouped_gemm=False,
                ),
                mlp_bda=get_bias_dropout_add,
            ),
        )
    return ModuleSpec(
        module=HybridStack,
        submodules=HybridStackSubmodules(
            mamba_layer=ModuleSpec(
                module=MambaLayer,
                submodules=MambaLayerSubmodules(
                    norm=norm,
                    mixer=ModuleSpec(
                        module=HybridMambaMixer,
                        submodules=MambaMixerSubmodules(in_proj=in_proj, out_proj=row),
                    ),
                    mamba_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map=keys_mamba,
                ),
            ),
            attention_layer=ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    input_layernorm=norm,
                    self_attention=ModuleSpec(
                        module=HybridSelfAttention,
                        params={"attn_mask_type": AttnMaskType.causal},
                        submodules=SelfAttentionSubmodules(
                            linear_qkv=qkv, core_attention=core, linear_proj=row
                        ),
                    ),
                    self_attn_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map=keys_attn,
                ),
            ),
            mlp_layer=ModuleSpec(
                module=HybridMLPLayer,
                submodules=TransformerLayerSubmodules(
                    pre_mlp_layernorm=norm,
                    mlp=ModuleSpec(
                        module=MLP, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=row)
                    ),
                    mlp_bda=get_bias_dropout_add,
                    sharded_state_dict_keys_map=keys_mlp,
                ),
            ),
            moe_layer=moe_spec,
            final_norm=final_norm,
        ),
    )

"""HybridStack: Megatron-Core's MambaStack with our layer placement and final norm.

MambaStack (megatron-core 0.16) splits layers over pipeline stages evenly or by first/last
stage sizes, and hard-codes Transformer Engine's norm. We place layers by the compiled
pattern's stages (the same split we hand Megatron as `pipeline_model_parallel_layout`, so
TransformerLayer's own offset agrees), give every layer its *global* number, support virtual
pipeline chunks, and take the final norm from the spec. Forward, set_input_tensor and
sharded_state_dict are MambaStack's.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from torch import nn

from hybrid_megatron.model.transformer_config import HybridTransformerConfig
from hybrid_megatron.pattern import CompiledPattern, LayerKind


@dataclass
class HybridStackSubmodules(MambaStackSubmodules):
    final_norm: ModuleSpec | type = IdentityOp


class HybridStack(MambaStack):
    """The decoder stack of one pipeline model chunk."""

    def __init__(
        self,
        config: HybridTransformerConfig,
        submodules: HybridStackSubmodules,
        compiled: CompiledPattern,
        pre_process: bool = True,
        post_process: bool = True,
        post_layer_norm: bool = True,
        pg_collection: ProcessGroupCollection | None = None,
        vp_stage: int | None = None,
        **unused,
    ) -> None:
        MegatronModule.__init__(self, config=config)
        assert pg_collection is not None, "pg_collection must be provided"
        self.residual_in_fp32 = False
        self.pre_process = pre_process
        self.post_process = post_process
        self.post_layer_norm = post_layer_norm
        self.pp_group = pg_collection.pp
        self.tp_group = pg_collection.tp
        self.input_tensor = None
        self.vp_stage = vp_stage

        pp_rank, pp_size = self.pp_group.rank(), self.pp_group.size()
        start, end = compiled.stage_of(pp_rank, vp_stage or 0, pp_size)
        self.layer_plans = compiled.layers[start:end]
        self.layer_type_list = [p.kind.megatron_symbol for p in self.layer_plans]
        # TransformerLayer adds Megatron's own offset to the number it is given.
        te_offset = get_transformer_layer_offset(config, vp_stage, pp_rank)
        specs = {
            LayerKind.MAMBA: submodules.mamba_layer,
            LayerKind.FULL_ATTENTION: submodules.attention_layer,
            LayerKind.SLIDING_WINDOW: submodules.attention_layer,
            LayerKind.MLP: submodules.mlp_layer,
            LayerKind.MOE: submodules.moe_layer,
        }
        self.layers = nn.ModuleList()
        for plan in self.layer_plans:
            if plan.kind == LayerKind.MAMBA:
                layer = build_module(
                    specs[plan.kind],
                    config=config,
                    layer_number=plan.number,
                    pp_layer_offset=start,
                    pg_collection=pg_collection,
                )
            else:
                layer = build_module(
                    specs[plan.kind],
                    config=config,
                    layer_number=plan.number - te_offset,
                    pg_collection=pg_collection,
                    vp_stage=vp_stage,
                )
            if layer.layer_number != plan.number:
                raise RuntimeError(
                    f"layer numbering mismatch: planned {plan.number}, built {layer.layer_number}"
                )
            self.layers.append(layer)
        self.num_layers_per_pipeline_rank = len(self.layers)
        if self.post_process and self.post_layer_norm:
            self.final_norm = build_module(
                submodules.final_norm, config, config.hidden_size, eps=config.layernorm_epsilon
            )

"""Build the hybrid model (one pipeline model chunk) on Megatron-Core's MambaModel."""

from __future__ import annotations

import torch
from megatron.core.models.mamba.mamba_model import MambaModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import ModuleSpec

from hybrid_megatron.config import RunConfig
from hybrid_megatron.errors import BackendUnavailableError
from hybrid_megatron.model.specs import hybrid_stack_spec, select_linear_backend
from hybrid_megatron.model.transformer_config import (
    HybridTransformerConfig,
    build_transformer_config,
)
from hybrid_megatron.pattern import CompiledPattern


class HybridModel(MambaModel):
    """Megatron's MambaModel that knows its virtual pipeline stage.

    MambaModel (megatron-core 0.16) leaves `vp_stage` None, so with interleaved pipelining
    the tied embedding / output weight would not be recognised as first / last stage (wrong
    initial sync, gradient all-reduce and checkpoint keys). The stage is set before Megatron
    wires up the shared weights.
    """

    def __init__(self, *args, vp_stage: int | None = None, **kwargs) -> None:
        object.__setattr__(self, "_hybrid_vp_stage", vp_stage)
        super().__init__(*args, **kwargs)
        self.vp_stage = vp_stage

    def setup_embeddings_and_output_layer(self) -> None:
        self.vp_stage = self._hybrid_vp_stage
        super().setup_embeddings_and_output_layer()


def build_model(
    cfg: RunConfig,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    params_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    compiled: CompiledPattern | None = None,
    tconfig: HybridTransformerConfig | None = None,
) -> MambaModel:
    """One model chunk for this rank. Model-parallel state must be initialised first
    (`hybrid_megatron.distributed.initialize`)."""
    compiled = compiled or cfg.compiled
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tconfig = tconfig or build_transformer_config(
        cfg, compiled, params_dtype=params_dtype, use_cpu_initialization=device.type == "cpu"
    )
    if device.type == "cpu":
        # gloo runs a batch of isend/irecv one by one; in the interleaved schedule the
        # activations and gradients crossing between the same two ranks then pair with the
        # wrong receives (same shapes, silently wrong numbers). Unbatched p2p orders them.
        tconfig.batch_p2p_comm = False
    linear_backend = select_linear_backend(cfg.model.attention_backend, device.type == "cuda")
    if cfg.model.num_moe_experts and linear_backend == "local":
        raise BackendUnavailableError(
            "MoE layers ('E') need Transformer Engine: megatron-core 0.16's MoE router calls TE "
            "kernels. Install the gpu extra on a CUDA host or use '-' (dense MLP) instead."
        )
    spec = hybrid_stack_spec(
        linear_backend, cfg.model.num_moe_experts, context_parallel=cfg.parallel.context > 1
    )
    spec = ModuleSpec(
        module=spec.module,
        submodules=spec.submodules,
        params={"compiled": compiled, "vp_stage": vp_stage},
    )
    uses_rope = any(p.rope for p in compiled.layers if p.kind.is_attention)
    model = HybridModel(
        vp_stage=vp_stage,
        config=tconfig,
        mamba_stack_spec=spec,
        vocab_size=cfg.model.padded_vocab_size(cfg.parallel.tensor),
        max_sequence_length=cfg.model.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=cfg.model.tie_embeddings,
        position_embedding_type="rope" if uses_rope else "none",
        rotary_base=tconfig.rotary_base,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )
    return model.to(device)

"""Norm modules for the local (non-Transformer-Engine) spec."""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint


class RMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm with Megatron's constructor and sequence-parallel grad marking.

    Under sequence parallelism each rank sees a slice of the sequence, so the weight's
    gradient is partial; Megatron all-reduces grads of parameters marked `sequence_parallel`.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


class GatedRMSNorm(torch.nn.Module):
    """Mamba-2's grouped RMSNorm of `y * silu(z)` over this rank's channels (TP-sharded)."""

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-5, dtype=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.group_size = group_size
        self.eps = eps
        self.weight.tensor_model_parallel = True

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        from hybrid_megatron.kernels.mamba_ops import gated_rms_norm

        return gated_rms_norm(x, z, self.weight, eps=self.eps, group_size=self.group_size)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state_dict, prefix, {"weight": 0}, sharded_offsets
        )

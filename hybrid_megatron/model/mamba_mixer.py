"""Mamba-2 mixer with Megatron-Core's parameter layout and pluggable SSD kernels.

Megatron-Core's `MambaMixer` refuses to build without mamba-ssm, substitutes a mock for its
gated RMSNorm, and its module imports Triton at import time. `HybridMambaMixer` keeps the
same parameters, names, TP sharding and checkpoint keys (in_proj split into z/x/B/C/dt and
conv1d into x/B/C, each sharded over TP), so dist checkpoints are interchangeable, and
computes with `hybrid_megatron.kernels`: mamba-ssm's kernels when installed and on CUDA,
else the pure-torch chunked SSD.

in_proj output per TP rank: [z (d_inner), x (d_inner), B (g*n), C (g*n), dt (heads)].

Under context parallelism the conv and the scan run through `context_parallel.mamba` (conv
halo + SSM state passing, exact; heads are not split over CP ranks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)
from torch import nn

from hybrid_megatron.context_parallel.mamba import context_parallel_conv, context_parallel_ssd
from hybrid_megatron.kernels.mamba_ops import causal_conv1d
from hybrid_megatron.kernels.ssd import select_ssd_impl
from hybrid_megatron.model.norm import GatedRMSNorm
from hybrid_megatron.model.transformer_config import HybridTransformerConfig


@dataclass
class MambaMixerSubmodules:
    """Specs of the mixer's input and output projections (same fields as Megatron's)."""

    in_proj: ModuleSpec | type | None = None
    out_proj: ModuleSpec | type | None = None


def _split_factory(sh_ten: ShardedTensor, sizes: list[int], names: list[str]):
    """Checkpoint a TP-local tensor as independent, separately TP-sharded row blocks."""
    template = sh_ten.without_data()

    @torch.no_grad()
    def build(key, t, replica_id, flattened_range):
        whole = replace(
            template,
            key=key,
            data=t,
            dtype=t.dtype,
            replica_id=replica_id,
            flattened_range=flattened_range,
        )
        parts, start = [], 0
        for size, name in zip(sizes, names):
            for part in whole.narrow(0, start, size):
                part.key = f"{part.key}.{name}"
                parts.append(part)
            start += size
        return parts

    @torch.no_grad()
    def merge(sub_state_dict):
        return torch.cat(sub_state_dict)

    return ShardedTensorFactory(sh_ten.key, sh_ten.data, build, merge, sh_ten.replica_id)


class HybridMambaMixer(MegatronModule):
    """Mamba-2 mixer (conv + SSD + gated norm); input/output [l, b, d_model]."""

    def __init__(
        self,
        config: HybridTransformerConfig,
        submodules: MambaMixerSubmodules,
        d_model: int,
        layer_number: int | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        pp_layer_offset: int = 0,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
    ):
        super().__init__(config)
        assert pg_collection is not None, "pg_collection must be provided"
        self.config = config
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        self.cp_group = getattr(pg_collection, "cp", None)
        self.layer_number = layer_number
        self.d_model = d_model
        self.d_state = config.mamba_state_dim
        self.headdim = config.mamba_head_dim
        self.ngroups = config.mamba_num_groups
        self.nheads = config.mamba_num_heads
        self.d_inner = self.nheads * self.headdim
        self.d_conv = config.mamba_conv_kernel
        self.chunk_size = config.mamba_chunk_size
        self.D_has_hdim = False
        tp = self.tp_group.size()
        self.nheads_local_tp = self.nheads // tp
        self.d_inner_local_tp = self.d_inner // tp
        self.ngroups_local_tp = self.ngroups // tp

        self.in_proj = build_module(
            submodules.in_proj,
            d_model,
            self.d_inner * 2 + 2 * self.ngroups * self.d_state + self.nheads,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="fc1",
            tp_group=self.tp_group,
        )
        conv_dim = self.d_inner_local_tp + 2 * self.ngroups_local_tp * self.d_state
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        with get_cuda_rng_tracker().fork():
            self.conv1d = nn.Conv1d(
                conv_dim,
                conv_dim,
                kernel_size=self.d_conv,
                groups=conv_dim,
                padding=self.d_conv - 1,
                bias=True,
                device=device,
                dtype=config.params_dtype,
            )
            nn.init.kaiming_uniform_(self.conv1d.weight, a=math.sqrt(5))
            dt = torch.exp(
                torch.rand(self.nheads_local_tp, device=device)
                * (math.log(dt_max) - math.log(dt_min))
                + math.log(dt_min)
            ).clamp(min=dt_init_floor)
            self.dt_bias = nn.Parameter((dt + torch.log(-torch.expm1(-dt))).to(config.params_dtype))
            A = torch.empty(self.nheads_local_tp, dtype=torch.float32, device=device)
            self.A_log = nn.Parameter(torch.log(A.uniform_(*A_init_range)))
        self.D = nn.Parameter(torch.ones(self.nheads_local_tp, device=device))
        self.norm = GatedRMSNorm(
            self.d_inner_local_tp,
            group_size=self.d_inner_local_tp // self.ngroups_local_tp,
            eps=1e-5,
            dtype=config.params_dtype,
        )
        for p in (self.conv1d.weight, self.conv1d.bias, self.dt_bias, self.A_log, self.D):
            p.tensor_model_parallel = True
        self.out_proj = build_module(
            submodules.out_proj,
            self.d_inner,
            d_model,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="fc2",
            tp_group=self.tp_group,
        )

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Checkpoint keys and sharding identical to Megatron-Core's MambaMixer."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        own: dict = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        sd = make_sharded_tensors_for_checkpoint(
            own, prefix, {"A_log": 0, "dt_bias": 0, "D": 0}, sharded_offsets
        )
        for name, module in self.named_children():
            if name == "conv1d":
                sd.update(
                    make_sharded_tensors_for_checkpoint(
                        module.state_dict(prefix="", keep_vars=True),
                        f"{prefix}{name}.",
                        {"weight": 0, "bias": 0},
                        sharded_offsets,
                        tp_group=self.tp_group,
                        dp_cp_group=metadata["dp_cp_group"],
                    )
                )
            else:
                sd.update(
                    sharded_state_dict_default(
                        module,
                        f"{prefix}{name}.",
                        sharded_offsets,
                        metadata,
                        tp_group=self.tp_group,
                    )
                )
        gn = self.ngroups_local_tp * self.d_state
        sd[f"{prefix}in_proj.weight"] = _split_factory(
            sd[f"{prefix}in_proj.weight"],
            [self.d_inner_local_tp, self.d_inner_local_tp, gn, gn, self.nheads_local_tp],
            ["z", "x", "B", "C", "dt"],
        )
        for key in ("conv1d.weight", "conv1d.bias"):
            sd[f"{prefix}{key}"] = _split_factory(
                sd[f"{prefix}{key}"], [self.d_inner_local_tp, gn, gn], ["x", "B", "C"]
            )
        return sd

    def split_in_proj(self, zxBCdt: torch.Tensor):
        """Split the in_proj output [..., local] into z, xBC, dt."""
        return torch.split(
            zxBCdt,
            [self.d_inner_local_tp, self.conv1d.in_channels, self.nheads_local_tp],
            dim=-1,
        )

    def ssm(self, xBC: torch.Tensor, dt: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Conv + SSD + gated norm on [b, l, *] tensors; returns y [b, l, d_inner_local]."""
        b, l, _ = xBC.shape
        cp = self.cp_group is not None and self.cp_group.size() > 1
        weight = self.conv1d.weight.squeeze(1)

        def conv(x: torch.Tensor, initial: torch.Tensor | None = None) -> torch.Tensor:
            return causal_conv1d(x, weight, self.conv1d.bias, "silu", initial_state=initial)

        if cp:
            xBC = context_parallel_conv(xBC, conv, self.d_conv, self.cp_group)
        else:
            xBC = conv(xBC.transpose(1, 2)).transpose(1, 2)
        x, B, C = torch.split(
            xBC,
            [
                self.d_inner_local_tp,
                self.ngroups_local_tp * self.d_state,
                self.ngroups_local_tp * self.d_state,
            ],
            dim=-1,
        )
        ssd = select_ssd_impl(self.config.kernel_mamba_backend)
        args = (
            x.reshape(b, l, self.nheads_local_tp, self.headdim),
            dt,
            -torch.exp(self.A_log.float()),
            B.reshape(b, l, self.ngroups_local_tp, self.d_state),
            C.reshape(b, l, self.ngroups_local_tp, self.d_state),
            self.chunk_size,
        )
        if cp:
            y = context_parallel_ssd(
                ssd, *args, D=self.D, dt_bias=self.dt_bias, group=self.cp_group
            )
        else:
            y = ssd(*args, D=self.D, dt_bias=self.dt_bias, dt_softplus=True)
        return self.norm(y.reshape(b, l, -1), z)

    def forward(
        self,
        hidden_states,
        inference_context=None,
        *,
        inference_params=None,
        packed_seq_params=None,
    ):
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError(
                "Megatron inference contexts are not supported; generate with the HF model."
            )
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences are not supported by the Mamba mixer")
        zxBCdt, _ = self.in_proj(hidden_states)  # [l, b, local]
        z, xBC, dt = self.split_in_proj(zxBCdt.transpose(0, 1))
        y = self.ssm(xBC, dt, z)
        out, out_bias = self.out_proj(y.transpose(0, 1).contiguous())
        return out, out_bias

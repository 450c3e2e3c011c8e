"""Megatron-Core optimizer (AdamW, optionally distributed) and its LR/WD scheduler."""

from __future__ import annotations

import torch
from megatron.core.optimizer import MegatronOptimizer, get_megatron_optimizer
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from hybrid_megatron.config import RunConfig
from hybrid_megatron.megatron_compat.cpu import cuda_tensor_type_names
from hybrid_megatron.megatron_compat.optimizer_state import (
    patch_distributed_optimizer_state_loading,
)

_MEGATRON_DECAY_STYLE = {"cosine": "cosine", "linear": "linear", "constant": "constant"}


def build_optimizer(cfg: RunConfig, chunks: list[torch.nn.Module], bf16: bool) -> MegatronOptimizer:
    """AdamW over the DDP-wrapped chunks; fp32 main params and grads when training in bf16."""
    o = cfg.optimizer
    config = MegatronOptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.beta1,
        adam_beta2=o.beta2,
        adam_eps=o.eps,
        clip_grad=o.clip_grad,
        bf16=bf16,
        fp16=False,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=o.distributed,
    )
    patch_distributed_optimizer_state_loading()
    with cuda_tensor_type_names():
        optimizer = get_megatron_optimizer(config, chunks)
    return CpuSafeOptimizer.wrap(optimizer)


class CpuSafeOptimizer:
    """Delegates to a Megatron optimizer; runs `step` inside `cuda_tensor_type_names`."""

    def __init__(self, inner: MegatronOptimizer) -> None:
        self._inner = inner

    @classmethod
    def wrap(cls, optimizer: MegatronOptimizer) -> MegatronOptimizer:
        return cls(optimizer)  # type: ignore[return-value]

    def step(self):
        with cuda_tensor_type_names():
            return self._inner.step()

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def build_scheduler(cfg: RunConfig, optimizer: MegatronOptimizer) -> OptimizerParamScheduler:
    """Warmup then cosine / linear / constant decay, or warmup-stable-decay (WSD), per step."""
    o, steps = cfg.optimizer, cfg.train.steps
    style = "WSD" if o.schedule == "wsd" else _MEGATRON_DECAY_STYLE[o.schedule]
    wsd_decay = o.wsd_decay_steps if o.wsd_decay_steps is not None else max(1, steps // 5)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=steps,
        lr_decay_style=style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
        wsd_decay_steps=wsd_decay if o.schedule == "wsd" else None,
        lr_wsd_decay_style=o.wsd_decay_style if o.schedule == "wsd" else None,
    )


def init_empty_optimizer_state(optimizer) -> None:
    """Give every parameter of a fresh torch Adam its state tensors (zeros, step 0).

    Megatron's distributed optimizer reads the Adam `step` from the per-parameter state when
    building the sharded state dict to load into; a torch Adam that has not stepped yet has
    none. (With TE/Apex fused Adam the step lives in the param groups and this is a no-op.)
    """
    inner = getattr(optimizer, "_inner", optimizer)
    for opt in getattr(inner, "chained_optimizers", [inner]):
        torch_opt = opt.optimizer
        if not isinstance(torch_opt, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in torch_opt.param_groups:
            for p in group["params"]:
                state = torch_opt.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

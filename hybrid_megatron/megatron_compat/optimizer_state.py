"""Megatron-Core 0.16 distributed-optimizer fix for torch's Adam (no TE / Apex fused Adam).

With torch's Adam the per-parameter state carries a `step` tensor. Loading a
`fully_reshardable` checkpoint copies every key of that state from the checkpoint, which
stores only param / exp_avg / exp_avg_sq (the step is restored separately from the param
groups), so the load fails with KeyError 'step'. The patch copies the keys the checkpoint
has and leaves the step Megatron already restored. It changes nothing when TE or Apex Adam
is used (their state has no `step`).
"""

from __future__ import annotations

_PATCHED = False


def patch_distributed_optimizer_state_loading() -> None:
    global _PATCHED
    if _PATCHED:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        missing = {"exp_avg", "exp_avg_sq", "param"} - set(tensors)
        if missing:
            raise KeyError(f"optimizer checkpoint lacks {sorted(missing)} for a parameter")
        main_param.detach().copy_(tensors["param"])
        for key, value in state.items():
            if key in tensors:
                value.copy_(tensors[key])

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    _PATCHED = True


def untie_adam_steps(optimizer) -> None:
    """Give each parameter its own Adam `step` tensor after a checkpoint load.

    Megatron-Core's distributed optimizer restores torch Adam's step by assigning one shared
    tensor to every parameter's state; torch then increments it once per parameter per step,
    so the bias correction of the following steps would be wrong.
    """
    inner = getattr(optimizer, "_inner", optimizer)
    for opt in getattr(inner, "chained_optimizers", [inner]):
        for state in opt.optimizer.state.values():
            step = state.get("step")
            if step is not None and hasattr(step, "clone"):
                state["step"] = step.detach().clone()

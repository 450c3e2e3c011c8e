"""Checks of the config against this machine and job, before any data or model work.

`RunConfig.validate` checks values on their own; this adds what depends on the environment:
the device, the kernel packages a requested backend needs, and the world size the job runs
with (the same rule `check` applies). Every failure is a ConfigError (exit 2).
"""

from __future__ import annotations

from hybrid_megatron.config import RunConfig, validate_parallel
from hybrid_megatron.errors import ConfigError


def trains_on_cuda(cfg: RunConfig) -> bool:
    import torch

    if cfg.train.device == "cuda":
        return True
    return cfg.train.device == "auto" and torch.cuda.is_available()


def check_environment(cfg: RunConfig, world_size: int) -> None:
    """Device, kernel packages and world size; raise ConfigError naming the fix."""
    import torch

    m = cfg.model
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.device is 'cuda' but no CUDA device is visible here "
            "(torch.cuda.is_available() is False); use train.device: auto or cpu, or run on a "
            "GPU node."
        )
    cuda = trains_on_cuda(cfg)
    if m.attention_backend in ("flash_attn", "te", "flex"):
        from hybrid_megatron.kernels.attention import available_backends

        if not available_backends().get(m.attention_backend, False):
            raise ConfigError(
                f"model.attention_backend is {m.attention_backend!r} but its package is not "
                "installed (or does not import) here; install it (pip install "
                "'hybrid-megatron[gpu]' on a CUDA host) or set model.attention_backend: auto."
            )
        if m.attention_backend in ("flash_attn", "te") and not cuda:
            raise ConfigError(
                f"model.attention_backend {m.attention_backend!r} needs CUDA training; this "
                "run trains on CPU. Set model.attention_backend: auto."
            )
    if m.mamba_backend == "mamba_ssm":
        from hybrid_megatron.kernels.ssd import mamba_backend_available

        if not mamba_backend_available():
            raise ConfigError(
                "model.mamba_backend is 'mamba_ssm' but mamba_ssm / causal_conv1d are not "
                "installed (or do not import) here; install them (pip install "
                "'hybrid-megatron[gpu]' on a CUDA host) or set model.mamba_backend: auto."
            )
        if not cuda:
            raise ConfigError(
                "model.mamba_backend 'mamba_ssm' needs CUDA training (Triton kernels); this run "
                "trains on CPU. Set model.mamba_backend: auto."
            )
    validate_parallel(m, cfg.parallel, world_size)

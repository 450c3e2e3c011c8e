"""Model FLOPs per layer and per training step, device peak FLOP/s, and MFU.

Conventions (one place, so every number in the logs means the same thing):

* A multiply-add is 2 FLOPs. We count contractions only: matmuls, einsums and the Mamba
  depthwise convolution. Elementwise work (norms, the Mamba gated norm, softmax,
  activations, RoPE, SSD decay exponentials, residual adds) is left out, as in the
  PaLM / Megatron MFU convention; it is O(s * h) per layer and not tensor-core work.
* Attention counts *useful causal* FLOPs, like FlashAttention's benchmarks: query i
  (0-based) meets min(i + 1, W) keys (W = s for full attention), so a full-attention
  layer does 2 * 2 * head_dim * heads * s(s+1)/2 FLOPs for scores and values (about
  s^2 / 2 pairs, not s^2), and SWA is summed exactly over positions (not s * W).
  NoPE changes nothing.
* Mamba-2's SSD scan is counted as `kernels/ssd.py::ssd_chunk_scan` executes it: within
  a chunk the C.B^T and masked (weights @ x) matmuls are dense (the causal mask is applied
  to the product), so each chunk of length l costs l^2 pairs; padding of the last chunk
  is not counted.
* Training = 3 x forward (backward is 2 x forward). Activation recomputation is not
  counted: these are *model* FLOPs, so MFU does not reward recomputing.
* The logits matmul is 2 * s * h * V with the unpadded vocab; the embedding lookup is free.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from hybrid_megatron.config import ModelConfig, RunConfig
from hybrid_megatron.pattern import CompiledPattern, LayerKind, compile_pattern

PEAK_ENV_VAR = "HM_PEAK_TFLOPS"

__all__ = [
    "LayerFlops",
    "attention_pairs",
    "layer_flops",
    "mfu",
    "model_flops_per_sequence",
    "peak_flops_for_name",
    "peak_flops_per_device",
    "ssd_chunk_pairs",
    "tflops_per_device",
]


@dataclass(frozen=True)
class LayerFlops:
    """Forward FLOPs of one layer for one sequence.

    `matmul`: projections against weights (QKV/out, in/out_proj, MLP, router, experts).
    `mixer`: sequence mixing (attention scores + values, or Mamba conv + SSD scan).
    """

    number: int
    kind: LayerKind
    matmul: int
    mixer: int

    @property
    def total(self) -> int:
        return self.matmul + self.mixer


def attention_pairs(seq_length: int, window: int | None = None) -> int:
    """Causal (query, key) pairs: sum over i < s of min(i + 1, W); s(s+1)/2 with no window."""
    s = seq_length
    w = s if window is None else min(window, s)
    # positions 0..w-1 see i+1 keys (a triangle), the remaining s-w see exactly w keys
    return w * (w + 1) // 2 + (s - w) * w


def ssd_chunk_pairs(seq_length: int, chunk_size: int) -> int:
    """Sum of squared chunk lengths: pairs in the dense intra-chunk SSD blocks."""
    full, rest = divmod(seq_length, chunk_size)
    return full * chunk_size**2 + rest**2


def _attention_flops(m: ModelConfig, s: int, window: int | None) -> tuple[int, int]:
    h, d, heads, groups = m.hidden_size, m.head_dim, m.num_attention_heads, m.query_groups
    qkv = 2 * s * h * (heads + 2 * groups) * d
    out = 2 * s * heads * d * h
    scores_and_values = 2 * 2 * heads * d * attention_pairs(s, window)
    return qkv + out, scores_and_values


def _mlp_flops(m: ModelConfig, s: int) -> int:
    matrices = 3 if m.activation == "swiglu" else 2
    return 2 * s * matrices * m.hidden_size * m.ffn_size


def _moe_flops(m: ModelConfig, s: int) -> int:
    router = 2 * s * m.hidden_size * (m.num_moe_experts or 1)
    return router + m.moe_router_topk * _mlp_flops(m, s)


def _mamba_flops(m: ModelConfig, s: int) -> tuple[int, int]:
    mb, h = m.mamba, m.hidden_size
    heads, p, n, g = m.mamba_num_heads, mb.head_dim, mb.state_dim, mb.num_groups
    d_inner = heads * p
    in_proj = 2 * s * h * (2 * d_inner + 2 * g * n + heads)  # z, x, B, C, dt
    out_proj = 2 * s * d_inner * h
    conv = 2 * s * mb.conv_kernel * (d_inner + 2 * g * n)  # depthwise over x, B, C
    chunks = math.ceil(s / mb.chunk_size)
    pairs = ssd_chunk_pairs(s, mb.chunk_size)
    scan = (
        2 * pairs * g * n  # 1) B C^T inside each chunk, once per group
        + 2 * pairs * heads * p  # 1) masked weights @ (dt x), per head
        + 2 * s * heads * p * n  # 2) chunk end states: (decayed x)^T B
        + 2 * chunks * heads * p * n  # 3) state passing: state * decay + chunk state
        + 2 * s * heads * p * n  # 4) incoming state read out: C . state
    )
    return in_proj + out_proj, conv + scan


def layer_flops(
    model_cfg: ModelConfig, compiled: CompiledPattern, seq_length: int
) -> list[LayerFlops]:
    """Forward FLOPs per sequence of every layer in `compiled` (see module conventions)."""
    out = []
    for plan in compiled.layers:
        if plan.kind.is_attention:
            matmul, mixer = _attention_flops(model_cfg, seq_length, plan.window)
        elif plan.kind == LayerKind.MAMBA:
            matmul, mixer = _mamba_flops(model_cfg, seq_length)
        elif plan.kind == LayerKind.MOE:
            matmul, mixer = _moe_flops(model_cfg, seq_length), 0
        else:
            matmul, mixer = _mlp_flops(model_cfg, seq_length), 0
        out.append(LayerFlops(plan.number, plan.kind, matmul, mixer))
    return out


def model_flops_per_sequence(
    cfg: ModelConfig | RunConfig, seq_length: int | None = None, training: bool = True
) -> int:
    """Model FLOPs for one sequence: all layers + logits, x3 when `training`.

    `seq_length` defaults to the config's. Multiply by sequences per step for a step's FLOPs.
    """
    m = cfg.model if isinstance(cfg, RunConfig) else cfg
    compiled = cfg.compiled if isinstance(cfg, RunConfig) else compile_pattern(m)
    s = seq_length or m.seq_length
    forward = sum(lf.total for lf in layer_flops(m, compiled, s))
    forward += 2 * s * m.hidden_size * m.vocab_size
    return 3 * forward if training else forward


# --------------------------------------------------------------------------- peak FLOP/s

# Dense (no structured sparsity) vendor peaks per GPU, FLOP/s: (bf16/fp16, tf32, fp32).
# Matched in order against torch.cuda.get_device_name(): specific names first.
_PEAKS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("GH200", (989.4e12, 494.7e12, 66.9e12)),
    ("H200 NVL", (835.5e12, 417.5e12, 60.0e12)),
    ("H200", (989.4e12, 494.7e12, 66.9e12)),
    ("H100 NVL", (835.5e12, 417.5e12, 60.0e12)),
    ("H100 PCIE", (756.0e12, 378.0e12, 51.2e12)),
    ("H100", (989.4e12, 494.7e12, 66.9e12)),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("B200", (2250e12, 1100e12, 75e12)),
    ("A100", (312e12, 156e12, 19.5e12)),
)


def _dtype_column(dtype: torch.dtype | str, tf32: bool) -> int | None:
    name = str(dtype).removeprefix("torch.").lower()
    if name in ("bfloat16", "bf16", "float16", "fp16", "half"):
        return 0
    if name in ("float32", "fp32", "float"):
        return 1 if tf32 else 2
    if name == "tf32":
        return 1
    return None


def peak_flops_for_name(
    device_name: str, dtype: torch.dtype | str, tf32: bool = False
) -> float | None:
    """Dense peak FLOP/s of a GPU named `device_name` for `dtype` (fp32 uses the TF32 peak
    when `tf32`); None for unknown GPUs or dtypes."""
    col = _dtype_column(dtype, tf32)
    upper = device_name.upper()
    for key, peaks in _PEAKS:
        if key in upper:
            return None if col is None else peaks[col]
    return None


def peak_flops_per_device(
    device: torch.device | str, dtype: torch.dtype | str, peak_tflops: float | None = None
) -> float | None:
    """Peak FLOP/s of one device: `peak_tflops` (TFLOP/s) if given, else $HM_PEAK_TFLOPS,
    else the table for a known CUDA GPU; None when unknown (e.g. CPU), so MFU is null."""
    if peak_tflops is None and os.environ.get(PEAK_ENV_VAR):
        try:
            peak_tflops = float(os.environ[PEAK_ENV_VAR])
        except ValueError as e:
            raise ValueError(
                f"${PEAK_ENV_VAR}={os.environ[PEAK_ENV_VAR]!r} is not a number; set it to the "
                "device's dense peak in TFLOP/s, e.g. 989.4."
            ) from e
    if peak_tflops is not None:
        if peak_tflops <= 0:
            raise ValueError(f"peak TFLOP/s must be positive, got {peak_tflops}.")
        return peak_tflops * 1e12
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    tf32 = (
        torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    )
    return peak_flops_for_name(torch.cuda.get_device_name(device), dtype, tf32=tf32)


def tflops_per_device(flops_per_step: float, seconds_per_step: float, num_devices: int) -> float:
    """Achieved model TFLOP/s per device: a step's model FLOPs (all ranks together, e.g.
    `model_flops_per_sequence * global_batch_size`) shared by `num_devices` (world size)."""
    return flops_per_step / seconds_per_step / num_devices / 1e12


def mfu(flops_per_s_per_device: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation as a fraction (0.38 = 38%); None when the peak is unknown."""
    if not peak_flops:
        return None
    return flops_per_s_per_device / peak_flops

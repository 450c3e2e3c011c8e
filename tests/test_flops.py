"""FLOP counts per layer kind (hand-computed), scaling laws, params cross-check, peaks, MFU."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hybrid_megatron.config import AttentionTypeConfig, MambaConfig, ModelConfig, RunConfig
from hybrid_megatron.kernels.ssd import ssd_chunk_scan
from hybrid_megatron.model.params import count_params, layer_params
from hybrid_megatron.pattern import LayerKind, compile_pattern
from hybrid_megatron.training import flops as F


def tiny(pattern: str = "M-S-*-", **kw) -> ModelConfig:
    # h=16, 4 heads of dim 4, 2 KV groups; Mamba: d_inner 32 = 8 heads x 4, n=2, g=1, k=3, Q=4
    base = dict(
        pattern=pattern,
        hidden_size=16,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=24,
        vocab_size=32,
        seq_length=10,
        swa=AttentionTypeConfig(window=3),
        mamba=MambaConfig(
            state_dim=2, head_dim=4, num_groups=1, expand=2, conv_kernel=3, chunk_size=4
        ),
    )
    base.update(kw)
    return ModelConfig(**base)


def by_kind(m: ModelConfig, s: int) -> dict[LayerKind, F.LayerFlops]:
    return {lf.kind: lf for lf in F.layer_flops(m, compile_pattern(m), s)}


def test_full_attention_hand_count():
    lf = by_kind(tiny(), 10)[LayerKind.FULL_ATTENTION]
    # q: 16x16, k and v: 16x8 each (2 groups x dim 4), out: 16x16 -> 2 * 10 tokens * 640 MACs
    assert lf.matmul == 2 * 10 * (16 * 16 + 2 * 16 * 8 + 16 * 16)
    # causal pairs 1 + 2 + ... + 10 = 55; QK^T and PV: 2 matmuls x 4 heads x dim 4 MACs each
    assert lf.mixer == 2 * 2 * 4 * 4 * 55


def test_swa_hand_count_sums_min_of_position_and_window():
    lf = by_kind(tiny(), 10)[LayerKind.SLIDING_WINDOW]
    pairs = 1 + 2 + 3 + 3 * 7  # window 3: the first 3 queries see 1, 2, 3 keys, the rest 3
    assert lf.mixer == 2 * 2 * 4 * 4 * pairs
    assert lf.matmul == by_kind(tiny(), 10)[LayerKind.FULL_ATTENTION].matmul


def test_mlp_and_moe_hand_count():
    assert by_kind(tiny(), 10)[LayerKind.MLP].matmul == 2 * 10 * 3 * 16 * 24  # gate, up, down
    gelu = tiny(activation="gelu")
    assert by_kind(gelu, 10)[LayerKind.MLP].matmul == 2 * 10 * 2 * 16 * 24
    moe = tiny("M-S*E", num_moe_experts=4, moe_router_topk=2)
    lf = by_kind(moe, 10)[LayerKind.MOE]
    assert lf.matmul == 2 * 10 * 16 * 4 + 2 * (2 * 10 * 3 * 16 * 24)  # router + 2 experts
    assert lf.mixer == 0


def test_mamba_hand_count():
    lf = by_kind(tiny(), 10)[LayerKind.MAMBA]
    d_inner, heads, p, n, g, k = 32, 8, 4, 2, 1, 3
    in_proj = 16 * (d_inner + d_inner + n + n + heads)  # z, x, B, C, dt
    out_proj = d_inner * 16
    assert lf.matmul == 2 * 10 * (in_proj + out_proj)
    conv = 10 * k * (d_inner + 2 * n)  # depthwise: k taps per channel per token
    scan = 0
    for length in (4, 4, 2):  # chunks of 4 over 10 tokens
        scan += length * length * g * n  # C.B^T per group
        scan += length * length * heads * p  # masked weights @ x per head
        scan += length * heads * p * n  # chunk end state (x^T B)
        scan += heads * p * n  # state passing
        scan += length * heads * p * n  # C . incoming state
    assert lf.mixer == 2 * (conv + scan)


def test_ssd_einsums_match_torch_flop_counter():
    m = tiny(mamba=MambaConfig(state_dim=5, head_dim=3, num_groups=2, num_heads=4, chunk_size=4))
    s, heads, p, n, g = 12, 4, 3, 5, 2
    x, dt = torch.randn(1, s, heads, p), torch.rand(1, s, heads)
    B, C = torch.randn(1, s, g, n), torch.randn(1, s, g, n)
    with FlopCounterMode(display=False) as counter:
        ssd_chunk_scan(x, dt, -torch.rand(heads), B, C, 4)
    lf = by_kind(m, s)[LayerKind.MAMBA]
    conv = 2 * s * m.mamba.conv_kernel * (heads * p + 2 * g * n)
    state_passing = 2 * 3 * heads * p * n  # elementwise FMA, invisible to the counter
    assert lf.mixer - conv - state_passing == counter.get_total_flops()


def test_swa_less_than_full_and_equal_when_window_covers_sequence():
    m = tiny()
    swa, full = by_kind(m, 10)[LayerKind.SLIDING_WINDOW], by_kind(m, 10)[LayerKind.FULL_ATTENTION]
    assert swa.mixer < full.mixer
    for w in (10, 11, 1000):
        wide = tiny(swa=AttentionTypeConfig(window=w))
        assert by_kind(wide, 10)[LayerKind.SLIDING_WINDOW].mixer == full.mixer
    one = by_kind(tiny(swa=AttentionTypeConfig(window=1)), 10)[LayerKind.SLIDING_WINDOW]
    assert one.mixer == 2 * 2 * 4 * 4 * 10  # each token sees only itself


def test_scaling_with_sequence_length():
    m = tiny(swa=AttentionTypeConfig(window=16))
    a, b = by_kind(m, 4096), by_kind(m, 8192)
    full = b[LayerKind.FULL_ATTENTION].mixer / a[LayerKind.FULL_ATTENTION].mixer
    assert full == pytest.approx(4.0, rel=1e-3)  # quadratic
    swa = b[LayerKind.SLIDING_WINDOW].mixer / a[LayerKind.SLIDING_WINDOW].mixer
    assert swa == pytest.approx(2.0, rel=1e-2)  # linear for s >> W
    assert b[LayerKind.MAMBA].total == 2 * a[LayerKind.MAMBA].total  # linear (whole chunks)
    for kind in (LayerKind.MLP, LayerKind.FULL_ATTENTION, LayerKind.MAMBA):
        assert b[kind].matmul == 2 * a[kind].matmul


def test_matmul_flops_are_twice_the_weight_matrix_params():
    m = ModelConfig(pattern="M-S-*-M-", num_query_groups=2)  # h=256, defaults elsewhere
    s = 64
    mb, h = m.mamba, m.hidden_size
    d_inner = m.mamba_num_heads * mb.head_dim
    conv_params = (d_inner + 2 * mb.num_groups * mb.state_dim) * (mb.conv_kernel + 1)
    non_matrix = {
        LayerKind.MAMBA: h + conv_params + 3 * m.mamba_num_heads + d_inner,
        LayerKind.FULL_ATTENTION: h,
        LayerKind.SLIDING_WINDOW: h,
        LayerKind.MLP: h,
    }
    layers = F.layer_flops(m, compile_pattern(m), s)
    for lf in layers:
        assert lf.matmul == 2 * s * (layer_params(m, lf.kind) - non_matrix[lf.kind]), lf.kind
    per_token = sum(lf.matmul for lf in layers) / s
    assert per_token == pytest.approx(2 * count_params(m)["non_embedding"], rel=0.02)


def test_model_flops_per_sequence_adds_logits_and_triples_for_training():
    m = tiny()
    forward = sum(lf.total for lf in F.layer_flops(m, compile_pattern(m), 10)) + 2 * 10 * 16 * 32
    assert F.model_flops_per_sequence(m, 10, training=False) == forward
    assert F.model_flops_per_sequence(m, 10) == 3 * forward
    assert F.model_flops_per_sequence(RunConfig(model=m)) == 3 * forward  # seq_length from cfg


def test_nope_changes_nothing():
    rope = tiny(full_attention=AttentionTypeConfig(rope=True))
    nope = tiny(full_attention=AttentionTypeConfig(rope=False))
    assert F.model_flops_per_sequence(rope, 10) == F.model_flops_per_sequence(nope, 10)


@pytest.mark.parametrize(
    ("name", "dtype", "tf32", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, False, 989.4e12),
        ("NVIDIA H100 80GB HBM3", torch.float32, True, 494.7e12),
        ("NVIDIA H100 80GB HBM3", torch.float32, False, 66.9e12),
        ("NVIDIA H100 PCIe", torch.bfloat16, False, 756e12),
        ("NVIDIA H200", torch.float16, False, 989.4e12),
        ("NVIDIA GH200 480GB", "bf16", False, 989.4e12),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, False, 312e12),
        ("NVIDIA B200", torch.bfloat16, False, 2250e12),
        ("NVIDIA GeForce GTX 1080", torch.bfloat16, False, None),
        ("NVIDIA H100 80GB HBM3", torch.int8, False, None),
    ],
)
def test_peak_table(name, dtype, tf32, expected):
    assert F.peak_flops_for_name(name, dtype, tf32=tf32) == expected


def test_peak_on_cpu_needs_env_or_argument(monkeypatch):
    monkeypatch.delenv(F.PEAK_ENV_VAR, raising=False)
    assert F.peak_flops_per_device("cpu", torch.float32) is None
    assert F.mfu(1e12, None) is None
    monkeypatch.setenv(F.PEAK_ENV_VAR, "2.5")
    assert F.peak_flops_per_device("cpu", torch.float32) == 2.5e12
    assert F.peak_flops_per_device("cpu", torch.float32, peak_tflops=4) == 4e12
    assert F.mfu(1e12, 4e12) == 0.25
    assert F.tflops_per_device(8e12, 2.0, 4) == 1.0
    monkeypatch.setenv(F.PEAK_ENV_VAR, "fast")
    with pytest.raises(ValueError, match="HM_PEAK_TFLOPS"):
        F.peak_flops_per_device("cpu", torch.float32)

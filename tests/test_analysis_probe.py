"""Gradient influence by distance and linear probes: known receptive fields, probe fits on
separable / random data, and hidden-state features that add up to the model's stream."""

from __future__ import annotations

import torch

from hybrid_megatron.analysis.grad_distance import (
    GradSettings,
    distance_bins,
    grad_curve,
    influence,
)
from hybrid_megatron.analysis.probe import (
    ProbeSettings,
    fit_logistic,
    last_token_features,
    probe_layers,
)
from hybrid_megatron.hf import HybridMegatronConfig, HybridMegatronForCausalLM


def model_of(layers: list[str], window: int = 4) -> HybridMegatronForCausalLM:
    torch.manual_seed(0)
    config = HybridMegatronConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, layer_types=layers,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=window,
        mamba_d_state=4, mamba_d_head=8, mamba_n_groups=2, mamba_chunk_size=8,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    return HybridMegatronForCausalLM(config).eval()


def test_influence_stops_at_the_receptive_field():
    ids = torch.randint(0, 64, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    # the last 3 targets see through one window of 4: distances 0 .. 2 + 3 = 5 only
    g = influence(model_of(["sliding_attention", "mlp"]), ids, last_n=3).flip(0)
    assert (g[:6] > 0).all() and (g[6:] == 0).all()
    g = influence(model_of(["mlp"]), ids, last_n=3, target="argmax_logit").flip(0)
    assert (g[:3] > 0).all() and (g[3:] == 0).all()
    # two stacked windows reach twice as far; full attention reaches everything
    g = influence(model_of(["sliding_attention", "sliding_attention"]), ids, last_n=1).flip(0)
    assert (g[:7] > 0).all() and (g[7:] == 0).all()
    assert (influence(model_of(["full_attention"]), ids, last_n=1) > 0).all()


def test_grad_curve_bins_cover_every_distance():
    assert distance_bins(20) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 20)]
    seqs = [torch.randint(0, 64, (20,), generator=torch.Generator().manual_seed(s)).tolist()
            for s in range(2)]  # fmt: skip
    curve = grad_curve(model_of(["mamba", "mlp"]), seqs, GradSettings(length=20, last_n=2))
    assert len(curve["mean_by_distance"]) == 20 and curve["sequences"] == 2
    assert [(b["lo"], b["hi"]) for b in curve["bins"]] == distance_bins(20)
    assert all(b["mean"] > 0 for b in curve["bins"])  # Mamba: unbounded receptive field


def test_logistic_probe_separates_separable_data_and_not_random_labels():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 1, 16, generator=gen)
    labels = (x[:, 0, 3] > 0).long() + 2 * (x[:, 0, 7] > 0).long()  # 4 linearly separable
    settings = ProbeSettings(num_classes=4, test_fraction=0.3)
    (row,) = probe_layers({"residual": x}, labels, settings)
    assert row["residual"]["test_acc"] > 0.75 and row["residual"]["train_acc"] == 1.0
    noise = torch.randint(0, 4, (200,), generator=gen)
    (row,) = probe_layers({"residual": x}, noise, settings)
    assert row["residual"]["test_acc"] < 0.5  # chance is 0.25
    predict = fit_logistic(x[:, 0], labels, 4, l2=1e-3)
    assert predict(x[:5, 0]).tolist() == labels[:5].tolist()


def test_last_token_features_add_up_to_the_stream():
    model = model_of(["mamba", "sliding_attention", "mlp", "full_attention"])
    ids = list(range(10))
    residual, delta = last_token_features(model, ids)
    assert residual.shape == delta.shape == (4, 32)
    out = model(torch.tensor([ids]), output_hidden_states=True)
    embed = out.hidden_states[0][0, -1]
    torch.testing.assert_close(embed + delta.sum(0), residual[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(residual[1], out.hidden_states[2][0, -1])

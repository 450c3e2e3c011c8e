"""Receptive-field capping: K = sequence length reproduces the uncapped model exactly;
capping one layer changes only what it should (its attention pattern, positions from K on,
nothing upstream); Mamba state resets; cached decoding is capped like full forwards; and
`analyze cap` writes its table, JSON and plots."""

from __future__ import annotations

import json

import pytest
import torch

from hybrid_megatron.analysis.capping import capped, select_layers
from hybrid_megatron.hf import HybridMegatronConfig, HybridMegatronForCausalLM

LAYERS = ["mamba", "sliding_attention", "mlp", "full_attention", "mamba", "full_attention"]
N = 24


def tiny(attn: str = "sdpa", vocab: int = 64) -> HybridMegatronForCausalLM:
    torch.manual_seed(0)
    config = HybridMegatronConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        layer_types=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=6,
        full_attention_use_rope=False,
        mamba_d_state=4,
        mamba_d_head=8,
        mamba_n_groups=2,
        mamba_chunk_size=8,
        initializer_range=0.3,
    )
    config._attn_implementation = attn
    return HybridMegatronForCausalLM(config).eval()


def ids(n: int = N, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("target", ["full", "efficient", "0,1,3,4,5"])
@pytest.mark.parametrize("sinks", [0, 3])
@torch.no_grad()
def test_cap_at_sequence_length_equals_uncapped_exactly(target, sinks):
    model, x = tiny(), ids()
    ref = model(x, use_cache=False).logits
    ref_gen = model.generate(x[:, :16], max_new_tokens=N - 16, do_sample=False)
    with capped(model, select_layers(model, target), k=N, sinks=sinks):
        assert torch.equal(model(x, use_cache=False).logits, ref)
        gen = model.generate(x[:, :16], max_new_tokens=N - 16, do_sample=False)
    assert torch.equal(gen, ref_gen)
    assert torch.equal(model(x, use_cache=False).logits, ref)  # restored after the block


def test_target_selection():
    model = tiny()
    assert select_layers(model, "full") == [3, 5]
    assert select_layers(model, "efficient") == [0, 1, 4]
    assert select_layers(model, "5,3") == [3, 5]
    from hybrid_megatron.errors import ConfigError

    with pytest.raises(ConfigError, match="not attention or Mamba"):
        select_layers(model, "2")  # an MLP layer


@torch.no_grad()
def test_capping_one_full_attention_layer_changes_only_its_pattern_and_later_positions():
    model, x, k, sinks = tiny("eager"), ids(), 5, 2
    ref = model(x, use_cache=False, output_attentions=True)
    with capped(model, [3], k=k, sinks=sinks):
        out = model(x, use_cache=False, output_attentions=True)
    # attention layers in order: 1 (swa), 3 (full, capped), 5 (full)
    assert torch.equal(out.attentions[0], ref.attentions[0])  # upstream: untouched
    pattern = out.attentions[1][0]  # [heads, N, N]
    i = torch.arange(N)[:, None]
    j = torch.arange(N)[None, :]
    allowed = (j <= i) & ((j > i - k) | (j < sinks))
    assert pattern[:, ~allowed].abs().max() == 0  # nothing outside the cap and the sinks
    assert (pattern[:, allowed] > 0).all()  # everything inside is still attended
    # a query sees every key while its k-token span still reaches the sinks: positions
    # below k + sinks lose nothing, every later one does
    kept = k + sinks
    torch.testing.assert_close(out.attentions[1][0, :, :kept], ref.attentions[1][0, :, :kept])
    torch.testing.assert_close(out.logits[0, :kept], ref.logits[0, :kept], atol=1e-5, rtol=1e-5)
    assert (out.logits[0, kept:] - ref.logits[0, kept:]).abs().amax(-1).min() > 1e-4


@torch.no_grad()
def test_capping_a_mamba_layer_resets_its_state_every_k_tokens():
    model, x, k = tiny(), ids(), 8
    mixer = model.model.layers[4].mixer
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = mixer.register_forward_hook(lambda m, a, o: seen.append((a[0], o)))
    ref = model(x, use_cache=False).logits
    with capped(model, [4], k=k):
        out = model(x, use_cache=False).logits
    hook.remove()
    hidden, capped_out = seen[-1]
    # each block of k positions is the mixer run from a zero state on that block alone
    for a in range(0, N, k):
        alone = mixer(hidden[:, a : a + k], None, type("P", (), {"tokens": None})())
        torch.testing.assert_close(capped_out[:, a : a + k], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0, :k], ref[0, :k], atol=1e-5, rtol=1e-5)
    assert (out[0, k:] - ref[0, k:]).abs().amax(-1).min() > 1e-5


@pytest.mark.parametrize("layers,sinks", [([3, 5], 2), ([0, 1, 4], 0)])
@torch.no_grad()
def test_cached_decoding_is_capped_like_full_forwards(layers, sinks):
    model, x = tiny(), ids(10)
    with capped(model, layers, k=4, sinks=sinks):
        gen = model.generate(x, max_new_tokens=12, do_sample=False)
        seq = x
        for _ in range(12):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(gen, seq)


def test_cap_command_writes_table_json_and_plots(tmp_path):
    from hybrid_megatron.cli import main

    tiny(vocab=260).save_pretrained(tmp_path / "hf")
    out = tmp_path / "cap"
    argv = ["analyze", "cap", str(tmp_path / "hf"), "--k", "16,400", "--length", "400"]
    argv += ["--num-sequences", "1", "--num-samples", "2", "--max-new-tokens", "4"]
    argv += ["--sinks", "2", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "cap.json").read_text())
    rows = {(r["target"], r["k"]): r for r in result["rows"]}
    assert set(rows) == {("none", None), ("full", 16), ("full", 400), ("efficient", 16),
                         ("efficient", 400)}  # fmt: skip
    base = rows[("none", None)]
    for target in ("full", "efficient"):  # K = length: exactly the uncapped numbers
        assert rows[(target, 400)]["loss"] == base["loss"]
        assert rows[(target, 400)]["bins"] == base["bins"]
        assert rows[(target, 16)]["loss"] != base["loss"]
        # the first bins (positions < 16) do not see past the cap: unchanged
        assert rows[(target, 16)]["bins"][0]["loss"] == pytest.approx(base["bins"][0]["loss"])
    assert rows[("full", 16)]["layers"] == [3, 5]
    assert "| full | 16 |" in (out / "cap.md").read_text()
    for name in ("cap_vs_k.png", "cap_loss_by_position_full.png"):
        assert (out / name).stat().st_size > 1000

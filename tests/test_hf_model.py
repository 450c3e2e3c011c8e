"""The Hugging Face model on its own: cached decoding equals full forwards, greedy generate()
equals greedy decoding by full forwards, caches stay bounded where they should, attention
implementations agree, and configs/inputs it cannot handle are refused."""

from __future__ import annotations

import pytest
import torch

from hybrid_megatron.hf import HybridMegatronCache, HybridMegatronConfig, HybridMegatronForCausalLM
from hybrid_megatron.hf.cache_hybrid_megatron import AttentionState, MambaState

WINDOW = 6
LAYERS = ["mamba", "mlp", "sliding_attention", "full_attention", "mlp", "mamba"]
LAYERS += ["sliding_attention"]


def tiny_model(attn: str = "sdpa", **overrides) -> HybridMegatronForCausalLM:
    """Mamba-2 (grouped), RoPE SWA (own theta), NoPE full attention, GQA, SwiGLU."""
    torch.manual_seed(0)
    kwargs = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        layer_types=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=WINDOW,
        full_attention_use_rope=False,
        sliding_attention_rope_theta=500.0,
        mamba_d_state=4,
        mamba_d_head=8,
        mamba_n_groups=2,
        mamba_chunk_size=8,
        initializer_range=0.3,  # peaked logits: greedy choices are not near-ties
    )
    kwargs.update(overrides)
    config = HybridMegatronConfig(**kwargs)
    config._attn_implementation = attn
    return HybridMegatronForCausalLM(config).eval()


def prompt(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_cached_decoding_equals_full_forward():
    model, ids = tiny_model(), prompt(2, 23)
    full = model(ids, use_cache=False).logits
    out = model(ids[:, :9], use_cache=True)  # prefill longer than the window
    cache, pieces = out.past_key_values, [out.logits]
    pieces.append(model(ids[:, 9:13], past_key_values=cache).logits)  # multi-token continuation
    for t in range(13, 23):
        pieces.append(model(ids[:, t : t + 1], past_key_values=cache).logits)
    assert isinstance(cache, HybridMegatronCache)
    assert cache.get_seq_length() == 23
    assert (torch.cat(pieces, dim=1) - full).abs().max() < 1e-4


def greedy_by_full_forwards(model, ids: torch.Tensor, steps: int, eos=None, pad=0):
    """Reference decoding: a full forward without cache per token; rows stop at EOS (then pad)."""
    seq, done = ids, torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(steps):
        nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        if eos is not None:
            done |= nxt == eos
            if done.all():
                break
    return seq


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("length", [WINDOW - 2, 3 * WINDOW + 1])  # shorter / longer than W
@torch.no_grad()
def test_greedy_generate_equals_repeated_full_forwards(batch, length):
    model, ids = tiny_model(), prompt(batch, length)
    generated = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert torch.equal(generated, greedy_by_full_forwards(model, ids, 12))
    # With an EOS that row 0 produces mid-way: generation stops there (pads the other rows).
    eos = int(generated[0, length + 4])
    stopped = model.generate(
        ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=95
    )
    assert torch.equal(stopped, greedy_by_full_forwards(model, ids, 12, eos=eos, pad=95))


@torch.no_grad()
def test_cache_is_read_under_every_name_transformers_uses():
    """transformers 5.24 passes `cache=`, older releases `past_key_values=`: same result."""
    model, ids = tiny_model(), prompt(2, 2 * WINDOW)
    full = model(ids, use_cache=False).logits[:, -1]
    for name in ("past_key_values", "cache", "cache_params"):
        cache = model(ids[:, :-1], use_cache=True)[1]
        assert isinstance(cache, HybridMegatronCache)
        for forward in (model, model.model):  # the LM head and the base model
            state = HybridMegatronCache(model.config)
            out = forward(ids[:, :-1], **{name: state})
            assert state.get_seq_length() == 2 * WINDOW - 1, f"{name} ignored by {forward}"
            del out
        inputs = model.prepare_inputs_for_generation(ids, **{name: cache}, use_cache=True)
        assert inputs["past_key_values"] is cache and inputs["input_ids"].shape[1] == 1
        last = model(ids[:, -1:], **{name: cache}).logits[:, -1]
        assert (last - full).abs().max() < 1e-4, name


def test_caches_it_cannot_use_are_refused_not_dropped():
    from transformers import DynamicCache

    model, ids = tiny_model(), prompt(1, 4)
    cache = HybridMegatronCache(model.config)
    with pytest.raises(ValueError, match="several names"):
        model(ids, past_key_values=cache, cache=HybridMegatronCache(model.config))
    with pytest.raises(TypeError, match="HybridMegatronCache"):
        model(ids, cache=DynamicCache())
    with pytest.raises(TypeError, match="past_cache.*do not read"):
        model(ids, past_cache=cache)  # a future rename would land here
    with pytest.raises(TypeError, match="do not read"):
        model.model(ids, state=cache)
    with pytest.raises(TypeError, match="do not read"):
        model.prepare_inputs_for_generation(ids, memory=cache)


@torch.no_grad()
def test_cache_memory_is_bounded_for_swa_and_mamba():
    model = tiny_model()
    sizes, lengths = {}, (2 * WINDOW, 50 * WINDOW)
    for n in lengths:
        cache = model(prompt(1, n), use_cache=True).past_key_values
        for _ in range(3):
            model(prompt(1, 1, seed=n), past_key_values=cache)
        sizes[n] = cache.nbytes_per_layer()
        for state, kind in zip(cache.layers, LAYERS):
            if kind == "sliding_attention":
                assert isinstance(state, AttentionState)
                assert state.keys.shape[2] == WINDOW - 1
            if kind == "full_attention":
                assert state.keys.shape[2] == n + 3
            if kind == "mamba":
                assert isinstance(state, MambaState) and state.ssm.shape == (1, 8, 8, 4)
    short, long = sizes[lengths[0]], sizes[lengths[1]]
    for i, kind in enumerate(LAYERS):
        if kind in ("sliding_attention", "mamba", "mlp"):
            assert long[i] == short[i], f"layer {i} ({kind}) state grew: {short[i]} -> {long[i]}"
        else:
            assert long[i] > short[i], "full attention must keep every key"
    swa = LAYERS.index("sliding_attention")
    assert long[swa] == 2 * (WINDOW - 1) * 2 * 8 * 4  # k and v, kv heads 2, head dim 8, fp32


@torch.no_grad()
def test_attention_implementations_agree_and_eager_returns_weights(monkeypatch):
    ids = prompt(2, 3 * WINDOW)
    ref = tiny_model("sdpa")(ids, use_cache=False).logits
    eager = tiny_model("eager")(ids, use_cache=False, output_attentions=True)
    assert (eager.logits - ref).abs().max() < 1e-5
    attn_layers = [k for k in LAYERS if k.endswith("attention")]
    assert len(eager.attentions) == len(attn_layers)
    swa = eager.attentions[attn_layers.index("sliding_attention")]
    assert swa.shape == (2, 4, 3 * WINDOW, 3 * WINDOW)
    torch.testing.assert_close(swa.sum(-1), torch.ones(2, 4, 3 * WINDOW))
    i, j = torch.meshgrid(torch.arange(3 * WINDOW), torch.arange(3 * WINDOW), indexing="ij")
    assert swa[..., (j > i) | (j <= i - WINDOW)].abs().max() == 0  # causal window W
    monkeypatch.setenv("HYBRID_MEGATRON_FLEX_EAGER", "1")  # uncompiled flex: no compile wait
    flex = tiny_model("flex_attention")(ids, use_cache=False).logits
    assert (flex - ref).abs().max() < 1e-5
    with pytest.raises(ValueError, match="eager"):
        tiny_model("sdpa")(ids, output_attentions=True)


def test_unsupported_inputs_and_configs_are_refused():
    model, ids = tiny_model(), prompt(2, 8)
    gap = torch.ones_like(ids)
    gap[0, 3:5] = 0  # real tokens on both sides of padding
    with pytest.raises(ValueError, match="gaps"):
        model(ids, attention_mask=gap, use_cache=False)
    right = torch.ones_like(ids)
    right[0, -2:] = 0
    model(ids, attention_mask=right, use_cache=False)  # scoring: right padding is fine
    with pytest.raises(ValueError, match="right padding .* only without a cache"):
        model(ids, attention_mask=right, use_cache=True)
    with pytest.raises(ValueError, match="cached \\+ new"):
        model(ids, attention_mask=right[:, 1:], use_cache=False)
    model(ids, attention_mask=torch.ones_like(ids))  # an all-ones mask is fine
    with pytest.raises(ValueError, match="moe"):
        HybridMegatronConfig(layer_types=["mamba", "moe"])
    config = HybridMegatronConfig(layer_types=["linear_attention", "attention", "mlp"])
    assert config.layer_types == ["mamba", "full_attention", "mlp"]


@torch.no_grad()
def test_save_and_auto_load_in_process(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = tiny_model(tie_word_embeddings=False, hidden_act="gelu", mlp_gated=False)
    ids = prompt(1, 9)
    model.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    for f in ("attention.py", "ssd.py", "mamba_ops.py", "modeling_hybrid_megatron.py",
              "layers_hybrid_megatron.py"):  # fmt: skip
        assert f in names
    kernel = (tmp_path / "attention.py").read_text()
    assert "def attention(" in kernel and "import *" not in kernel  # the kernel, not the shim
    assert AutoConfig.from_pretrained(tmp_path).layer_types == LAYERS
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is HybridMegatronForCausalLM
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def perturbed(model: HybridMegatronForCausalLM) -> HybridMegatronForCausalLM:
    """No zero or constant parameters (conv biases, norms) that could hide a padding leak."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def left_padded(rows: list[torch.Tensor], pad: int = 95) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    return ids, mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_left_padded_forward_and_cached_decoding_equal_unpadded(attn):
    """Every layer type (Mamba conv + scan, SWA window, full attention, RoPE positions)."""
    model = perturbed(tiny_model(attn))
    rows = [prompt(1, n, seed=n)[0] for n in (3 * WINDOW + 1, WINDOW - 2, 2 * WINDOW)]
    ids, mask = left_padded(rows)
    out = model(ids, attention_mask=mask, use_cache=True)
    cache = out.past_key_values
    nxt = prompt(3, 3, seed=7)
    steps = [out.logits]
    for t in range(3):  # cached decoding continues from the padded prefill
        mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
        steps.append(model(nxt[:, t : t + 1], attention_mask=mask, past_key_values=cache).logits)
    logits = torch.cat(steps, dim=1)
    for i, r in enumerate(rows):
        alone = model(torch.cat([r, nxt[i]])[None], use_cache=False).logits[0]
        got = logits[i, ids.shape[1] - len(r) :]
        assert (got - alone).abs().max() < 1e-4, (i, len(r))


@torch.no_grad()
def test_left_padded_batched_generate_equals_one_by_one():
    model = perturbed(tiny_model())
    rows = [prompt(1, n, seed=n)[0] for n in (3 * WINDOW + 1, WINDOW - 2, 2 * WINDOW, 5)]
    ids, mask = left_padded(rows)
    batched = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=10,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=95,
    )
    for i, r in enumerate(rows):
        alone = model.generate(r[None], max_new_tokens=10, do_sample=False, eos_token_id=None)
        assert torch.equal(batched[i, ids.shape[1] :], alone[0, len(r) :]), i

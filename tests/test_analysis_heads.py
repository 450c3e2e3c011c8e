"""Retrieval-head scores: the attention probe returns what full eager forwards return (per
layer window), both scores on hand-built attention patterns with known answers, and on a
model whose head is built to copy the needle (and one whose window hides it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hybrid_megatron.analysis.attention_probe import AttentionProbe, attention_layout
from hybrid_megatron.analysis.retrieval_heads import (
    attention_mass,
    copy_hits,
    find_occurrences,
    score_sample,
    summarize,
)
from hybrid_megatron.hf import HybridMegatronConfig, HybridMegatronForCausalLM
from hybrid_megatron.hf.modeling_hybrid_megatron import apply_rope, rope_cos_sin


def random_model() -> HybridMegatronForCausalLM:
    torch.manual_seed(0)
    config = HybridMegatronConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        layer_types=["mamba", "sliding_attention", "mlp", "full_attention", "sliding_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=5,
        full_attention_use_rope=False,
        mamba_d_state=4,
        mamba_d_head=8,
        mamba_n_groups=2,
        mamba_chunk_size=8,
        initializer_range=0.3,
    )
    config._attn_implementation = "sdpa"
    return HybridMegatronForCausalLM(config).eval()


@torch.no_grad()
def test_probe_equals_full_eager_forward_in_every_window():
    model = random_model()
    ids = torch.randint(0, 64, (17,), generator=torch.Generator().manual_seed(3))
    model.config._attn_implementation = "eager"
    full = model(ids[None], output_attentions=True, use_cache=False)
    model.config._attn_implementation = "sdpa"
    probe = AttentionProbe(model)
    assert probe.layout.layers == (1, 3, 4)
    assert probe.layout.windows == (5, None, 5)
    probe.prefill(ids[:14])
    step = probe.attend(ids[14:])
    assert model.config._attn_implementation == "sdpa"  # restored
    for layer, ref in zip(probe.layout.layers, full.attentions, strict=True):
        got = step.attentions[layer]
        assert got.shape == (4, 3, 17)
        torch.testing.assert_close(got, ref[0, :, 14:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(step.logits, full.logits[0, 14:], atol=1e-4, rtol=1e-4)
    # sliding layers see only their window: the query at position 16 sees keys 12..16
    assert step.attentions[1][:, -1, :12].abs().max() == 0
    assert step.attentions[3][:, -1, :12].abs().max() > 0


def test_scores_on_a_hand_built_pattern():
    rows = {
        2: torch.tensor(
            [
                [0.1, 0.0, 0.6, 0.2, 0.1, 0.0],  # top-1 at 2
                [0.0, 0.0, 0.1, 0.1, 0.7, 0.1],  # top-1 at 4
                [0.5, 0.1, 0.1, 0.1, 0.1, 0.1],  # top-1 at 0
            ]
        )
    }
    tokens = [9, 9, 7, 8, 7, 1]
    assert find_occurrences(tokens, [7, 8]) == [2, 3]
    assert find_occurrences(tokens, [9, 9]) == [0, 1]
    assert find_occurrences(tokens, [7]) == [2, 4]
    mass = attention_mass(rows, [2, 3])
    torch.testing.assert_close(mass[2], torch.tensor([0.8, 0.2, 0.2]))
    # needle span {2, 3}; generated 7: head 0 attends to a 7 inside it; head 1 to a 7
    # outside it; head 2 outside it
    assert copy_hits(rows, {2, 3}, tokens, 7)[2].tolist() == [1.0, 0.0, 0.0]
    # the token must match: generating 8 while head 0 points at the 7 is no hit
    assert copy_hits(rows, {2, 3}, tokens, 8)[2].tolist() == [0.0, 0.0, 0.0]
    assert copy_hits(rows, {2, 3, 4}, tokens, 7)[2].tolist() == [1.0, 1.0, 0.0]


VOCAB, HEAD_DIM, GAIN = 32, 40, 10.0


def copy_model(layer_type: str, distance: int, window: int = 8) -> HybridMegatronForCausalLM:
    """One attention layer of two heads. Head 1 (RoPE) attends from position p to p - distance
    and writes the token found there onto the residual stream, so the model emits it; head 0
    attends uniformly and writes nothing. Embeddings: dim 0 constant, dims 1..VOCAB one-hot."""
    hidden = 2 * HEAD_DIM
    config = HybridMegatronConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        layer_types=[layer_type],
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        sliding_window=window,
        full_attention_use_rope=True,
    )
    config._attn_implementation = "sdpa"
    model = HybridMegatronForCausalLM(config).eval()
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 1.0
        emb[torch.arange(VOCAB), 1 + torch.arange(VOCAB)] = 1.0
        model.model.layers[0].input_layernorm.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        u = torch.full((HEAD_DIM,), 3.0)
        cos, sin = rope_cos_sin(torch.tensor([[distance]]), 10000.0, HEAD_DIM, torch.float32)
        head = slice(HEAD_DIM, 2 * HEAD_DIM)
        attn.q_proj.weight[head, 0] = u
        attn.k_proj.weight[head, 0] = apply_rope(u[None, None, None], cos, sin)[0, 0, 0]
        attn.v_proj.weight[HEAD_DIM + torch.arange(VOCAB), 1 + torch.arange(VOCAB)] = 1.0
        attn.o_proj.weight[1 + torch.arange(VOCAB), HEAD_DIM + torch.arange(VOCAB)] = GAIN
    return model


def needle_prompt(n: int, distance: int, answer: list[int]) -> list[int]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 16, (n,), generator=gen).tolist()  # haystack: tokens 0..15
    start = n - 1 - distance  # the last prompt token attends here
    ids[start : start + len(answer)] = answer
    return ids


ANSWER = [20, 25, 21, 30]


def _recovered(gen: list[int]) -> bool:
    return any(gen[i : i + len(ANSWER)] == ANSWER for i in range(len(gen)))


def test_forced_copy_head_scores_one_on_both_definitions():
    n, d = 40, 20
    model = copy_model("full_attention", d)
    ids = needle_prompt(n, d, ANSWER)
    s = score_sample(model, ids, [[ANSWER]], _recovered, query_offset=1)
    assert s.generated == ANSWER and s.recovered
    assert s.answer_positions == list(range(n - 1 - d, n - 1 - d + 4))
    assert s.copy[0].tolist() == [0.0, 1.0]  # head 1 copied every answer token
    assert s.mass[0][1] > 0.999  # head 1 looks at the answer
    # head 0 attends uniformly over the 40 prompt keys: 4 answer positions -> 4 / 40
    assert s.mass[0][0].item() == pytest.approx(4 / n, abs=1e-6)
    # the paper's default query (second-to-last token) of this head looks one token earlier
    assert score_sample(model, ids, [[ANSWER]], _recovered).mass[0][1] < 1e-3

    layout = attention_layout(model)
    body = summarize([s, s], layout, top_k=1, threshold=0.1)
    assert body["copy_paste"] == [[0.0, 1.0]]
    assert body["top_heads"]["attention_mass"][0]["head"] == 1
    assert body["retrieval_heads"] == [{"layer": 0, "head": 1, "copy_paste": 1.0}]


def test_copy_scores_count_only_recovered_samples_and_windows_hide_the_needle():
    n, d = 40, 20
    model = copy_model("sliding_attention", d, window=8)  # the needle is out of the window
    ids = needle_prompt(n, d, ANSWER)
    s = score_sample(model, ids, [[ANSWER]], _recovered, query_offset=1)
    assert not s.recovered
    assert s.mass[0].tolist() == [0.0, 0.0]  # neither head can see the answer
    assert len(s.generated) == len(ANSWER) + 8  # the default decoding budget
    body = summarize([s], attention_layout(model), top_k=2, threshold=0.1)
    assert body["samples_recovered"] == 0
    assert body["retrieval_heads"] == []
    assert body["layout"]["windows"] == [8]


def test_retrieval_heads_command_writes_json_and_heatmap(tmp_path):
    import json

    from hybrid_megatron.cli import main

    torch.manual_seed(0)
    config = HybridMegatronConfig(
        vocab_size=260,
        hidden_size=32,
        intermediate_size=64,
        layer_types=["sliding_attention", "mlp", "full_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=16,
    )
    HybridMegatronForCausalLM(config).save_pretrained(tmp_path / "hf")
    out = tmp_path / "heads"
    argv = ["analyze", "retrieval-heads", str(tmp_path / "hf"), "--length", "400"]
    argv += ["--num-samples", "2", "--top-k", "3", "--max-new-tokens", "4", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "retrieval_heads.json").read_text())
    assert result["settings"]["task"] == "niah_single_1" and result["samples"] == 2
    assert result["samples_with_answer_in_prompt"] == 2
    assert result["layout"]["attention_layers"] == [0, 2]
    assert len(result["heads"]) == 8 and len(result["top_heads"]["attention_mass"]) == 3
    assert all(0.0 <= h["attention_mass"] <= 1.0 + 1e-6 for h in result["heads"])
    assert (out / "retrieval_heads.png").stat().st_size > 1000


def _sharded_analyses(hf: str, out: str) -> None:
    from hybrid_megatron.analysis.grad_distance import GradSettings, run_grad_distance
    from hybrid_megatron.analysis.retrieval_heads import RetrievalSettings, run_retrieval_heads

    settings = RetrievalSettings(length=400, num_samples=3, top_k=3, max_new_tokens=4)
    run_retrieval_heads(hf, Path(out) / "heads", settings, device="cpu")
    grad = GradSettings(length=64, num_sequences=3, last_n=4)
    run_grad_distance(hf, Path(out) / "grad", grad, device="cpu")


def test_analyses_sharded_over_two_ranks_equal_one_process(tmp_path):
    import json

    from tests.dist_utils import run_distributed

    torch.manual_seed(0)
    config = HybridMegatronConfig(
        vocab_size=260, hidden_size=32, intermediate_size=64,
        layer_types=["mamba", "sliding_attention", "full_attention"], num_attention_heads=4,
        num_key_value_heads=2, sliding_window=16, mamba_d_state=4, mamba_d_head=8,
        mamba_n_groups=2, mamba_chunk_size=8,
    )  # fmt: skip
    hf = tmp_path / "hf"
    HybridMegatronForCausalLM(config).save_pretrained(hf)
    _sharded_analyses(str(hf), str(tmp_path / "one"))
    run_distributed(_sharded_analyses, 2, str(hf), str(tmp_path / "two"))
    for name in ("heads/retrieval_heads.json", "grad/grad_distance.json"):
        one = json.loads((tmp_path / "one" / name).read_text())
        two = json.loads((tmp_path / "two" / name).read_text())
        one.pop("seconds", None), two.pop("seconds", None)
        assert one == two
    assert (tmp_path / "two" / "heads" / "retrieval_heads.png").is_file()


@pytest.mark.parametrize("window", [None, 5])
@torch.no_grad()
def test_probe_works_on_llama_style_models(window):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=window,
    )  # fmt: skip
    config._attn_implementation = "eager"
    model = MistralForCausalLM(config).eval()
    ids = torch.randint(0, 64, (17,), generator=torch.Generator().manual_seed(3))
    full = model(ids[None], output_attentions=True, use_cache=False)
    model.config._attn_implementation = "sdpa"
    probe = AttentionProbe(model)
    assert probe.layout.windows == (window, window)
    probe.prefill(ids[:14])
    step = probe.attend(ids[14:])
    for layer, ref in zip(probe.layout.layers, full.attentions, strict=True):
        torch.testing.assert_close(step.attentions[layer], ref[0, :, 14:], atol=1e-5, rtol=1e-4)

"""LongPPL: long/short evaluator windows on a model whose only skill is long-range copying,
key-token selection, mapping across tokenizations, and the command end to end on tiny models."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from hybrid_megatron.analysis.longppl import (
    KeyedSequence,
    char_spans,
    evaluator_losses,
    map_key_tokens,
    score_sequence,
    select_key_tokens,
)
from hybrid_megatron.data.tokenizer import ByteTokenizer
from tests.test_eval_runner import _byte_hf_model

V = 50


class PeriodCopier(torch.nn.Module):
    """Predicts token t as the token P positions earlier when that one is in its input
    (loss ~0), else uniformly (loss ln V): long context helps exactly at distance P."""

    def __init__(self, period: int, vocab: int = V) -> None:
        super().__init__()
        self.period = period
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        ids = input_ids[0]
        logits = torch.zeros(1, ids.numel(), self.vocab)
        for i in range(ids.numel()):
            src = i + 1 - self.period  # predicting token i + 1 of this window
            if src >= 0:
                logits[0, i, ids[src]] = 30.0
        return SimpleNamespace(logits=logits)


def _periodic(length: int, period: int) -> list[int]:
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, V, (period,), generator=g).tolist()
    return [base[i % period] for i in range(length)]


def test_short_windows_are_the_context_before_each_block():
    ids = _periodic(40, 12)
    long, short = evaluator_losses(PeriodCopier(12), ids, short_context=8, block=8)
    t = torch.arange(1, 40)
    assert torch.all(long[t >= 12] < 1e-6) and torch.allclose(
        long[t < 12], torch.tensor(math.log(V))
    )
    assert torch.isnan(short[t < 8]).all() and not torch.isnan(short[t >= 8]).any()
    # Blocks start at tokens 8, 16, 24, 32 and see 8 tokens before them: token t in the block
    # starting at b sees token t - 12 iff t - 12 >= b - 8, i.e. only the block's last 4 tokens.
    key = select_key_tokens(long, short, 2.0, 2.0)
    expected = [16, 17, 18, 19, 24, 25, 26, 27, 32, 33, 34, 35]
    assert (t[key]).tolist() == expected


def test_blocks_within_the_period_make_every_copied_token_key():
    ids = _periodic(37, 12)  # last block is short
    long, short = evaluator_losses(PeriodCopier(12), ids, short_context=8, block=4)
    key = select_key_tokens(long, short, 2.0, 2.0)
    assert (torch.arange(1, 37)[key]).tolist() == list(range(12, 37))
    # the loss threshold drops tokens the long context does not make likely
    assert not select_key_tokens(long, short, 2.0, -1.0).any()


def test_byte_spans_and_mapping_across_tokenizations():
    text = "aé字b"
    assert char_spans(ByteTokenizer(), text) == [(0, 1), (1, 2), (1, 2), (2, 3), (2, 3), (2, 3),
                                                 (3, 4)]  # fmt: skip
    # evaluator tokens: "aé" | "字" | "b"; key token: "字" (token 1)
    eval_spans = [(0, 2), (2, 3), (3, 4)]
    mask = torch.tensor([True, False])  # tokens 1, 2 -> "字" is key
    model_spans = char_spans(ByteTokenizer(), text)
    assert map_key_tokens(eval_spans, mask, model_spans).tolist() == [
        False, False, True, True, True, False,
    ]  # fmt: skip


def test_score_sequence_key_losses_are_the_masked_plain_losses():
    ids = _periodic(30, 10)
    key = torch.zeros(29, dtype=torch.bool)
    key[[9, 15, 28]] = True
    row = score_sequence(PeriodCopier(7), KeyedSequence(ids, key), bin_width=8)
    from hybrid_megatron.eval.perplexity import token_losses

    losses = token_losses(PeriodCopier(7), torch.tensor(ids)).double()
    assert row["key_tokens"] == 3
    assert row["key_loss_sum"] == pytest.approx(float(losses[key].sum()))
    assert sum(b[3] for b in row["key_bins"]) == 3


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return _byte_hf_model(tmp_path_factory.mktemp("longppl") / "tiny_hf")


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "hybrid_megatron.cli", "analyze", "longppl", *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_command_end_to_end_with_cached_key_tokens(tiny_hf, tmp_path):
    out = tmp_path / "lp"
    # thresholds that make every token after the short context a key token: LongPPL must then
    # equal the plain perplexity of positions >= 24 (bins of 8 align with 24)
    common = ["--evaluator", str(tiny_hf), "--length", "64", "--short-context", "24",
              "--block", "16", "--gain-threshold=-1000", "--loss-threshold", "1000",
              "--num-samples", "2", "--bin-width", "8", "--out", str(out)]  # fmt: skip
    done = _run(str(tiny_hf), *common)
    assert done.returncode == 0, done.stderr
    assert "key tokens: 80 of 126" in done.stdout
    rep = json.loads((out / "longppl.json").read_text())
    m = rep["models"][0]
    late = [b for b in m["bins"] if b["lo"] >= 24]
    mean = sum(b["loss"] * b["tokens"] for b in late) / sum(b["tokens"] for b in late)
    assert m["key_tokens"] == 80 and m["longppl"] == pytest.approx(math.exp(mean), rel=1e-9)
    assert all(b["key_tokens"] == 0 for b in m["bins"] if b["hi"] <= 24)
    assert (out / "longppl.png").stat().st_size > 5000 and "LongPPL" in (
        out / "longppl.md"
    ).read_text()
    again = _run(str(tiny_hf), *common)  # key tokens come from the cache
    assert again.returncode == 0 and "key tokens:" not in again.stdout
    assert json.loads((out / "longppl.json").read_text())["models"][0]["longppl"] == m["longppl"]


def test_length_within_short_context_is_refused_before_loading(tmp_path):
    done = _run("no/such/model", "--evaluator", "x", "--length", "4k", "--out", str(tmp_path))
    assert done.returncode == 2
    assert "leaves no token after the short context" in done.stderr


class _OtherByteTokenizer(ByteTokenizer):
    """Byte ids under another name: `build_sequences` must take the character-offset path."""

    spec = "other-bytes"


def test_evaluator_with_another_tokenizer_maps_keys_through_text(tmp_path):
    from hybrid_megatron.analysis.longppl import LongPPLSettings, build_sequences
    from hybrid_megatron.eval.tasks.errors import EvalDataError

    g = torch.Generator().manual_seed(1)
    unit = "".join(chr(97 + int(i)) for i in torch.randint(0, 26, (12,), generator=g))
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": unit * 5}) + "\n")
    s = LongPPLSettings(length=37, num_samples=1, short_context=8, block=4)
    same = build_sequences(
        s, ByteTokenizer(), PeriodCopier(12, vocab=258), ByteTokenizer(), str(data)
    )
    other = build_sequences(
        s, ByteTokenizer(), PeriodCopier(12, vocab=258), _OtherByteTokenizer(), str(data)
    )
    assert (
        len(same) == len(other) == 1 and same[0].ids == other[0].ids == list(unit.encode() * 4)[:37]
    )
    assert torch.equal(same[0].key, other[0].key)
    assert (torch.arange(1, 37)[other[0].key]).tolist() == list(range(12, 37))
    with pytest.raises(EvalDataError, match="unpacked text documents"):
        build_sequences(
            s, ByteTokenizer(), PeriodCopier(12, vocab=258), _OtherByteTokenizer(), None
        )

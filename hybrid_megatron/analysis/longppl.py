"""LongPPL (Fang et al., "What is Wrong with Perplexity for Long-context Language Modeling?").

Key tokens are chosen by an evaluator model: each sequence is cut into blocks of `block`
tokens after the first `short_context`; a block's tokens are scored once with the whole
sequence before them (long context) and once with only the `short_context` tokens before the
block (short context). Token t is a key token when its log-probability gain from the long
context, loss_short - loss_long, exceeds `gain_threshold` (2) and its long-context loss is
below `loss_threshold` (2). LongPPL of an evaluated model is exp(mean loss on key tokens),
reported next to its plain loss by position.

When the evaluator and the model tokenize alike, key positions carry over directly. Otherwise
documents are read as text (unpacked) and a model token is a key token when its character span
overlaps a key token's span in the evaluator's tokenization (as Fang et al. map them).
Position convention as in `eval.perplexity`: index t - 1 of a loss vector is token t.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from hybrid_megatron.eval.perplexity import bin_losses, position_bins, token_losses


@dataclass
class LongPPLSettings:
    length: int = 8192  # evaluated tokens per sequence (model tokens)
    num_samples: int = 4
    short_context: int = 4096  # Fang et al.'s truncation length
    block: int = 1024  # Fang et al.'s sliding window
    gain_threshold: float = 2.0  # alpha: loss_short - loss_long > alpha
    loss_threshold: float = 2.0  # -beta: loss_long < this
    bin_width: int | None = None
    pack: bool = False
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- key tokens


@torch.no_grad()
def evaluator_losses(
    model: torch.nn.Module, ids: Sequence[int], short_context: int, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(long, short) next-token losses [len(ids) - 1] of the evaluator; `short` is NaN for the
    first `short_context` tokens (never scored with a short context)."""
    if short_context < 1 or block < 1:
        raise ValueError("short_context and block must be >= 1")
    ids_t = torch.tensor(list(ids), dtype=torch.long)
    n = ids_t.numel()
    long = token_losses(model, ids_t)
    short = torch.full_like(long, float("nan"))
    for start in range(0, max(0, n - short_context), block):
        first = start + short_context  # first target token of this block
        end = min(first + block, n)
        window = token_losses(model, ids_t[start:end])  # window[k] is token start + k + 1
        short[first - 1 : end - 1] = window[first - start - 1 :]
    return long, short


def select_key_tokens(
    long: torch.Tensor, short: torch.Tensor, gain_threshold: float, loss_threshold: float
) -> torch.Tensor:
    """Bool mask of key tokens: gain from long context > threshold and long loss < threshold."""
    gain = short - long
    return (gain > gain_threshold) & (long < loss_threshold) & ~torch.isnan(short)


def char_spans(tokenizer: Any, text: str) -> list[tuple[int, int]]:
    """Character span of each token of `tokenizer.encode(text)` (EvalTokenizer: a leading BOS
    gets (0, 0)); byte tokenizer: the character each byte belongs to."""
    from hybrid_megatron.data.tokenizer import ByteTokenizer

    base = getattr(tokenizer, "base", tokenizer)
    bos = [(0, 0)] if getattr(tokenizer, "bos_id", None) is not None else []
    if isinstance(base, ByteTokenizer):
        spans = []
        for i, ch in enumerate(text):
            spans.extend([(i, i + 1)] * len(ch.encode("utf-8")))
        return bos + spans
    hf = getattr(base, "hf_tokenizer", None)
    if hf is None or not getattr(hf, "is_fast", False):
        raise ValueError(
            f"{tokenizer!r} gives no character offsets (needs a fast HF tokenizer or the byte "
            "tokenizer); give the evaluator the model's tokenizer (--evaluator-tokenizer)"
        )
    enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    return bos + [tuple(map(int, o)) for o in enc["offset_mapping"]]


def map_key_tokens(
    eval_spans: Sequence[tuple[int, int]],
    eval_mask: torch.Tensor,
    model_spans: Sequence[tuple[int, int]],
) -> torch.Tensor:
    """Model-token key mask [len(model_spans) - 1]: tokens overlapping a key evaluator token."""
    keys = sorted(eval_spans[t + 1] for t in torch.nonzero(eval_mask).flatten().tolist())
    keys = [(a, b) for a, b in keys if b > a]
    out = torch.zeros(len(model_spans) - 1, dtype=torch.bool)
    j = 0
    for u in range(1, len(model_spans)):
        a, b = model_spans[u]
        if b <= a:
            continue
        while j < len(keys) and keys[j][1] <= a:
            j += 1
        k = j
        while k < len(keys) and keys[k][0] < b:
            if keys[k][1] > a:
                out[u - 1] = True
                break
            k += 1
    return out


# ----------------------------------------------------------------------------- sequences


@dataclass
class KeyedSequence:
    """One evaluated sequence (model token ids) with its key-token mask [length - 1]."""

    ids: list[int]
    key: torch.Tensor


def same_tokenization(a: Any, b: Any) -> bool:
    """Whether two tokenizers encode alike (spec, BOS and a probe text)."""
    probe = "LongPPL probe: The special magic number is 7391042. Ünïcode 字."
    return getattr(a, "spec", None) == getattr(b, "spec", None) and a.encode(probe) == b.encode(
        probe
    )


def build_sequences(
    settings: LongPPLSettings,
    model_tok: Any,
    evaluator: torch.nn.Module,
    eval_tok: Any,
    data: str | None,
) -> list[KeyedSequence]:
    """`num_samples` sequences of `length` model tokens with key tokens from the evaluator."""
    from hybrid_megatron.eval.perplexity import PplSequences, iter_texts
    from hybrid_megatron.eval.tasks.errors import EvalDataError

    s = settings
    out: list[KeyedSequence] = []
    if same_tokenization(model_tok, eval_tok):
        seqs = PplSequences(model_tok, data, pack=s.pack, seed=s.seed)
        for i in range(s.num_samples):
            ids = seqs.get(s.length, i)
            if ids is None:
                break
            long, short = evaluator_losses(evaluator, ids, s.short_context, s.block)
            out.append(
                KeyedSequence(
                    ids, select_key_tokens(long, short, s.gain_threshold, s.loss_threshold)
                )
            )
    else:
        if data is None or s.pack:
            raise EvalDataError(
                "the evaluator tokenizes differently from the model, so key tokens are mapped "
                "through character offsets of unpacked text documents: pass --data with "
                ".jsonl/.txt documents and no --pack, or use an evaluator with the model's "
                "tokenizer"
            )
        for text in iter_texts(data):
            m_spans = char_spans(model_tok, text)
            if len(m_spans) < s.length:
                continue
            ids = model_tok.encode(text)[: s.length]
            m_spans = m_spans[: s.length]
            prefix = text[: m_spans[-1][1]]
            e_ids = eval_tok.encode(prefix)
            e_spans = char_spans(eval_tok, prefix)
            long, short = evaluator_losses(evaluator, e_ids, s.short_context, s.block)
            e_mask = select_key_tokens(long, short, s.gain_threshold, s.loss_threshold)
            out.append(KeyedSequence(ids, map_key_tokens(e_spans, e_mask, m_spans)))
            if len(out) == s.num_samples:
                break
    if not out:
        raise EvalDataError(
            f"no sequence of {s.length} tokens in {data or 'the generated corpus'}; "
            "lower --length or pass longer documents (or --pack)"
        )
    return out


# ----------------------------------------------------------------------------- scoring


def score_sequence(
    model: torch.nn.Module, seq: KeyedSequence, bin_width: int | None = None
) -> dict[str, Any]:
    """Plain and key-token losses (sums, counts, by position bin) of one sequence."""
    losses = token_losses(model, torch.tensor(seq.ids, dtype=torch.long)).double()
    bins = position_bins(len(seq.ids), bin_width)
    key = seq.key.to(losses.device)
    key_bins = bin_losses(torch.where(key, losses, torch.zeros_like(losses)), bins)
    counts = [int(key[lo - 1 : hi - 1].sum()) for lo, hi in bins]
    return {
        "loss_sum": float(losses.sum()),
        "tokens": int(losses.numel()),
        "key_loss_sum": float(losses[key].sum()),
        "key_tokens": int(key.sum()),
        "bins": bin_losses(losses, bins),
        "key_bins": [[lo, hi, total, n] for (lo, hi, total, _), n in zip(key_bins, counts)],
    }


def aggregate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Totals over sequences: loss, ppl, longppl (None without key tokens), bins."""
    tot = sum(r["loss_sum"] for r in rows)
    n = sum(r["tokens"] for r in rows)
    ktot = sum(r["key_loss_sum"] for r in rows)
    kn = sum(r["key_tokens"] for r in rows)
    bins = []
    for i, (lo, hi, _, _) in enumerate(rows[0]["bins"]):
        s = sum(r["bins"][i][2] for r in rows)
        c = sum(r["bins"][i][3] for r in rows)
        ks = sum(r["key_bins"][i][2] for r in rows)
        kc = sum(r["key_bins"][i][3] for r in rows)
        bins.append(
            {
                "lo": lo,
                "hi": hi,
                "loss": s / c if c else None,
                "tokens": c,
                "key_loss": ks / kc if kc else None,
                "key_tokens": kc,
            }
        )
    return {
        "loss": tot / n,
        "ppl": math.exp(tot / n),
        "key_loss": ktot / kn if kn else None,
        "longppl": math.exp(ktot / kn) if kn else None,
        "key_tokens": kn,
        "tokens": n,
        "key_fraction": kn / n,
        "sequences": len(rows),
        "bins": bins,
    }

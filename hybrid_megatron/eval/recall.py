"""Long-range recall probe on held-out documents of the built-in synthetic corpus.

Each fact stated in a document ("key 4821 = 73019." / "The pass key is 58213.") is asked
later; the probe checks whether the model's greedy continuation after the query reproduces
the value. One teacher-forced forward per batch suffices: greedy decoding emits the value
exactly when the argmax at every value position (given the correct earlier digits) is the
value's token. Reported per distance bin, with chance for a 5-digit value = 1e-5
(and 26 ** -n for n random letters).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hybrid_megatron.data.synthetic import iter_documents
from hybrid_megatron.data.tokenizer import Tokenizer

# Held-out documents: the training corpus uses seeds 0, 1, ...; this offset keeps them apart.
HELD_OUT_SEED_OFFSET = 1_000_003


@dataclass
class RecallItem:
    tokens: list[int]  # document tokens up to and including the value
    value_start: int  # token index of the value's first token
    value_len: int
    distance: int  # characters between statement and query
    kind: str
    chance: float = 1e-5  # of guessing the value: 10 ** -digits * 26 ** -letters


def recall_items(
    tokenizer: Tokenizer,
    num_docs: int,
    seq_length: int,
    seed: int = 0,
    min_distance: int = 16,
    max_distance: int = 192,
    max_facts: int = 3,
    **mix: float | int | None,
) -> list[RecallItem]:
    """Facts of held-out documents whose value ends within `seq_length` tokens.

    `mix` takes `iter_documents`' document-mix options (niah_fraction, passkey_fraction,
    copy_fraction, repeat_fraction, doc_length, max_haystack), so the probe covers the kinds
    the model was trained on.
    """
    items = []
    docs = iter_documents(
        num_docs, seed + HELD_OUT_SEED_OFFSET, min_distance, max_distance, max_facts, **mix
    )
    for doc in docs:
        for fact in doc.facts:
            end = fact.answer_start + len(fact.value)
            prefix = tokenizer.encode(doc.text[: fact.answer_start])
            through = tokenizer.encode(doc.text[:end])
            if through[: len(prefix)] != prefix or len(through) > seq_length:
                continue  # value merged with the text before it, or too long for the model
            value_len = len(through) - len(prefix)
            digits = sum(c.isdigit() for c in fact.value)
            letters = sum(c.isalpha() for c in fact.value)
            chance = 10.0**-digits * 26.0**-letters
            items.append(
                RecallItem(through, len(prefix), value_len, fact.distance, fact.kind, chance)
            )
    return items


def _bin_name(distance: int, edges: Sequence[int]) -> str:
    lo = 0
    for hi in edges:
        if distance < hi:
            return f"{lo}-{hi - 1}"
        lo = hi
    return f">={lo}"


@torch.no_grad()
def recall_accuracy(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    items: Sequence[RecallItem],
    batch_size: int = 16,
    bin_edges: Sequence[int] = (64, 128, 192, 256),
    pad_id: int = 0,
) -> dict:
    """Exact-match recall overall, per distance bin and per fact kind.

    `logits_fn(tokens[b, s]) -> logits[b, s, vocab]` is any causal LM forward.
    """
    per_bin: dict[str, list[int]] = {}
    per_kind: dict[str, list[int]] = {}
    digit_hits = digit_total = 0
    for i in range(0, len(items), batch_size):
        batch = items[i : i + batch_size]
        width = max(len(it.tokens) for it in batch)
        tokens = torch.full((len(batch), width), pad_id, dtype=torch.long)
        for row, it in enumerate(batch):
            tokens[row, : len(it.tokens)] = torch.tensor(it.tokens)
        predicted = logits_fn(tokens).argmax(dim=-1)
        for row, it in enumerate(batch):
            lo, hi = it.value_start, it.value_start + it.value_len
            pred = predicted[row, lo - 1 : hi - 1]  # position t predicts token t+1
            gold = tokens[row, lo:hi]
            hits = int((pred == gold).sum())
            digit_hits += hits
            digit_total += it.value_len
            exact = int(hits == it.value_len)
            per_bin.setdefault(_bin_name(it.distance, bin_edges), []).append(exact)
            per_kind.setdefault(it.kind, []).append(exact)

    def summary(groups: dict[str, list[int]]) -> dict:
        def order(name: str) -> tuple[int, str]:
            digits = name.lstrip(">=").split("-")[0]
            return (int(digits), name) if digits.isdigit() else (0, name)

        return {
            k: {"accuracy": sum(v) / len(v), "n": len(v)}
            for k, v in sorted(groups.items(), key=lambda kv: order(kv[0]))
        }

    total = [x for v in per_bin.values() for x in v]
    return {
        "exact_match": sum(total) / max(len(total), 1),
        "n": len(total),
        "token_accuracy": digit_hits / max(digit_total, 1),
        "chance_exact_match": sum(it.chance for it in items) / max(len(items), 1),
        "by_distance": summary(per_bin),
        "by_kind": summary(per_kind),
    }

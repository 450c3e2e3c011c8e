"""Long-context perplexity: next-token loss by position, binned, on long sequences.

Sequences of `length` tokens come from
- user documents (`path`: a .jsonl file with a "text" field per line, a .txt file = one
  document, or a directory of such files, sorted by name): by default each document with at
  least `length` tokens gives one sequence (its first `length` tokens), so loss at position t
  measures the use of t tokens of the same document; with `pack=True` documents are joined
  (EOD between them) and cut into consecutive sequences;
- or, without `path`, held-out documents of the built-in synthetic corpus
  (`hybrid_megatron.data.synthetic.iter_documents`, seed offset by `HELD_OUT_SEED_OFFSET`),
  always packed.
Position t (1..length-1) is the token predicted from tokens 0..t-1. Bins are powers of two
([1, 2), [2, 4), ..., up to length) or of a fixed width ([1, W), [W, 2W), ...). Each sequence
gives one row with (loss sum, token count) per bin; `aggregate_ppl` sums rows per length.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hybrid_megatron.eval.tasks.errors import EvalDataError, MissingTaskDataError

HEAD_CHUNK = 4096  # positions per lm_head call (bounds the logits' memory)


# ----------------------------------------------------------------------------- bins


def position_bins(length: int, width: int | None = None) -> list[tuple[int, int]]:
    """[lo, hi) position bins covering 1..length-1: powers of two, or `width` wide."""
    if length < 2:
        raise ValueError(f"perplexity needs sequences of >= 2 tokens, got {length}")
    bins = []
    if width is None:
        lo = 1
        while lo < length:
            bins.append((lo, min(2 * lo, length)))
            lo *= 2
    else:
        if width < 2:
            raise ValueError(f"bin width must be >= 2, got {width}")
        lo = 1
        while lo < length:
            hi = min((lo // width + 1) * width, length)
            bins.append((lo, hi))
            lo = hi
    return bins


def bin_losses(losses: torch.Tensor, bins: Sequence[tuple[int, int]]) -> list[list[float]]:
    """[[lo, hi, loss_sum, count], ...] of `losses[t - 1]` = loss at position t."""
    out = []
    for lo, hi in bins:
        chunk = losses[lo - 1 : hi - 1]
        out.append([lo, hi, float(chunk.double().sum()), int(chunk.numel())])
    return out


# ----------------------------------------------------------------------------- model


@torch.no_grad()
def token_losses(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Per-position next-token losses [length - 1] (float32) of one sequence `ids` [length].

    Models with `.model` (decoder) and `.lm_head` are run without a cache and the head is
    applied in chunks, so long sequences never hold all logits at once.
    """
    ids = ids.view(1, -1)
    device = next(model.parameters()).device
    ids = ids.to(device)
    targets = ids[0, 1:]
    if hasattr(model, "model") and hasattr(model, "lm_head"):
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
        parts = []
        for start in range(0, hidden.shape[0], HEAD_CHUNK):
            logits = model.lm_head(hidden[start : start + HEAD_CHUNK]).float()
            parts.append(
                F.cross_entropy(logits, targets[start : start + HEAD_CHUNK], reduction="none")
            )
        return torch.cat(parts).cpu()
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    return F.cross_entropy(logits, targets, reduction="none").cpu()


def evaluate_sequence(
    model: torch.nn.Module, ids: Sequence[int], bin_width: int | None = None
) -> dict[str, Any]:
    """Loss, token count, binned losses and wall time of one sequence."""
    start = time.perf_counter()
    losses = token_losses(model, torch.tensor(list(ids), dtype=torch.long))
    seconds = time.perf_counter() - start
    return {
        "loss": float(losses.double().mean()),
        "tokens": int(losses.numel()),
        "bins": bin_losses(losses, position_bins(len(ids), bin_width)),
        "seconds": round(seconds, 4),
    }


# ----------------------------------------------------------------------------- data


def _texts_of_file(path: Path) -> Iterator[str]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    text = row["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise EvalDataError(
                        f'{path}:{n} is not a JSON object with a "text" field; perplexity '
                        'data is .jsonl with {"text": ...} per line, or .txt files.'
                    ) from None
                yield str(text)
    elif path.suffix == ".txt":
        yield path.read_text(encoding="utf-8")
    else:
        raise EvalDataError(f"{path}: perplexity data must be .jsonl or .txt files.")


def iter_texts(path: str | os.PathLike) -> Iterator[str]:
    """Documents of a .jsonl / .txt file or of every such file in a directory (sorted), read
    lazily; `MissingTaskDataError` / `EvalDataError` for a missing path or no documents."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingTaskDataError(
            "ppl",
            "long documents",
            path,
            'Pass --ppl-data with a .jsonl file ({"text": ...} per line), a .txt file or a '
            "directory of them, or leave it out to use held-out synthetic documents.",
        )
    files = (
        sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".txt"))
        if path.is_dir()
        else [path]
    )
    count = 0
    for f in files:
        for text in _texts_of_file(f):
            if text:
                count += 1
                yield text
    if not count:
        raise EvalDataError(f"{path} holds no documents (.jsonl rows with text or .txt files).")


def load_texts(path: str | os.PathLike) -> list[str]:
    """All documents of `path` (see `iter_texts`)."""
    return list(iter_texts(path))


class PplSequences:
    """Deterministic evaluation sequences of one tokenizer: `get(length, index)`.

    Documents are read and tokenized lazily, only as far as the requested sequences need.
    """

    def __init__(
        self,
        tokenizer: Any,
        path: str | os.PathLike | None = None,
        pack: bool = False,
        seed: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        self.path = None if path is None else Path(path)
        self.pack = pack or path is None
        self.seed = seed
        self._docs: list[array] = []  # documents read so far (unpacked mode), compact
        self._stream: list[int] = []  # documents joined by EOD (packed mode)
        self._doc_iter: Iterator[list[int]] | None = None

    @property
    def source(self) -> str:
        return "synthetic" if self.path is None else str(self.path)

    def _documents(self) -> Iterator[list[int]]:
        if self.path is not None:
            for text in iter_texts(self.path):
                yield self.tokenizer.encode(text)
            return
        from hybrid_megatron.data.synthetic import iter_documents
        from hybrid_megatron.eval.recall import HELD_OUT_SEED_OFFSET

        for doc in iter_documents(2**62, self.seed + HELD_OUT_SEED_OFFSET):
            yield self.tokenizer.encode(doc.text)

    def _next_doc(self) -> list[int] | None:
        if self._doc_iter is None:
            self._doc_iter = self._documents()
        return next(self._doc_iter, None)

    def _fill(self, n_tokens: int) -> None:
        while len(self._stream) < n_tokens:
            doc = self._next_doc()
            if doc is None:
                return
            self._stream.extend(doc)
            self._stream.append(self.tokenizer.eod)

    def _long_docs(self, length: int) -> Iterator[array]:
        """Documents with >= `length` tokens, in order, reading more as needed."""
        i = 0
        while True:
            while i >= len(self._docs):
                doc = self._next_doc()
                if doc is None:
                    return
                self._docs.append(array("l", doc))
            if len(self._docs[i]) >= length:
                yield self._docs[i]
            i += 1

    def get(self, length: int, index: int) -> list[int] | None:
        """Sequence `index` of `length` tokens, or None when the data has too few."""
        if self.pack:
            self._fill((index + 1) * length)
            seq = self._stream[index * length : (index + 1) * length]
            return seq if len(seq) == length else None
        for i, doc in enumerate(self._long_docs(length)):
            if i == index:
                return doc[:length].tolist()
        return None

    def available(self, length: int) -> int:
        """How many sequences of `length` tokens the data holds (synthetic data: unlimited)."""
        if self.path is None:
            return sys.maxsize
        if self.pack:
            self._fill(sys.maxsize)
            return len(self._stream) // length
        return sum(1 for _ in self._long_docs(length))


# ----------------------------------------------------------------------------- aggregation


def aggregate_ppl(rows: Iterable[Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
    """length -> {loss, ppl, n, tokens, bins: [{lo, hi, loss, ppl, tokens}]} over rows."""
    by_length: dict[int, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_length.setdefault(int(row["length"]), []).append(row)
    out: dict[int, dict[str, Any]] = {}
    for length in sorted(by_length):
        group = by_length[length]
        sums: dict[tuple[int, int], list[float]] = {}
        for row in group:
            for lo, hi, total, count in row["bins"]:
                acc = sums.setdefault((int(lo), int(hi)), [0.0, 0])
                acc[0] += total
                acc[1] += count
        bins = [
            {
                "lo": lo,
                "hi": hi,
                "loss": round(total / count, 6),
                "ppl": round(math.exp(total / count), 4),
                "tokens": int(count),
            }
            for (lo, hi), (total, count) in sorted(sums.items())
            if count
        ]
        total = sum(b[2] for r in group for b in r["bins"])
        count = sum(b[3] for r in group for b in r["bins"])
        out[length] = {
            "loss": round(total / count, 6),
            "ppl": round(math.exp(total / count), 4),
            "n": len(group),
            "tokens": int(count),
            "bins": bins,
        }
    return out

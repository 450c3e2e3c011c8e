"""Greedy generation over many prompts, batching prompts of equal token length.

Our models take no padding, so a batch only holds prompts of the same length (RULER prompts
fitted to one target length often share it exactly; others run alone). Results come back
batch by batch so the caller can record each finished sample at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from hybrid_megatron.eval.models import EvalTokenizer


@dataclass
class Generation:
    index: int  # position of the prompt in the caller's list
    text: str
    new_tokens: int
    seconds: float  # the batch's wall time divided by its size


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Positions grouped by equal length (order of first appearance), split to batch_size."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    batches = []
    for members in groups.values():
        for start in range(0, len(members), max(1, batch_size)):
            batches.append(members[start : start + max(1, batch_size)])
    return batches


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    tokenizer: EvalTokenizer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: Sequence[int] | int,
    batch_size: int = 1,
    device: torch.device | str | None = None,
) -> Iterator[list[Generation]]:
    """Yield the generations of each batch (greedy, stops at EOS or `max_new_tokens`)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    budgets = (
        [int(max_new_tokens)] * len(prompts)
        if isinstance(max_new_tokens, int)
        else [int(m) for m in max_new_tokens]
    )
    keys = [(len(p), b) for p, b in zip(prompts, budgets)]
    order = {k: n for n, k in enumerate(dict.fromkeys(keys))}
    for batch in length_batches([order[k] for k in keys], batch_size):
        ids = torch.tensor([list(prompts[i]) for i in batch], dtype=torch.long, device=device)
        start = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=budgets[batch[0]],
            eos_token_id=list(tokenizer.eos_ids),
            pad_token_id=tokenizer.pad_id,
            num_beams=1,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - start) / len(batch)
        results = []
        for row, i in enumerate(batch):
            new = out[row, ids.shape[1] :].tolist()
            text = tokenizer.decode(new)
            n_new = next((k for k, t in enumerate(new) if t in tokenizer.eos_ids), len(new))
            results.append(Generation(i, text, n_new, seconds))
        yield results

"""Greedy generation over many prompts in left-padded, length-sorted batches.

Prompts with the same generation budget are sorted by token length and cut into batches of
`batch_size`, so a batch pads each prompt by at most the length spread of its neighbours
(RULER prompts fitted to one target length differ by a few tokens). The HF model takes
left padding exactly (padded keys hidden, Mamba-2 states untouched by padding), so a batch
generates what each prompt would alone. Results come back batch by batch so the caller can
record each finished sample at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from hybrid_megatron.errors import GenerationCheckError
from hybrid_megatron.eval.models import EvalTokenizer


@dataclass
class Generation:
    index: int  # position of the prompt in the caller's list
    text: str
    new_tokens: int
    seconds: float  # the batch's wall time divided by its size
    token_ids: list[int] = field(default_factory=list)  # generated ids, up to (excl.) EOS


def sorted_batches(
    lengths: Sequence[int], budgets: Sequence[int], batch_size: int
) -> list[list[int]]:
    """Positions grouped by generation budget, sorted by length, cut into `batch_size` batches.

    Groups keep the order of their first appearance; within a group, longer prompts come first
    (a memory-hungry batch fails at once rather than at the end).
    """
    groups: dict[int, list[int]] = {}
    for i, budget in enumerate(budgets):
        groups.setdefault(budget, []).append(i)
    size = max(1, batch_size)
    batches = []
    for members in groups.values():
        members = sorted(members, key=lambda i: (-lengths[i], i))
        batches += [members[start : start + size] for start in range(0, len(members), size)]
    return batches


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both [len(prompts), longest], padding on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


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
    for batch in sorted_batches([len(p) for p in prompts], budgets, batch_size):
        ids, mask = left_pad([prompts[i] for i in batch], tokenizer.pad_id, device)
        start = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
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
            n_new = next((k for k, t in enumerate(new) if t in tokenizer.eos_ids), len(new))
            text = tokenizer.decode(new[:n_new])
            results.append(Generation(i, text, n_new, seconds, new[:n_new]))
        yield results


# Logit gap below which a differing greedy choice is a near-tie of the two computations, not a
# broken cache (relative to the largest |logit|; half precision rounds far more than fp32).
_TIE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}
_HALF_TIE_TOLERANCE = 2e-2


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


@torch.no_grad()
def check_cached_decoding(
    model: torch.nn.Module,
    tokenizer: EvalTokenizer,
    prompt: Sequence[int],
    model_name: str,
    tokens: int = 4,
) -> None:
    """Raise GenerationCheckError unless cached greedy decoding (the path `greedy_generate`
    takes) equals greedy decoding by repeated full forwards for the first `tokens` tokens.

    Costs about `tokens + 1` prefills of `prompt`: run it once per model before a sweep.
    A differing token is accepted only as a numerical near-tie of the full forward's logits.
    """
    param = next(model.parameters())
    tol = _TIE_TOLERANCE.get(param.dtype, _HALF_TIE_TOLERANCE)
    (cached,) = next(greedy_generate(model, tokenizer, [prompt], tokens, 1, param.device))
    seq = torch.tensor([list(prompt)], dtype=torch.long, device=param.device)
    for step in range(tokens):
        logits = model(seq, use_cache=False).logits[0, -1].float()
        best = int(logits.argmax())
        got = cached.token_ids[step] if step < len(cached.token_ids) else None
        if got is None and best in tokenizer.eos_ids:
            return  # both stopped at EOS
        if got != best:
            scale = max(1.0, float(logits.abs().max()))
            if got is not None and float(logits[best] - logits[got]) <= tol * scale:
                return  # a near-tie: the two paths legitimately diverge from here
            raise GenerationCheckError(
                f"Cached generation of {model_name} disagrees with decoding by full forwards "
                f"(transformers {_transformers_version()}): new token {step} is "
                f"{'EOS/none' if got is None else got} with the cache but {best} without it. "
                "Every generated answer of this sweep would be wrong, so nothing was evaluated. "
                "This usually means the installed transformers hands the cache to the model in "
                "a way it does not read: install a transformers release in the range "
                "hybrid-megatron was tested with (pip install -e . resolves it; the README "
                "lists tested versions), or pass --skip-generation-check to evaluate anyway."
            )
        seq = torch.cat([seq, seq.new_tensor([[best]])], dim=1)

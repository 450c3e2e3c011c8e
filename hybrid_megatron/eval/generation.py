"""Greedy generation over many prompts, batching prompts of equal token length.

Our models take no padding, so a batch only holds prompts of the same length (RULER prompts
fitted to one target length often share it exactly; others run alone). Results come back
batch by batch so the caller can record each finished sample at once.
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

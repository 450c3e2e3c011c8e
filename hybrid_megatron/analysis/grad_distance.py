"""Gradient influence by distance (`hybrid-megatron analyze grad-distance`).

For each sequence of `length` tokens: the target is a scalar of the last `last_n` positions'
logits (averaged over those positions): the sum over the vocabulary ("logit_sum", the
paper's) or the largest logit ("argmax_logit"). The influence of input token i is the L2
norm of d target / d embedding_i. Curves are indexed by the distance to the last token
(0 = the last token) and averaged over sequences; power-of-two distance bins summarise them.

Writes DIR/grad_distance.json and DIR/grad_distance.png.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from hybrid_megatron.errors import ConfigError

TARGETS = ("logit_sum", "argmax_logit")


@dataclass
class GradSettings:
    length: int = 4096
    num_sequences: int = 8
    last_n: int = 20
    target: str = "logit_sum"
    data: str | None = None  # .jsonl / .txt / dir; default: the built-in synthetic corpus
    seed: int = 42


def influence(model: Any, ids: list[int], last_n: int, target: str = "logit_sum") -> torch.Tensor:
    """||d target / d embedding_i|| for every position i of one sequence, [len(ids)] float64."""
    if target not in TARGETS:
        raise ConfigError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    embeds = model.get_input_embeddings()(x).detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(inputs_embeds=embeds, use_cache=False).logits
        last = logits[0, -min(last_n, logits.shape[1]) :].float().mean(0)
        value = last.sum() if target == "logit_sum" else last.max()
        (grad,) = torch.autograd.grad(value, embeds)
    return grad[0].double().norm(dim=-1).cpu()


def distance_bins(length: int) -> list[tuple[int, int]]:
    """[lo, hi) distance bins: [0, 1), [1, 2), [2, 4), ... up to `length`."""
    bins, lo = [(0, 1)], 1
    while lo < length:
        bins.append((lo, min(2 * lo, length)))
        lo *= 2
    return bins


def grad_curve(model: Any, sequences: list[list[int]], settings: GradSettings) -> dict[str, Any]:
    """Mean influence per distance to the last token, and per distance bin."""
    from hybrid_megatron.analysis.sharding import shard_map

    model.requires_grad_(False)
    curves = shard_map(
        sequences, lambda ids: influence(model, ids, settings.last_n, settings.target).flip(0)
    )
    mean = torch.stack(curves).mean(0)
    bins = [
        {"lo": lo, "hi": hi, "mean": float(mean[lo:hi].mean())}
        for lo, hi in distance_bins(settings.length)
    ]
    return {"mean_by_distance": mean.tolist(), "bins": bins, "sequences": len(sequences)}


def run_grad_distance(
    model_path: str,
    out: Path,
    settings: GradSettings,
    *,
    device: str = "auto",
    dtype: str | None = None,
    tokenizer: str | None = None,
    verify_conversion: bool = True,
) -> Path:
    """`analyze grad-distance`: write grad_distance.json and grad_distance.png to `out`."""
    from hybrid_megatron.analysis.plots import plot_lines
    from hybrid_megatron.analysis.sharding import is_writer, load_analysis_model
    from hybrid_megatron.eval.perplexity import PplSequences

    if settings.last_n < 1 or settings.num_sequences < 1:
        raise ConfigError("--last-n and --num-sequences must be >= 1")
    model, tok, info = load_analysis_model(model_path, device, dtype, tokenizer, verify_conversion)
    data = PplSequences(tok, settings.data, seed=settings.seed)
    sequences = [data.get(settings.length, i) for i in range(settings.num_sequences)]
    if any(s is None for s in sequences):
        raise ConfigError(
            f"{settings.data} holds fewer than {settings.num_sequences} sequences of "
            f"{settings.length} tokens; lower --num-sequences or --length."
        )
    curve = grad_curve(model, sequences, settings)
    result = {"model": info.to_dict(), "settings": asdict(settings), **curve}
    if not is_writer():
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / "grad_distance.json").write_text(json.dumps(result, indent=1))
    mids = [math.sqrt(max(b["lo"], 0.5) * b["hi"]) for b in curve["bins"]]
    plot_lines(
        mids,
        {info.name: [b["mean"] for b in curve["bins"]]},
        out / "grad_distance.png",
        xlabel="distance to the last token",
        ylabel=f"||d {settings.target} / d embedding||",
        title=f"gradient influence (last {settings.last_n} positions)",
        log_x=True,
    )
    return out

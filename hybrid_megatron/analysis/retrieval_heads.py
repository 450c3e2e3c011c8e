"""Retrieval heads: which attention heads fetch the needle, by two definitions.

- Attention mass (the paper's, THUNLP): the attention of one query token (default the
  second-to-last prompt token) summed over every prompt position holding the answer's
  tokens (every occurrence), averaged over samples.
- Copy-paste (Wu et al., 2024): while greedily decoding the answer, a head hits at a step
  when its top-1 attended position lies in the needle span (the answer's positions in the
  prompt) and the token there equals the token generated at that step; a sample's score is
  hits / needle length (answer tokens), averaged over the samples whose answer was
  recovered. Heads scoring above 0.1 are retrieval heads.

Only attention layers are scored, each over the keys its window lets the query see (see
`attention_probe`). Prompts are the eval's generated needle tasks (niah_*, passkey).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from hybrid_megatron.analysis.attention_probe import AttentionLayout, AttentionProbe, ProbeStep
from hybrid_megatron.errors import ConfigError

Tensor = torch.Tensor
NEEDLE_TASKS = ("niah_", "passkey")


@dataclass
class RetrievalSettings:
    task: str = "niah_single_1"
    length: int = 4096
    num_samples: int = 20
    top_k: int = 20
    seed: int = 42
    query_offset: int = 2  # attention-mass query: the N-th last prompt token
    threshold: float = 0.1  # copy-paste score of a retrieval head (Wu et al.)
    max_new_tokens: int = 32  # decoding budget (part of `length`, as in RULER)
    task_options: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- scoring


def find_occurrences(ids: Sequence[int], pattern: Sequence[int]) -> list[int]:
    """Every position covered by an occurrence of `pattern` in `ids` (overlaps included)."""
    ids, pattern = list(ids), list(pattern)
    k = len(pattern)
    out: set[int] = set()
    if k == 0:
        return []
    for start in range(len(ids) - k + 1):
        if ids[start : start + k] == pattern:
            out.update(range(start, start + k))
    return sorted(out)


def attention_mass(rows: dict[int, Tensor], positions: Sequence[int]) -> dict[int, Tensor]:
    """Per layer: each head's attention (rows [heads, keys]) summed over `positions`."""
    index = torch.as_tensor(list(positions), dtype=torch.long)
    return {
        layer: r[:, index].sum(-1) if len(index) else r.new_zeros(r.shape[0])
        for layer, r in rows.items()
    }


def attention_entropy(rows: Tensor, positions: Tensor, window: int | None) -> Tensor:
    """[heads, 2]: mean over queries of the attention entropy (nats) and of the entropy over
    its maximum, ln(keys the query sees): ln(q + 1) at position q under full attention,
    ln(min(q + 1, window)) under a window. rows [heads, queries, keys]; positions [queries]."""
    p = rows.clamp_min(0)
    nats = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)  # [heads, queries]
    seen = positions.to(torch.float64) + 1
    if window is not None:
        seen = seen.clamp(max=window)
    norm = nats / torch.log(seen).clamp_min(1e-12).to(nats.dtype)
    keep = seen > 1  # a query seeing one key has no entropy to normalise
    norm_mean = (
        norm[:, keep].mean(-1) if bool(keep.any()) else torch.full_like(nats[:, 0], float("nan"))
    )
    return torch.stack([nats.mean(-1), norm_mean], dim=-1)


def copy_hits(
    rows: dict[int, Tensor], needle: set[int], token_ids: Sequence[int], generated: int
) -> dict[int, Tensor]:
    """Per layer: 1 for each head whose top-1 key is in `needle` and holds `generated`."""
    out = {}
    for layer, r in rows.items():
        top = r.argmax(-1).tolist()  # [heads]
        out[layer] = torch.tensor(
            [float(p in needle and int(token_ids[p]) == int(generated)) for p in top]
        )
    return out


@dataclass
class SampleScores:
    """One prompt's per-layer head scores."""

    mass: dict[int, Tensor]  # attention mass per head
    copy: dict[int, Tensor]  # hits / needle length per head
    recovered: bool  # the answer was generated (copy scores count only then)
    generated: list[int]
    answer_positions: list[int]
    entropy: dict[int, Tensor] = field(default_factory=dict)  # [heads, 2]: nats, normalised


def score_sample(
    model: Any,
    ids: Sequence[int],
    answers: Sequence[Sequence[Sequence[int]]],
    recovered: Callable[[list[int]], bool],
    *,
    layout: AttentionLayout | None = None,
    query_offset: int = 2,
    max_new_tokens: int | None = None,
    eos_ids: Sequence[int] = (),
    entropy_queries: int = 0,
) -> SampleScores:
    """Both scores of one prompt.

    `answers`: for each answer, its token-id variants (how it may be tokenized in the
    prompt); every occurrence of every variant is an answer position. `recovered(generated)`
    says whether the decoded tokens contain the answer; decoding stops there, at EOS or after
    `max_new_tokens` (default: answer tokens + 8). With `entropy_queries` = q, the
    attention entropy of the last q prompt positions is measured in the same pass.
    """
    ids = [int(i) for i in ids]
    n = len(ids)
    if not 1 <= query_offset <= n:
        raise ConfigError(f"query offset {query_offset} does not fit a {n}-token prompt")
    positions = sorted(
        {p for variants in answers for v in variants for p in find_occurrences(ids, v)}
    )
    needle_len = sum(min(len(v) for v in variants if v) for variants in answers)
    budget = max_new_tokens or needle_len + 8
    probe = AttentionProbe(model, layout)
    fed = min(n, max(query_offset, entropy_queries))
    if n > fed:
        probe.prefill(torch.tensor(ids[: n - fed]))
    step = probe.attend(torch.tensor(ids[n - fed :]))
    mass = attention_mass(
        {k: v[:, fed - query_offset] for k, v in step.attentions.items()}, positions
    )
    entropy = {}
    if entropy_queries:
        q = min(entropy_queries, n)
        entropy = {
            layer: attention_entropy(
                rows[:, fed - q :], step.positions[fed - q :], probe.layout.window_of(layer)
            )
            for layer, rows in step.attentions.items()
        }
    needle = set(positions)
    hits = {k: torch.zeros(v.shape[0]) for k, v in step.attentions.items()}
    sequence, generated = list(ids), []
    current: ProbeStep = step
    while True:
        token = int(current.logits[-1].argmax())
        for layer, h in copy_hits(
            {k: v[:, -1] for k, v in current.attentions.items()}, needle, sequence, token
        ).items():
            hits[layer] += h
        generated.append(token)
        sequence.append(token)
        done = recovered(generated)
        if done or token in eos_ids or len(generated) >= budget:
            break
        current = probe.attend(torch.tensor([token]))
    copy = {k: v / max(needle_len, 1) for k, v in hits.items()}
    return SampleScores(mass, copy, done, generated, positions, entropy)


def answer_variants(tokenizer: Any, answer: str) -> list[list[int]]:
    """Token ids of `answer` as it may appear in a prompt: bare, and after a space (BPE
    merges the space into the first token; a lone whitespace token is dropped)."""
    base = getattr(tokenizer, "base", tokenizer)
    out: list[list[int]] = []
    for text in (answer, " " + answer):
        v = list(base.encode(text))
        if text.startswith(" ") and v and not base.decode(v[:1]).strip():
            v = v[1:]
        if v and v not in out:
            out.append(v)
    return out


# ----------------------------------------------------------------------------- aggregation


def _stack(
    per_sample: list[dict[int, Tensor]], layers: Sequence[int], heads: int
) -> list[list[float]]:
    """Mean over samples as a [attention layer][head] list (zeros when no sample counts)."""
    if not per_sample:
        return [[0.0] * heads for _ in layers]
    return [torch.stack([s[layer] for s in per_sample]).mean(0).tolist() for layer in layers]


def _top(matrix: list[list[float]], layout: AttentionLayout, k: int) -> list[dict[str, Any]]:
    flat = [
        {"layer": layer, "head": h, "kind": layout.kinds[i], "score": matrix[i][h]}
        for i, layer in enumerate(layout.layers)
        for h in range(layout.num_heads)
    ]
    flat.sort(key=lambda r: (-r["score"], r["layer"], r["head"]))
    return flat[:k]


def summarize(
    scores: list[SampleScores], layout: AttentionLayout, top_k: int, threshold: float
) -> dict[str, Any]:
    """The JSON body: per-head matrices, per-head records, top heads, retrieval heads."""
    layers = layout.layers
    mass = _stack([s.mass for s in scores if s.answer_positions], layers, layout.num_heads)
    copy = _stack([s.copy for s in scores if s.recovered], layers, layout.num_heads)
    heads = [
        {
            "layer": layer,
            "head": h,
            "kv_group": h // (layout.num_heads // layout.num_kv_heads),
            "kind": layout.kinds[i],
            "window": layout.windows[i],
            "attention_mass": mass[i][h],
            "copy_paste": copy[i][h],
        }
        for i, layer in enumerate(layers)
        for h in range(layout.num_heads)
    ]
    return {
        "layout": layout.to_dict(),
        "samples": len(scores),
        "samples_with_answer_in_prompt": sum(bool(s.answer_positions) for s in scores),
        "samples_recovered": sum(s.recovered for s in scores),
        "attention_mass": mass,
        "copy_paste": copy,
        "heads": heads,
        "top_heads": {
            "attention_mass": _top(mass, layout, top_k),
            "copy_paste": _top(copy, layout, top_k),
        },
        "retrieval_heads": [
            {"layer": r["layer"], "head": r["head"], "copy_paste": r["copy_paste"]}
            for r in heads
            if r["copy_paste"] > threshold
        ],
    }


# ----------------------------------------------------------------------------- running


def needle_samples(tokenizer: Any, settings: RetrievalSettings) -> list[Any]:
    """The generated needle prompts of `settings` (eval's task generators)."""
    from hybrid_megatron.eval.tasks import generate_samples

    if not settings.task.startswith(NEEDLE_TASKS):
        raise ConfigError(
            f"--task {settings.task} has no needle; use a niah_* task or passkey "
            "(e.g. niah_single_1)."
        )
    return generate_samples(
        settings.task,
        tokenizer,
        target_length=settings.length,
        num_samples=settings.num_samples,
        seed=settings.seed,
        **{"max_new_tokens": settings.max_new_tokens, **settings.task_options},
    )


def score_model(
    model: Any,
    tokenizer: Any,
    samples: list[Any],
    settings: RetrievalSettings,
    entropy_queries: int = 0,
) -> tuple[dict[str, Any], list[SampleScores]]:
    """Score every sample with `model` (sharded over ranks); (summary JSON body, per-sample
    scores). `entropy_queries` > 0 also measures the attention entropy of the last prompt
    positions."""
    from hybrid_megatron.analysis.attention_probe import attention_layout
    from hybrid_megatron.analysis.sharding import shard_map

    layout = attention_layout(model)
    if not layout.layers:
        raise ConfigError("the model has no attention layers: it has no heads to score.")

    def one(sample: Any) -> SampleScores:
        answers = [answer_variants(tokenizer, a) for a in sample.outputs]

        def recovered(gen: list[int]) -> bool:
            text = tokenizer.decode(gen).lower()
            return all(o.lower() in text for o in sample.outputs)

        return score_sample(
            model,
            tokenizer.encode(sample.prompt),
            answers,
            recovered,
            layout=layout,
            query_offset=settings.query_offset,
            max_new_tokens=settings.max_new_tokens,
            eos_ids=getattr(tokenizer, "eos_ids", ()),
            entropy_queries=entropy_queries,
        )

    scores = shard_map(samples, one)
    return summarize(scores, layout, settings.top_k, settings.threshold), scores


def run_retrieval_heads(
    model_path: str,
    out: Path,
    settings: RetrievalSettings,
    *,
    device: str = "auto",
    dtype: str | None = None,
    tokenizer: str | None = None,
    verify_conversion: bool = True,
) -> Path:
    """`analyze retrieval-heads`: score MODEL, write retrieval_heads.json and .png to `out`."""
    from hybrid_megatron.analysis.plots import plot_head_heatmaps
    from hybrid_megatron.analysis.sharding import is_writer, load_analysis_model

    model, tok, info = load_analysis_model(model_path, device, dtype, tokenizer, verify_conversion)
    samples = needle_samples(tok, settings)
    t0 = time.perf_counter()
    body, _ = score_model(model, tok, samples, settings)
    result = {
        "model": info.to_dict(),
        "settings": asdict(settings),
        "seconds": round(time.perf_counter() - t0, 2),
        **body,
    }
    if not is_writer():
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / "retrieval_heads.json").write_text(json.dumps(result, indent=1))
    plot_head_heatmaps(result, out / "retrieval_heads.png")
    return out

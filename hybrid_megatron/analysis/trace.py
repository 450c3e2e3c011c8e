"""Tracing retrieval heads over a run's checkpoints (`hybrid-megatron analyze trace`).

The heads are found on the final checkpoint (top-k by attention mass, plus every copy-paste
retrieval head); then for every complete checkpoint of the run, on the same needle prompts:

- their retrieval scores (both definitions, see `retrieval_heads`);
- their attention entropy over the last few prompt positions (nats, and normalised by the
  log of the keys the query sees: ln(q + 1) under full attention);
- the distance of their Q and K projection weights to a reference checkpoint (the first,
  or a given step): Frobenius norm of the difference, absolute and relative to the
  reference's norm, for Q, K and both together; a GQA head uses its KV group's K.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from hybrid_megatron.analysis.attention_probe import AttentionLayout, attention_layout
from hybrid_megatron.analysis.retrieval_heads import (
    RetrievalSettings,
    SampleScores,
    needle_samples,
    score_model,
    summarize,
)
from hybrid_megatron.errors import ConfigError

Tensor = torch.Tensor


@dataclass
class TraceSettings(RetrievalSettings):
    reference: str | int = "first"  # checkpoint the Q/K distances are measured to
    last_queries: int = 8  # attention entropy over the last N prompt positions


@dataclass(frozen=True)
class Head:
    layer: int
    head: int


def qk_weights(model: Any, layout: AttentionLayout, head: Head) -> tuple[Tensor, Tensor]:
    """(W_q rows of `head`, W_k rows of its KV group), float32 on CPU."""
    layer = model.model.layers[head.layer]
    attn = getattr(layer, "self_attn", None)
    if attn is None:
        raise ConfigError(f"layer {head.layer} is not an attention layer")
    d = layout.head_dim
    group = head.head // (layout.num_heads // layout.num_kv_heads)
    wq = attn.q_proj.weight.detach()[head.head * d : (head.head + 1) * d]
    wk = attn.k_proj.weight.detach()[group * d : (group + 1) * d]
    return wq.float().cpu().clone(), wk.float().cpu().clone()


def weight_distance(
    current: tuple[Tensor, Tensor], reference: tuple[Tensor, Tensor]
) -> dict[str, float]:
    """Frobenius distances of Q, K and [Q; K] to the reference, absolute and relative."""
    (q, k), (rq, rk) = current, reference
    dq, dk = float((q - rq).norm()), float((k - rk).norm())
    nq, nk = float(rq.norm()), float(rk.norm())
    dqk, nqk = math.hypot(dq, dk), math.hypot(nq, nk)

    def rel(a: float, b: float) -> float | None:
        return a / b if b > 0 else None

    return {
        "q_dist": dq,
        "k_dist": dk,
        "qk_dist": dqk,
        "q_rel": rel(dq, nq),
        "k_rel": rel(dk, nk),
        "qk_rel": rel(dqk, nqk),
    }


def traced_heads(final: dict[str, Any]) -> list[dict[str, Any]]:
    """The heads to trace: top-k by attention mass, then copy-paste retrieval heads."""
    out: dict[tuple[int, int], dict[str, Any]] = {}
    for r in final["top_heads"]["attention_mass"]:
        out.setdefault((r["layer"], r["head"]), {"selected_by": []})["selected_by"].append(
            "attention_mass"
        )
    for r in final["retrieval_heads"]:
        out.setdefault((r["layer"], r["head"]), {"selected_by": []})["selected_by"].append(
            "copy_paste"
        )
    return [{"layer": lh[0], "head": lh[1], **v} for lh, v in out.items()]


def _mean(values: list[Tensor]) -> Tensor | None:
    return torch.stack(values).mean(0) if values else None


def checkpoint_record(
    model: Any,
    scores: list[SampleScores],
    heads: list[dict[str, Any]],
    reference: dict[tuple[int, int], tuple[Tensor, Tensor]],
    layout: AttentionLayout,
) -> list[dict[str, Any]]:
    """Per traced head at one checkpoint: retrieval scores, entropy and Q/K distance."""
    mass = {
        lay: _mean([s.mass[lay] for s in scores if s.answer_positions]) for lay in layout.layers
    }
    copy = {lay: _mean([s.copy[lay] for s in scores if s.recovered]) for lay in layout.layers}
    ent = {lay: _mean([s.entropy[lay] for s in scores if s.entropy]) for lay in layout.layers}
    rows = []
    for h in heads:
        lay, i = h["layer"], h["head"]
        cur = qk_weights(model, layout, Head(lay, i))
        rows.append(
            {
                "layer": lay,
                "head": i,
                "attention_mass": None if mass[lay] is None else float(mass[lay][i]),
                "copy_paste": None if copy[lay] is None else float(copy[lay][i]),
                "entropy": None if ent[lay] is None else float(ent[lay][i, 0]),
                "entropy_norm": None if ent[lay] is None else _finite(float(ent[lay][i, 1])),
                **weight_distance(cur, reference[(lay, i)]),
            }
        )
    return rows


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _score(model: Any, tok: Any, samples: list[Any], settings: TraceSettings) -> list[SampleScores]:
    return score_model(model, tok, samples, settings, entropy_queries=settings.last_queries)[1]


def run_trace(
    run_dir: Path,
    out: Path,
    settings: TraceSettings,
    *,
    device: str = "auto",
    dtype: str | None = None,
    tokenizer: str | None = None,
    verify_conversion: bool = True,
) -> Path:
    """`analyze trace`: write trace.json and trace_*.png for every checkpoint of `run_dir`."""
    from hybrid_megatron.analysis.plots import plot_trace
    from hybrid_megatron.analysis.sharding import analysis_device, is_writer
    from hybrid_megatron.eval.models import (
        all_checkpoints,
        conversion_dtype,
        default_cache_dir,
        load_eval_model,
        prepare_conversions,
        resolve_dtype,
    )

    sources = all_checkpoints(run_dir)
    steps = [s.iteration for s in sources]
    if settings.reference == "first":
        ref_source = sources[0]
    else:
        matches = [s for s in sources if s.iteration == settings.reference]
        if not matches:
            raise ConfigError(
                f"--reference {settings.reference}: {run_dir} has no complete checkpoint at that "
                f"step; its steps are {steps}. Pass one of them or 'first'."
            )
        ref_source = matches[0]
    device = analysis_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    prepare_conversions(
        sources, default_cache_dir(), conversion_dtype(torch_dtype), verify_conversion
    )
    load = dict(tokenizer=tokenizer, verify_conversion=verify_conversion)

    final_model, tok, final_info = load_eval_model(sources[-1], device, dtype, **load)
    layout = attention_layout(final_model)
    if not layout.layers:
        raise ConfigError(f"{run_dir}'s model has no attention layers: no heads to trace.")
    samples = needle_samples(tok, settings)
    final_scores = _score(final_model, tok, samples, settings)
    final = summarize(final_scores, layout, settings.top_k, settings.threshold)
    heads = traced_heads(final)
    del final_model

    ref_model, _, ref_info = load_eval_model(ref_source, device, dtype, **load)
    reference = {
        (h["layer"], h["head"]): qk_weights(ref_model, layout, Head(h["layer"], h["head"]))
        for h in heads
    }
    del ref_model

    records = []
    for source in sources:
        model, _, info = load_eval_model(source, device, dtype, **load)
        scores = final_scores if source is sources[-1] else _score(model, tok, samples, settings)
        records.append(
            {
                "step": source.iteration,
                "model": info.to_dict(),
                "samples_recovered": sum(s.recovered for s in scores),
                "heads": checkpoint_record(model, scores, heads, reference, layout),
            }
        )
        if is_writer():
            print(f"hybrid-megatron analyze trace: step {source.iteration} done", flush=True)
        del model
    result = {
        "run_dir": str(run_dir),
        "settings": asdict(settings),
        "layout": layout.to_dict(),
        "final": {"step": sources[-1].iteration, "model": final_info.to_dict(), **final},
        "reference": {"step": ref_source.iteration, "model": ref_info.to_dict()},
        "heads": heads,
        "steps": steps,
        "checkpoints": records,
    }
    if not is_writer():
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / "trace.json").write_text(json.dumps(result, indent=1))
    plot_trace(result, out)
    return out

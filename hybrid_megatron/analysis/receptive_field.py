"""`hybrid-megatron analyze cap`: long-context loss by position and task scores while the
full-attention layers, or the efficient layers, are capped to K tokens (see `capping`).

Writes DIR/cap.json (one row per target and K, the uncapped model first), DIR/cap.md (a
table over K) and the plots DIR/cap_vs_k.png (loss and task scores against K) and
DIR/cap_loss_by_position_TARGET.png (loss by position, one line per K).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hybrid_megatron.analysis.capping import capped, select_layers
from hybrid_megatron.errors import ConfigError


@dataclass
class CapSettings:
    targets: list[str] = field(default_factory=lambda: ["full", "efficient"])
    ks: list[int] = field(default_factory=lambda: [64, 256, 1024])
    sinks: int = 0
    length: int = 4096
    num_sequences: int = 4  # loss-by-position sequences
    ppl_data: str | None = None  # default: held-out built-in synthetic corpus
    bin_width: int | None = None  # default: power-of-two bins
    tasks: list[str] = field(default_factory=lambda: ["niah_single_1"])
    num_samples: int = 10
    max_new_tokens: int = 32
    seed: int = 42


def loss_by_position(model: Any, sequences: list[list[int]], bin_width: int | None) -> dict:
    """Mean loss and binned loss over `sequences` (eval's perplexity machinery)."""
    from hybrid_megatron.analysis.sharding import shard_map
    from hybrid_megatron.eval.perplexity import aggregate_ppl, evaluate_sequence

    rows = shard_map(
        sequences, lambda s: {"length": len(s), **evaluate_sequence(model, s, bin_width)}
    )
    (agg,) = aggregate_ppl(rows).values()
    return {"loss": agg["loss"], "ppl": agg["ppl"], "bins": agg["bins"]}


def task_scores(model: Any, tok: Any, samples: dict[str, list[Any]]) -> dict[str, float]:
    """Greedy generation and RULER scoring per task (score x100)."""
    from hybrid_megatron.analysis.sharding import shard_map
    from hybrid_megatron.eval.generation import greedy_generate
    from hybrid_megatron.eval.scoring import score_task

    def generate(sample: Any) -> str:
        (batch,) = greedy_generate(model, tok, [tok.encode(sample.prompt)], sample.max_new_tokens)
        return batch[0].text

    out = {}
    for task, items in samples.items():
        preds = shard_map(items, generate)
        out[task] = score_task(task, preds, [s.outputs for s in items])
    return out


def _measure(model: Any, tok: Any, sequences: list, samples: dict, s: CapSettings) -> dict:
    t0 = time.perf_counter()
    row = loss_by_position(model, sequences, s.bin_width) if sequences else {}
    row["tasks"] = task_scores(model, tok, samples) if samples else {}
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def cap_rows(model: Any, tok: Any, settings: CapSettings) -> list[dict[str, Any]]:
    """The uncapped row, then one row per (target, K)."""
    from hybrid_megatron.analysis.sharding import is_writer
    from hybrid_megatron.eval.perplexity import PplSequences
    from hybrid_megatron.eval.tasks import generate_samples

    layers = {t: select_layers(model, t) for t in settings.targets}
    data = PplSequences(tok, settings.ppl_data, seed=settings.seed)
    sequences = []
    for i in range(settings.num_sequences):
        seq = data.get(settings.length, i)
        if seq is None:
            raise ConfigError(
                f"{settings.ppl_data} has {i} sequences of {settings.length} tokens; "
                f"{settings.num_sequences} were asked for (--num-sequences)."
            )
        sequences.append(seq)
    samples = {
        t: generate_samples(
            t,
            tok,
            target_length=settings.length,
            num_samples=settings.num_samples,
            seed=settings.seed,
            max_new_tokens=settings.max_new_tokens,
        )
        for t in settings.tasks
    }
    rows = [
        {
            "target": "none",
            "layers": [],
            "k": None,
            **_measure(model, tok, sequences, samples, settings),
        }
    ]
    for target in settings.targets:
        for k in settings.ks:
            with capped(model, layers[target], k, settings.sinks):
                row = _measure(model, tok, sequences, samples, settings)
            rows.append({"target": target, "layers": layers[target], "k": k, **row})
            if is_writer():
                print(f"hybrid-megatron analyze cap: {target} K={k} done", flush=True)
    return rows


def markdown_table(rows: list[dict[str, Any]], tasks: list[str]) -> str:
    """One line per row: target, K, loss, ppl and each task's score."""
    head = ["target", "K", "loss", "ppl", *tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["target"], "uncapped" if r["k"] is None else str(r["k"])]
        cells += [f"{r['loss']:.4f}", f"{r['ppl']:.3f}"] if "loss" in r else ["", ""]
        cells += [f"{r['tasks'].get(t, float('nan')):.1f}" for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_cap(result: dict[str, Any], out: Path) -> list[Path]:
    """Loss and task scores against K per target; loss by position per K per target."""
    from hybrid_megatron.analysis.plots import plot_lines

    rows, settings = result["rows"], result["settings"]
    base = rows[0]
    written = []
    ks = settings["ks"]
    series: dict[str, list[float | None]] = {}
    for target in settings["targets"]:
        by_k = {r["k"]: r for r in rows if r["target"] == target}
        if "loss" in base:
            series[f"loss {target}"] = [by_k[k]["loss"] for k in ks]
        for task in settings["tasks"]:
            series[f"{task} {target} (/100)"] = [by_k[k]["tasks"][task] / 100 for k in ks]
    if "loss" in base:
        series["loss uncapped"] = [base["loss"]] * len(ks)
    written.append(
        plot_lines(ks, series, out / "cap_vs_k.png", xlabel="K (tokens)", ylabel="loss / score",
                   title="receptive-field capping", log_x=True)
    )  # fmt: skip
    if "loss" in base:
        for target in settings["targets"]:
            by_k = [("uncapped", base)] + [
                (f"K={r['k']}", r) for r in rows if r["target"] == target
            ]
            x = [math.sqrt(b["lo"] * b["hi"]) for b in base["bins"]]
            lines = {name: [b["loss"] for b in r["bins"]] for name, r in by_k}
            written.append(
                plot_lines(x, lines, out / f"cap_loss_by_position_{target.replace(',', '-')}.png",
                           xlabel="position", ylabel="loss", title=f"capped: {target}", log_x=True)
            )  # fmt: skip
    return written


def run_cap(
    model_path: str,
    out: Path,
    settings: CapSettings,
    *,
    device: str = "auto",
    dtype: str | None = None,
    tokenizer: str | None = None,
    verify_conversion: bool = True,
) -> Path:
    """`analyze cap`: measure MODEL uncapped and capped; write cap.json, cap.md and plots."""
    from hybrid_megatron.analysis.sharding import is_writer, load_analysis_model

    model, tok, info = load_analysis_model(model_path, device, dtype, tokenizer, verify_conversion)
    rows = cap_rows(model, tok, settings)
    result = {"model": info.to_dict(), "settings": asdict(settings), "rows": rows}
    if not is_writer():
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / "cap.json").write_text(json.dumps(result, indent=1))
    (out / "cap.md").write_text(markdown_table(rows, settings.tasks))
    plot_cap(result, out)
    return out

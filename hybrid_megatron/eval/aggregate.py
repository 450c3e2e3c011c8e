"""Aggregate sample rows into `results.json` and a markdown table (`results.md`).

Per model: task x length scores (RULER's scorers: mean sample score x100, 2 decimals) with
sample counts and empty predictions, per-length / per-task averages and the overall average
(mean of the per-length averages), needle grids (length x depth), perplexity by length and
position bin, and skipped tasks with the reason. Only row contents enter the results (no
timings), so a resumed or re-sharded sweep aggregates to the same file.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hybrid_megatron.eval.perplexity import aggregate_ppl
from hybrid_megatron.eval.plan import PPL_TASK, depth_label
from hybrid_megatron.eval.scoring import (
    SampleScore,
    average_by_length,
    average_by_task,
    depth_length_table,
    null_counts,
    overall_average,
    postprocess_pred,
    task_length_table,
)

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def _score(row: Mapping[str, Any], grid: bool) -> SampleScore:
    return SampleScore(
        task=row["task"],
        target_length=int(row["length"]),
        index=int(row["index"]),
        score=float(row["score"]),
        depth=float(row["depth"]) if grid and row.get("depth") is not None else None,
        null=not postprocess_pred(str(row.get("prediction", ""))),  # RULER's "Nulls"
    )


def _str_keys(table: Mapping[Any, Any]) -> dict[str, Any]:
    return {str(k): v for k, v in table.items()}


def _model_results(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    first = rows[0]
    samples = [r for r in rows if "score" in r and not r.get("grid")]
    grid_rows = [r for r in rows if "score" in r and r.get("grid")]
    ppl_rows = [r for r in rows if r.get("task") == PPL_TASK and "bins" in r]
    scores = [_score(r, grid=False) for r in samples]
    table = task_length_table(scores)
    counts = Counter((s.task, s.target_length) for s in scores)
    nulls = null_counts(scores)
    tasks = {
        task: {
            str(length): {
                "score": value,
                "n": counts[(task, length)],
                "nulls": nulls[(task, length)],
            }
            for length, value in per_len.items()
        }
        for task, per_len in table.items()
    }
    grid_by_length = {
        task: _str_keys(per_len)
        for task, per_len in task_length_table(_score(r, grid=False) for r in grid_rows).items()
    }
    grid: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    grid_by_task: dict[str, list[SampleScore]] = defaultdict(list)
    for r in grid_rows:
        grid_by_task[r["task"]].append(_score(r, grid=True))
    for task in sorted(grid_by_task):
        cells = depth_length_table(grid_by_task[task])
        n = Counter((s.target_length, s.depth) for s in grid_by_task[task])
        grid[task] = {
            str(length): {
                depth_label(d): {"score": v, "n": n[(length, d)]} for d, v in per_depth.items()
            }
            for length, per_depth in cells.items()
        }
    ran = {(r["task"], int(r["length"])) for r in rows if "skipped" not in r}
    skipped = {}
    for r in rows:
        if "skipped" not in r:
            continue
        length = r.get("length")
        if length is None and not any(task == r["task"] for task, _ in ran):
            skipped[r["task"]] = r["skipped"]
        elif length is not None and (r["task"], int(length)) not in ran:
            skipped[f"{r['task']}@{length}"] = r["skipped"]
    return {
        "path": first.get("model_path"),
        "iteration": first.get("iteration"),
        "run": first.get("run"),
        "tasks": tasks,
        "average_by_length": _str_keys(average_by_length(table)),
        "average_by_task": average_by_task(table),
        "average": overall_average(table) if table else None,
        "grid": grid,
        "grid_by_length": grid_by_length,
        "ppl": _str_keys(aggregate_ppl(ppl_rows)),
        "skipped": dict(sorted(skipped.items())),
    }


def _model_order(item: tuple[str, list[Mapping[str, Any]]]) -> tuple:
    name, rows = item
    iteration = rows[0].get("iteration")
    return (rows[0].get("run") or "", iteration if iteration is not None else -1, name)


def aggregate_rows(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """results.json content for sample, perplexity and skip rows (any order)."""
    by_model: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    n = 0
    for row in sorted(rows, key=lambda r: r["key"]):
        by_model[row["model"]].append(row)
        n += "skipped" not in row
    models = {name: _model_results(r) for name, r in sorted(by_model.items(), key=_model_order)}
    return {"models": models, "num_samples": n}


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_markdown(results: Mapping[str, Any]) -> str:
    """Markdown tables: per model, tasks x lengths with averages; grids; perplexity."""
    lines: list[str] = []
    for name, m in results["models"].items():
        it = m["iteration"]
        lines += [f"## {name}" + (f" (iteration {it})" if it is not None else ""), ""]
        lengths = sorted({int(k) for per in m["tasks"].values() for k in per}, key=int)
        if m["tasks"]:
            lines.append("| task | " + " | ".join(str(n) for n in lengths) + " | avg |")
            lines.append("|---" * (len(lengths) + 2) + "|")
            for task, per in m["tasks"].items():
                cells = [_fmt(per.get(str(n), {}).get("score")) for n in lengths]
                avg = m["average_by_task"].get(task)
                lines.append(f"| {task} | " + " | ".join(cells) + f" | {_fmt(avg)} |")
            avg_cells = [_fmt(m["average_by_length"].get(str(n))) for n in lengths]
            lines.append("| **average** | " + " | ".join(avg_cells) + f" | {_fmt(m['average'])} |")
            lines.append("")
        for task, per_len in m["grid"].items():
            depths = sorted({float(d) for cells in per_len.values() for d in cells})
            labels = [depth_label(d) for d in depths]
            lines.append(f"{task} needle grid (rows: length, columns: depth %)")
            lines.append("")
            lines.append("| length | " + " | ".join(labels) + " |")
            lines.append("|---" * (len(labels) + 1) + "|")
            for length, cells in per_len.items():
                row = [_fmt(cells.get(d, {}).get("score")) for d in labels]
                lines.append(f"| {length} | " + " | ".join(row) + " |")
            lines.append("")
        if m["ppl"]:
            lines.append("| ppl length | loss | ppl | sequences |")
            lines.append("|---|---|---|---|")
            for length, p in m["ppl"].items():
                lines.append(f"| {length} | {p['loss']:.4f} | {p['ppl']:.3f} | {p['n']} |")
            lines.append("")
        for task, reason in m["skipped"].items():
            lines.append(f"- skipped {task}: {reason}")
        if m["skipped"]:
            lines.append("")
    if not results["models"]:
        lines.append("(no finished samples yet)")
    return "\n".join(lines).rstrip() + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(out_dir: Path, results: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write results.json and results.md into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / RESULTS_JSON, out_dir / RESULTS_MD
    _atomic_write(json_path, json.dumps(results, indent=1) + "\n")
    _atomic_write(md_path, format_markdown(results))
    return json_path, md_path

"""Plots of long-context evaluation results (`results.json` of `hybrid-megatron eval`).

- `heatmap_MODEL_TASK.png`: needle grid, context length (rows) x needle depth (columns);
- `score_vs_length_MODEL.png`: one line per task plus the average;
- `score_vs_step_RUN.png`: per training run with several checkpoints, score against the
  checkpoint's iteration (one line per task plus the average);
- `ppl_vs_step_RUN.png`: long-context loss against iteration, one line per length;
- `loss_by_position_MODEL.png`: loss per position bin, one line per evaluated length, and
  `loss_by_position.png` comparing models at their longest length.

`write_plots(results, out_dir)` draws all that apply; PNG via matplotlib's Agg canvas.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "load_results",
    "plot_loss_by_position",
    "plot_niah_heatmaps",
    "plot_score_vs_length",
    "plot_score_vs_step",
    "write_plots",
]

Results = Mapping[str, Any]


def load_results(path: str | Path) -> dict[str, Any]:
    """results.json (or DIR/results.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    return json.loads(path.read_text())


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def _figure(width: float = 7.0, height: float = 4.5):
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot()


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig.savefig(path, format="png", dpi=110, bbox_inches="tight")
    return path


def _length_label(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def plot_niah_heatmaps(results: Results, out_dir: Path) -> list[Path]:
    """One heatmap per model and grid task: rows = context length, columns = depth."""
    written = []
    for name, m in results["models"].items():
        for task, per_len in m.get("grid", {}).items():
            lengths = sorted(per_len, key=int)
            depths = sorted({float(d) for cells in per_len.values() for d in cells})
            labels = [f"{d:g}" for d in depths]
            values = [
                [per_len[n].get(label, {}).get("score", float("nan")) for label in labels]
                for n in lengths
            ]
            title = f"{name}: {task}"
            # Cells wide enough for "100", rows tall enough for a label; the title fits too.
            width = max(4.5, 2.2 + 0.6 * len(depths), 0.09 * len(title))
            fig, ax = _figure(width, 1.6 + 0.5 * len(lengths))
            image = ax.imshow(values, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(depths)), labels)
            ax.set_yticks(range(len(lengths)), [_length_label(int(n)) for n in lengths])
            for i, row in enumerate(values):
                for j, v in enumerate(row):
                    if v == v:  # not NaN
                        ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=9)
            ax.set_xlabel("needle depth (%)")
            ax.set_ylabel("context length (tokens)")
            ax.set_title(title)
            fig.colorbar(image, ax=ax, label="score")
            written.append(_save(fig, out_dir / f"heatmap_{_slug(name)}_{_slug(task)}.png"))
    return written


def task_curves(m: Mapping[str, Any]) -> dict[str, dict[int, float]]:
    """label -> length -> score: each task, and each grid task averaged over depths."""
    curves = {
        task: {int(n): cell["score"] for n, cell in per_len.items()}
        for task, per_len in m.get("tasks", {}).items()
    }
    for task, per_len in m.get("grid_by_length", {}).items():
        curves[f"{task} (grid)"] = {int(n): score for n, score in per_len.items()}
    return curves


_MARKERS = "osD^vP*Xh<>p"


def _bar_scores(ax, curves: dict[str, dict[int, float]], length: int) -> None:
    """One length: a bar per task with its value written on it (zeros stay visible)."""
    labels = list(curves)
    values = [curves[label][length] for label in labels]
    bars = ax.bar(range(len(labels)), values, color=[f"C{i}" for i in range(len(labels))])
    for bar, v in zip(bars, values):
        ax.annotate(f"{v:g}", (bar.get_x() + bar.get_width() / 2, v), xytext=(0, 3),
                    textcoords="offset points", ha="center", fontsize=9)  # fmt: skip
    ax.set_xticks(range(len(labels)), labels, rotation=20 if len(labels) > 3 else 0)
    ax.set_xlabel(f"task at {_length_label(length)} tokens")


def _line_scores(ax, curves: dict[str, dict[int, float]]) -> None:
    """Several lengths: a line per task, distinct markers, offset so equal scores all show."""
    n = len(curves)
    for i, (label, per_len) in enumerate(curves.items()):
        xs = sorted(per_len)
        shift = 2 ** (0.04 * (i - (n - 1) / 2))  # a few percent on the log2 axis
        ax.plot([x * shift for x in xs], [per_len[x] for x in xs], marker=_MARKERS[i % 11],
                markersize=7, label=label, zorder=3)  # fmt: skip
    lengths = sorted({x for per_len in curves.values() for x in per_len})
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [_length_label(x) for x in lengths])
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens)")
    ax.legend(fontsize=8)


def plot_score_vs_length(results: Results, out_dir: Path) -> list[Path]:
    """Per model: score against context length, one line per task plus the average (a bar
    chart when only one length was evaluated)."""
    written = []
    for name, m in results["models"].items():
        curves = task_curves(m)
        if not curves:
            continue
        fig, ax = _figure()
        lengths = {x for per_len in curves.values() for x in per_len}
        avg = m.get("average_by_length") or {}
        if len(lengths) == 1:
            _bar_scores(ax, curves, lengths.pop())
        else:
            if len(m.get("tasks", {})) > 1 and avg:
                curves["average"] = {int(x): v for x, v in avg.items()}
            _line_scores(ax, curves)
        ax.set_ylabel("score (x100)")
        ax.set_ylim(-4, 108)  # markers and labels at 0 and 100 stay inside the axes
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
        written.append(_save(fig, out_dir / f"score_vs_length_{_slug(name)}.png"))
    return written


def _runs(results: Results) -> dict[str, list[tuple[int, Mapping[str, Any]]]]:
    """run -> [(iteration, model results)] for runs with >= 2 checkpoints with iterations."""
    runs: dict[str, list[tuple[int, Mapping[str, Any]]]] = defaultdict(list)
    for name, m in results["models"].items():
        if m.get("iteration") is not None:
            runs[m.get("run") or name].append((int(m["iteration"]), m))
    return {r: sorted(v, key=lambda t: t[0]) for r, v in runs.items() if len(v) >= 2}


def plot_score_vs_step(results: Results, out_dir: Path) -> list[Path]:
    """Per run: task scores (mean over lengths) and their average against iteration; and
    perplexity-loss per length against iteration when evaluated."""
    written = []
    for run, points in _runs(results).items():
        means = [
            (it, {label: sum(c.values()) / len(c) for label, c in task_curves(m).items() if c})
            for it, m in points
        ]
        labels = sorted({label for _, per in means for label in per})
        if labels:
            fig, ax = _figure()
            for label in labels:
                xy = [(it, per[label]) for it, per in means if label in per]
                ax.plot(*zip(*xy), marker="o", label=label)
            avg = [(it, m["average"]) for it, m in points if m.get("average") is not None]
            if len({t for _, m in points for t in m.get("tasks", {})}) > 1 and avg:
                ax.plot(*zip(*avg), color="black", linewidth=2.5, marker="s", label="average")
            ax.set_xlabel("training step (iteration)")
            ax.set_ylabel("score (mean over lengths)")
            ax.set_ylim(-2, 102)
            ax.set_title(run)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
            written.append(_save(fig, out_dir / f"score_vs_step_{_slug(run)}.png"))
        counts = Counter(int(n) for _, m in points for n in m.get("ppl", {}))
        lengths = sorted(n for n, c in counts.items() if c >= 2)
        if lengths:
            fig, ax = _figure()
            for n in lengths:
                xs = [it for it, m in points if str(n) in m.get("ppl", {})]
                ys = [m["ppl"][str(n)]["loss"] for _, m in points if str(n) in m.get("ppl", {})]
                ax.plot(xs, ys, marker="o", label=f"{_length_label(n)} tokens")
            ax.set_xlabel("training step (iteration)")
            ax.set_ylabel("loss (nats/token)")
            ax.set_title(f"{run}: long-context loss")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
            written.append(_save(fig, out_dir / f"ppl_vs_step_{_slug(run)}.png"))
    return written


def _bin_xy(bins: list[Mapping[str, Any]]) -> tuple[list[float], list[float]]:
    return [float(b["hi"]) for b in bins], [float(b["loss"]) for b in bins]


def plot_loss_by_position(results: Results, out_dir: Path) -> list[Path]:
    """Loss by position bin (x = bin end): per model one line per length; models compared."""
    written = []
    longest: dict[str, tuple[int, list[Mapping[str, Any]]]] = {}
    for name, m in results["models"].items():
        ppl = m.get("ppl") or {}
        if not ppl:
            continue
        fig, ax = _figure()
        for n in sorted(ppl, key=int):
            ax.plot(*_bin_xy(ppl[n]["bins"]), marker=".", label=f"{_length_label(int(n))} tokens")
        n_max = max(ppl, key=int)
        longest[name] = (int(n_max), ppl[n_max]["bins"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("token position (bin end)")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(f"{name}: loss by position")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / f"loss_by_position_{_slug(name)}.png"))
    if len(longest) > 1:
        fig, ax = _figure()
        for name, (n, bins) in longest.items():
            ax.plot(*_bin_xy(bins), marker=".", label=f"{name} ({_length_label(n)})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("token position (bin end)")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title("loss by position")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / "loss_by_position.png"))
    return written


def write_plots(results: Results, out_dir: str | Path) -> list[Path]:
    """Every plot that applies to `results`, under `out_dir`; returns the written files."""
    out_dir = Path(out_dir)
    written: list[Path] = []
    plots = (plot_niah_heatmaps, plot_score_vs_length, plot_score_vs_step, plot_loss_by_position)
    for plot in plots:
        written += plot(results, out_dir)
    return written

"""PNG plots of the mechanism analyses (matplotlib Agg, no pyplot state)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

KIND_LABELS = {"full_attention": "full", "sliding_attention": "swa"}


def _figure(cols: int = 1, width: float = 6.0, height: float = 4.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height), layout="constrained")
    axes = [fig.add_subplot(1, cols, i + 1) for i in range(cols)]
    return fig, axes


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig.savefig(path, format="png", dpi=110, bbox_inches="tight")
    return path


def layer_labels(layout: Mapping[str, Any]) -> list[str]:
    """'L4 full', 'L2 swa64' per attention layer of a layout dict."""
    out = []
    for layer, kind, window in zip(
        layout["attention_layers"], layout["kinds"], layout["windows"], strict=True
    ):
        label = KIND_LABELS.get(kind, kind)
        out.append(f"L{layer} {label}{window if window else ''}")
    return out


def plot_head_heatmaps(result: Mapping[str, Any], path: Path) -> Path:
    """Attention-mass and copy-paste scores, attention layer (rows) x head (columns)."""
    panels = [("attention_mass", "attention mass on the answer"), ("copy_paste", "copy-paste")]
    heads = result["layout"]["num_heads"]
    rows = len(result["layout"]["attention_layers"])
    fig, axes = _figure(2, width=max(4.0, 0.5 * heads + 2), height=max(2.5, 0.4 * rows + 1.5))
    labels = layer_labels(result["layout"])
    if not result.get("samples_recovered"):
        panels[1] = ("copy_paste", "copy-paste (no sample answered)")
    for ax, (key, title) in zip(axes, panels, strict=True):
        top = max((v for row in result[key] for v in row), default=0.0)
        image = ax.imshow(result[key], aspect="auto", cmap="viridis", vmin=0.0, vmax=max(top, 1e-3))
        ax.set_title(title)
        ax.set_xlabel("head")
        ax.set_xticks(range(heads))
        ax.set_yticks(range(rows))
        ax.set_yticklabels(labels)
        fig.colorbar(image, ax=ax)
    model = result.get("model", {}).get("name", "")
    settings = result.get("settings", {})
    fig.suptitle(f"{model} {settings.get('task', '')} {settings.get('length', '')}".strip())
    return _save(fig, path)


def plot_lines(
    x: Sequence[float],
    series: Mapping[str, Sequence[float | None]],
    path: Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    log_x: bool = False,
) -> Path:
    """One line per series (None values are gaps)."""
    fig, (ax,) = _figure()
    for name, ys in series.items():
        ax.plot(x, [float("nan") if y is None else y for y in ys], marker="o", ms=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_x:
        ax.set_xscale("log")
    if title:
        ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=7, ncol=2 if len(series) > 8 else 1)
    ax.grid(alpha=0.3)
    return _save(fig, path)


TRACE_PLOTS = (
    ("attention_mass", "attention mass on the answer", "trace_attention_mass.png"),
    ("copy_paste", "copy-paste retrieval score", "trace_copy_paste.png"),
    ("entropy_norm", "attention entropy / ln(visible keys)", "trace_entropy.png"),
    ("qk_rel", "relative Q/K distance to the reference", "trace_qk_distance.png"),
)


def plot_trace(result: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """One PNG per traced metric: a line per head against the checkpoint step."""
    steps = [c["step"] for c in result["checkpoints"]]
    written = []
    for key, label, name in TRACE_PLOTS:
        series: dict[str, list[float | None]] = {}
        for c in result["checkpoints"]:
            for h in c["heads"]:
                series.setdefault(f"L{h['layer']}H{h['head']}", []).append(h[key])
        ref = result["reference"]["step"]
        title = label + (f" (reference: step {ref})" if key == "qk_rel" else "")
        written.append(
            plot_lines(steps, series, out_dir / name, xlabel="step", ylabel=key, title=title)
        )
    return written

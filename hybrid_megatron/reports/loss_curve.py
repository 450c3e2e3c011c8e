"""Loss curves of one or more runs from their `metrics.jsonl` files (`hybrid-megatron plot`)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Literal

XAxis = Literal["step", "tokens"]

__all__ = ["RunCurves", "load_run", "plot_loss_curves", "smooth_values"]


class RunCurves:
    """Train and validation losses of one run, one point per step (the last row wins)."""

    def __init__(self, name: str, train: dict[int, dict], valid: dict[int, dict]):
        self.name = name
        self.train = dict(sorted(train.items()))
        self.valid = dict(sorted(valid.items()))

    def x_of(self, rows: dict[int, dict], x: XAxis) -> list[float]:
        if x == "step":
            return [float(s) for s in rows]
        known = {s: r["tokens"] for s, r in self.train.items() if r.get("tokens") is not None}
        if not known:
            raise ValueError(f"run {self.name}: no 'tokens' in metrics; plot with --x step.")
        return [float(r.get("tokens") or _interpolate(known, s)) for s, r in rows.items()]


def _interpolate(points: dict[int, float], step: int) -> float:
    """Linear interpolation (or extrapolation from the origin / last pace) of step -> tokens."""
    steps = sorted(points)
    lo = max((s for s in steps if s <= step), default=None)
    hi = min((s for s in steps if s >= step), default=None)
    if lo is not None and lo == hi:
        return points[lo]
    if lo is None:
        return points[hi] * step / hi if hi else 0.0
    if hi is None:
        return points[lo] * step / lo if lo else 0.0
    return points[lo] + (points[hi] - points[lo]) * (step - lo) / (hi - lo)


def load_run(run_dir: Path) -> RunCurves:
    """Read a run's metrics; FileNotFoundError/ValueError with a clear message if unusable."""
    from hybrid_megatron.training.metrics import METRICS_FILE, read_metrics

    path = run_dir / METRICS_FILE
    if not path.is_file():
        hint = "" if run_dir.is_dir() else " (the directory does not exist)"
        raise FileNotFoundError(
            f"{run_dir} has no {METRICS_FILE}{hint}; pass the run directory a training run "
            "wrote its metrics to."
        )
    train: dict[int, dict] = {}
    valid: dict[int, dict] = {}
    for row in read_metrics(path):
        loss = row.get("loss")
        if not isinstance(loss, (int, float)) or not math.isfinite(loss):
            continue
        (valid if row.get("split") == "valid" else train)[row["step"]] = row
    if not train and not valid:
        raise ValueError(f"{path} holds no rows with a loss value yet.")
    return RunCurves(run_dir.resolve().name or str(run_dir), train, valid)


def smooth_values(values: list[float], window: int) -> list[float]:
    """Trailing moving average over up to `window` points (identity for window <= 1)."""
    if window <= 1:
        return list(values)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _unique_names(runs: list[RunCurves], dirs: list[Path]) -> None:
    names = [r.name for r in runs]
    for run, d in zip(runs, dirs):
        if names.count(run.name) > 1:
            run.name = str(d)


def _auto_smooth(points: int) -> int:
    """A moving-average window that shows the trend of a long, noisy curve (1: none)."""
    return max(1, points // 40) if points > 100 else 1


def plot_loss_curves(
    run_dirs: list[Path],
    out_png: Path,
    smooth: int | None = None,
    x: XAxis = "step",
    log_x: bool = False,
    log_y: bool = True,
) -> Path:
    """Draw each run's train loss, validation loss and learning rate to `out_png`.

    Top panel: loss (log y by default, so the long tail stays readable next to the first
    steps), train as a line (faint raw values under a moving average of `smooth` points,
    default chosen from the length) and validation as dashed markers in a contrasting colour.
    Bottom panel: the learning rate. `x` is the step or the tokens seen.
    """
    if x not in ("step", "tokens"):
        raise ValueError(f"x must be 'step' or 'tokens', got {x!r}")
    if not run_dirs:
        raise ValueError("give at least one run directory")
    dirs = [Path(d) for d in run_dirs]
    runs = [load_run(d) for d in dirs]
    _unique_names(runs, dirs)

    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    has_lr = any(r.get("lr") is not None for run in runs for r in run.train.values())
    fig = Figure(figsize=(8, 6.5 if has_lr else 5))
    if has_lr:
        ax, ax_lr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    else:
        ax, ax_lr = fig.add_subplot(), None
    for i, run in enumerate(runs):
        train_color, valid_color = f"C{(2 * i) % 10}", f"C{(2 * i + 1) % 10}"
        if run.train:
            xs = run.x_of(run.train, x)
            ys = [r["loss"] for r in run.train.values()]
            window = _auto_smooth(len(ys)) if smooth is None else smooth
            if window > 1:
                ax.plot(xs, ys, color=train_color, alpha=0.25, linewidth=0.8)
                ys = smooth_values(ys, window)
            label = f"{run.name} train" + (f" ({window}-step mean)" if window > 1 else "")
            ax.plot(xs, ys, color=train_color, label=label)
            if ax_lr is not None:
                lrs = [(xv, r["lr"]) for xv, r in zip(xs, run.train.values()) if r.get("lr")]
                if lrs:
                    ax_lr.plot(*zip(*lrs), color=train_color, label=run.name)
        if run.valid:
            ax.plot(
                run.x_of(run.valid, x),
                [r["loss"] for r in run.valid.values()],
                color=valid_color,
                marker="o",
                linestyle="--",
                label=f"{run.name} valid",
            )
    ax.set_ylabel("loss (nats/token)")
    if log_y:
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # 3, 4, 6 rather than 3x10^0
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    bottom = ax_lr if ax_lr is not None else ax
    if ax_lr is not None:
        ax_lr.set_ylabel("learning rate")
        ax_lr.grid(True, alpha=0.3)
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    bottom.set_xlabel("tokens" if x == "tokens" else "step")
    if log_x:
        bottom.set_xscale("log")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # log axes drop non-positive values with a warning
        fig.savefig(out_png, format="png", dpi=120, bbox_inches="tight")
    return out_png

"""Loss curves of one or more runs from their `metrics.jsonl` files.

`hybrid-megatron plot RUN_DIR [RUN_DIR ...] --out loss.png [--smooth N] [--x tokens] [--log]`
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path
from typing import Literal

from hybrid_megatron.training.metrics import METRICS_FILE, read_metrics

XAxis = Literal["step", "tokens"]

__all__ = ["RunCurves", "add_plot_subcommand", "load_run", "plot_loss_curves", "smooth_values"]


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


def plot_loss_curves(
    run_dirs: list[Path],
    out_png: Path,
    smooth: int = 0,
    x: XAxis = "step",
    log_scale: bool = False,
) -> Path:
    """Draw train loss (and validation points) of each run to `out_png`; returns the path.

    `smooth` > 1 draws a trailing moving average over that many points on top of the faint
    raw curve; `x` is the step or the tokens seen; `log_scale` makes both axes logarithmic.
    """
    if x not in ("step", "tokens"):
        raise ValueError(f"x must be 'step' or 'tokens', got {x!r}")
    if not run_dirs:
        raise ValueError("give at least one run directory")
    dirs = [Path(d) for d in run_dirs]
    runs = [load_run(d) for d in dirs]
    _unique_names(runs, dirs)

    from matplotlib import rcParams
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        if run.train:
            xs = run.x_of(run.train, x)
            ys = [r["loss"] for r in run.train.values()]
            if smooth > 1:
                ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
                ys = smooth_values(ys, smooth)
            ax.plot(xs, ys, color=color, label=f"{run.name} train")
        if run.valid:
            ax.plot(
                run.x_of(run.valid, x),
                [r["loss"] for r in run.valid.values()],
                color=color,
                marker="o",
                linestyle="--",
                label=f"{run.name} valid",
            )
    ax.set_xlabel("tokens" if x == "tokens" else "step")
    ax.set_ylabel("loss")
    if log_scale:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # log axes drop non-positive x (step 0) with a warning
        fig.savefig(out_png, format="png", dpi=120, bbox_inches="tight")
    return out_png


def cmd_plot(args: argparse.Namespace) -> int:
    """Handler of `hybrid-megatron plot`; prints the error and returns 2 for unusable runs."""
    try:
        out = plot_loss_curves(
            [Path(d) for d in args.run_dirs],
            Path(args.out),
            smooth=args.smooth,
            x=args.x,
            log_scale=args.log,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"hybrid-megatron plot: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def add_plot_subcommand(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `plot` on a CLI's subparsers; the handler is in `func`."""
    plot = subparsers.add_parser("plot", help="plot loss curves of runs from their metrics.jsonl")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    plot.add_argument("--out", default="loss.png", help="output PNG (default: loss.png)")
    plot.add_argument(
        "--smooth", type=int, default=0, metavar="N", help="moving average over N points"
    )
    plot.add_argument("--x", choices=["step", "tokens"], default="step", help="x axis")
    plot.add_argument("--log", action="store_true", help="log-scale axes")
    plot.set_defaults(func=cmd_plot)
    return plot

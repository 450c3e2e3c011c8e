"""`hybrid-megatron plot`: loss curves (and learning rate) of runs from their metrics.jsonl.

hybrid-megatron plot RUN_DIR [RUN_DIR ...] [--out PNG] [--smooth N] [--x tokens]
                     [--y linear] [--log-x]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_plot(args: argparse.Namespace) -> int:
    """Handler of `hybrid-megatron plot`; prints the error and returns 2 for unusable runs."""
    from hybrid_megatron.reports.loss_curve import plot_loss_curves

    run_dirs = [Path(d) for d in args.run_dirs]
    out = Path(args.out) if args.out else run_dirs[0] / "loss.png"
    try:
        out = plot_loss_curves(
            run_dirs, out, smooth=args.smooth, x=args.x, log_x=args.log_x, log_y=args.y == "log"
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"hybrid-megatron plot: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def add_subcommands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `plot` on a CLI's subparsers; the handler is in `func`."""
    plot = subparsers.add_parser(
        "plot", help="plot loss curves (and learning rate) of runs from their metrics.jsonl"
    )
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    plot.add_argument("--out", help="output PNG (default: RUN_DIR/loss.png of the first run)")
    plot.add_argument(
        "--smooth", type=int, default=None, metavar="N",
        help="moving average over N points (default: from the curve length; 0 or 1: none)",
    )  # fmt: skip
    plot.add_argument("--x", choices=["step", "tokens"], default="step", help="x axis")
    plot.add_argument("--y", choices=["log", "linear"], default="log", help="loss axis scale")
    plot.add_argument("--log-x", action="store_true", help="log-scale x axis")
    plot.set_defaults(func=cmd_plot)
    return plot

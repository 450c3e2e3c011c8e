"""Subcommands of `hybrid-megatron analyze` for scaling fits, LongPPL and the toy study.

hybrid-megatron analyze scaling TABLE.csv --n-col n --tokens-col tokens --value-col loss
    [--log-value] [--holdout COL=VALUE ...] [--formula no_constant|constant]
    [--alpha-bounds LO,HI] [--beta-bounds LO,HI] ... --out DIR
"""

from __future__ import annotations

import argparse

from hybrid_megatron.commands.analyze_options import (
    add_model_options,
    int_list_arg,
    length_arg,
    settings_from,
)


def _bounds(text: str) -> tuple[float | None, float | None]:
    lo, sep, hi = text.partition(",")
    if not sep:
        raise argparse.ArgumentTypeError(f"'{text}' is not LO,HI (e.g. 0.2,0.3; empty side: none)")
    try:
        return (float(lo) if lo.strip() else None, float(hi) if hi.strip() else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not LO,HI with numbers") from None


def cmd_scaling(args: argparse.Namespace) -> int:
    """Handler of `analyze scaling`."""
    from hybrid_megatron.analysis.scaling_report import run_scaling

    bounds = {
        name: getattr(args, f"{name}_bounds")
        for name in ("a", "b", "c", "alpha", "beta")
        if getattr(args, f"{name}_bounds") is not None
    }
    res = run_scaling(
        args.table,
        args.out,
        n_col=args.n_col,
        tokens_col=args.tokens_col,
        value_col=args.value_col,
        log_value=args.log_value,
        holdout=args.holdout,
        formula=args.formula,
        bounds=bounds,
        huber_delta=args.huber_delta,
        plot=not args.no_plot,
    )
    for name, fit in res["fits"].items():
        r2h = "" if fit["r2_holdout"] is None else f"  R2 held out {fit['r2_holdout']:.4f}"
        print(f"{name:<12} {fit['equation']}  R2 train {fit['r2_train']:.4f}{r2h}")
    print(f"wrote {args.out}/fit.json" + ("" if args.no_plot else f" and {args.out}/fit.png"))
    return 0


def _add_scaling(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scaling",
        help="fit L(N, D) = b*N^-alpha + c*D^-beta (+ a) to a CSV/TSV with one row per run",
        description="Robust fit (Huber on log residuals, L-BFGS-B from many starting points) "
        "of both formulas; DIR/fit.json holds the --formula fit at the top level and both "
        "under 'fits', with R2 and RMSE on the fitted and held-out rows; DIR/fit.png plots "
        "data and fit.",
    )
    p.add_argument("table", metavar="TABLE", help="CSV or TSV, one row per run")
    p.add_argument("--n-col", default="n", help="parameter-count column (default n)")
    p.add_argument(
        "--tokens-col",
        default="tokens",
        help="training-token column (default tokens); values like '200n' mean 200 x N",
    )
    p.add_argument("--value-col", default="loss", help="fitted value column (default loss)")
    p.add_argument(
        "--log-value", action="store_true", help="fit ln(value) (the paper does so for LongPPL)"
    )
    p.add_argument(
        "--holdout",
        action="append",
        default=[],
        metavar="COL=VALUE",
        help="rows with COL equal to VALUE are held out for validation (repeatable)",
    )
    p.add_argument(
        "--formula",
        choices=["no_constant", "constant"],
        default="no_constant",
        help="fit reported at fit.json's top level (both are fitted)",
    )
    for name in ("alpha", "beta", "a", "b", "c"):
        p.add_argument(f"--{name}-bounds", type=_bounds, metavar="LO,HI", help=f"bounds on {name}")
    p.add_argument(
        "--huber-delta", type=float, default=1e-3, help="Huber threshold on log residuals"
    )
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", required=True, help="output directory (fit.json, fit.png)")
    p.set_defaults(func=cmd_scaling)


def cmd_longppl(args: argparse.Namespace) -> int:
    """Handler of `analyze longppl`."""
    from pathlib import Path

    from hybrid_megatron.analysis.longppl import LongPPLSettings
    from hybrid_megatron.analysis.longppl_report import check_settings, run_longppl

    settings = settings_from(LongPPLSettings, args)
    check_settings(settings)
    run_longppl(
        args.models, args.evaluator, Path(args.out), settings, data=args.data,
        device=args.device, dtype=args.dtype, tokenizer=args.tokenizer,
        evaluator_tokenizer=args.evaluator_tokenizer,
        verify_conversion=not args.no_verify_conversion,
    )  # fmt: skip
    print(f"wrote {args.out}/longppl.json, longppl.md and longppl.png")
    return 0


def _add_longppl(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "longppl",
        help="LongPPL (Fang et al.): loss on key tokens chosen by a local evaluator model, "
        "next to plain loss by position",
        description="Key tokens: scored by the evaluator with the whole sequence before them "
        "and with only --short-context tokens before their --block; key when the gain exceeds "
        "--gain-threshold and the long-context loss is below --loss-threshold. MODEL and "
        "--evaluator are HF dirs or Megatron run / checkpoint dirs (converted on the fly).",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="evaluated model(s)")
    p.add_argument("--evaluator", required=True, help="evaluator model (HF dir or checkpoint)")
    p.add_argument("--evaluator-tokenizer", help="tokenizer override for the evaluator")
    p.add_argument(
        "--data",
        help="documents: .jsonl ('text'), .txt or a dir (default: the generated corpus, held out)",
    )
    p.add_argument("--pack", action="store_true", help="join documents into sequences")
    p.add_argument("--length", type=length_arg, default=8192, help="tokens per sequence")
    p.add_argument("--num-samples", type=int, default=4, help="sequences")
    p.add_argument("--short-context", type=length_arg, default=4096, help="(default 4096)")
    p.add_argument("--block", type=length_arg, default=1024, help="(default 1024)")
    p.add_argument("--gain-threshold", type=float, default=2.0, help="(default 2)")
    p.add_argument("--loss-threshold", type=float, default=2.0, help="(default 2)")
    p.add_argument("--bin-width", type=int, help="fixed position-bin width (default powers of 2)")
    add_model_options(p)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_longppl)


def cmd_study(args: argparse.Namespace) -> int:
    """Handler of `analyze study`."""
    from pathlib import Path

    from hybrid_megatron.analysis.study.config import load_study

    study = load_study(args.study, seeds=args.seeds, only=args.only)
    out = Path(args.out or f"runs/{study.name}")
    if args.report_only:
        from hybrid_megatron.analysis.study.report import write_report

        write_report(study, out, heads=not args.no_heads and study.analysis.enabled)
        print(f"wrote {out / 'report.md'}")
        return 0
    from hybrid_megatron.analysis.study.runner import run_study

    run_study(study, out, device=args.device, analysis=not args.no_heads)
    return 0


def _add_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "study",
        help="the toy study in one command: train each variant of a study file, evaluate "
        "every checkpoint, find and trace retrieval heads, write one report",
        description="Resumable: finished trainings, evaluated samples and analyses are "
        "skipped. configs/experiments/toy_study.yaml is the full study, "
        "toy_study_quick.yaml a minutes-long smoke version.",
    )
    p.add_argument("study", metavar="STUDY.yaml", help="study file (configs/experiments/)")
    p.add_argument("--out", help="output directory (default runs/NAME)")
    p.add_argument("--seeds", type=int_list_arg(), help="comma list overriding the file's seeds")
    p.add_argument(
        "--only", type=lambda t: [x for x in t.split(",") if x], help="comma list of variants"
    )
    p.add_argument("--device", default="auto", help="eval/analysis device (training: the config)")
    p.add_argument("--no-heads", action="store_true", help="skip retrieval heads and trace")
    p.add_argument(
        "--report-only", action="store_true", help="only rewrite the report from what exists"
    )
    p.set_defaults(func=cmd_study)


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """Register scaling / longppl / study under the `analyze` group's subparsers."""
    _add_scaling(sub)
    _add_longppl(sub)
    _add_study(sub)

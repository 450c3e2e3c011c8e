"""Subcommands of `hybrid-megatron analyze` for heads and receptive fields.

    hybrid-megatron analyze retrieval-heads MODEL [--task niah_single_1] [--length 4096]
        [--num-samples 20] [--top-k 20] --out DIR
    hybrid-megatron analyze trace RUN_DIR [--length 4096] [--num-samples 10]
        [--reference first|STEP] --out DIR

MODEL is a Hugging Face directory, a run directory, its checkpoints/ directory or one
iter_NNNNNNN directory (Megatron checkpoints are converted on the fly, as `eval` does).
"""

from __future__ import annotations

import argparse

from hybrid_megatron.commands.analyze_options import (
    add_model_options,
    length_arg,
    model_settings,
    positive_arg,
    report,
    settings_from,
)
from hybrid_megatron.errors import ConfigError


def _reference(text: str) -> str | int:
    if text == "first":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--reference takes 'first' or a checkpoint step, got '{text}'"
        ) from None


def cmd_retrieval_heads(args: argparse.Namespace) -> int:
    """Handler of `analyze retrieval-heads`."""
    from pathlib import Path

    from hybrid_megatron.analysis.retrieval_heads import RetrievalSettings, run_retrieval_heads

    settings = settings_from(RetrievalSettings, args)
    out = run_retrieval_heads(args.model, Path(args.out), settings, **model_settings(args))
    report(f"wrote {out / 'retrieval_heads.json'} and {out / 'retrieval_heads.png'}")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    """Handler of `analyze trace`."""
    from pathlib import Path

    from hybrid_megatron.analysis.trace import TraceSettings, run_trace

    if args.last_queries < 1:
        raise ConfigError("--last-queries must be >= 1")
    settings = settings_from(TraceSettings, args)
    out = run_trace(Path(args.run_dir), Path(args.out), settings, **model_settings(args))
    report(f"wrote {out / 'trace.json'} and plots in {out}")
    return 0


def _add_retrieval_options(p: argparse.ArgumentParser, samples: int) -> None:
    p.add_argument("--task", default="niah_single_1", help="needle task (niah_*, passkey)")
    p.add_argument(
        "--length", type=length_arg, default=4096, help="prompt + decoding tokens, e.g. 4k"
    )
    p.add_argument("--num-samples", type=positive_arg, default=samples, help="prompts")
    p.add_argument("--top-k", type=positive_arg, default=20, help="heads reported as the top")
    p.add_argument(
        "--threshold",
        type=float,
        default=0.1,
        help="copy-paste score above which a head is a retrieval head (Wu et al.: 0.1)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=positive_arg,
        default=32,
        help="greedy decoding budget of the copy-paste score; part of --length, as in RULER "
        "(default 32)",
    )


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """Register retrieval-heads and trace on the `analyze` group's subparsers."""
    rh = sub.add_parser(
        "retrieval-heads",
        help="per-head retrieval scores (attention mass on the answer; copy-paste while "
        "decoding) on generated needle prompts; JSON and heatmap",
    )
    rh.add_argument("model", metavar="MODEL", help="HF dir, run dir or Megatron checkpoint")
    _add_retrieval_options(rh, samples=20)
    rh.add_argument(
        "--query-offset",
        type=positive_arg,
        default=2,
        help="attention-mass score: the query is the N-th last prompt token (default 2)",
    )
    rh.add_argument("--out", required=True, help="output directory")
    add_model_options(rh)
    rh.set_defaults(func=cmd_retrieval_heads)

    tr = sub.add_parser(
        "trace",
        help="over a run's checkpoints: retrieval scores of the final checkpoint's top heads, "
        "attention entropy and Q/K weight distance to a reference; JSON and plots vs step",
    )
    tr.add_argument("run_dir", metavar="RUN_DIR", help="training run directory")
    _add_retrieval_options(tr, samples=10)
    tr.add_argument(
        "--reference",
        type=_reference,
        default="first",
        help="checkpoint the Q/K distances are measured to: 'first' or a step",
    )
    tr.add_argument(
        "--last-queries",
        type=int,
        default=8,
        help="attention entropy over the last N prompt positions (default 8)",
    )
    tr.add_argument("--out", required=True, help="output directory")
    add_model_options(tr)
    tr.set_defaults(func=cmd_trace)

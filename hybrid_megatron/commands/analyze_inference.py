"""Subcommands of `hybrid-megatron analyze` that intervene on or probe one model.

hybrid-megatron analyze cap MODEL [--target full] [--target efficient] [--k 64,256,1024]
    [--sinks 4] [--length 4096] [--tasks niah_single_1] --out DIR
"""

from __future__ import annotations

import argparse

from hybrid_megatron.commands.analyze_options import (
    add_model_options,
    int_list_arg,
    length_arg,
    model_settings,
    positive_arg,
    report,
    settings_from,
)


def _tasks(text: str) -> list[str]:
    return [] if text == "none" else [t.strip() for t in text.split(",") if t.strip()]


def cmd_cap(args: argparse.Namespace) -> int:
    """Handler of `analyze cap`."""
    from pathlib import Path

    from hybrid_megatron.analysis.receptive_field import CapSettings, run_cap

    settings = settings_from(
        CapSettings, args, targets=args.target or ["full", "efficient"], ks=sorted(set(args.k))
    )
    out = run_cap(args.model, Path(args.out), settings, **model_settings(args))
    report(f"wrote {out / 'cap.json'}, {out / 'cap.md'} and plots in {out}")
    return 0


def cmd_grad_distance(args: argparse.Namespace) -> int:
    """Handler of `analyze grad-distance`."""
    from pathlib import Path

    from hybrid_megatron.analysis.grad_distance import GradSettings, run_grad_distance

    settings = settings_from(GradSettings, args)
    out = run_grad_distance(args.model, Path(args.out), settings, **model_settings(args))
    report(f"wrote {out / 'grad_distance.json'} and {out / 'grad_distance.png'}")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    """Handler of `analyze probe`."""
    from pathlib import Path

    from hybrid_megatron.analysis.probe import ProbeSettings, run_probe

    settings = settings_from(ProbeSettings, args)
    out = run_probe(args.model, Path(args.out), settings, **model_settings(args))
    report(f"wrote {out / 'probe.json'} and {out / 'probe.png'}")
    return 0


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """Register cap, grad-distance and probe on the `analyze` group's subparsers."""
    cap = sub.add_parser(
        "cap",
        help="receptive-field capping at inference: full-attention or efficient layers see "
        "only K tokens (+ sinks; Mamba: state reset every K); loss by position and task "
        "scores over K",
    )
    cap.add_argument("model", metavar="MODEL", help="HF dir, run dir or Megatron checkpoint")
    cap.add_argument(
        "--target",
        action="append",
        help="layers to cap: full, efficient (SWA + Mamba) or layer indices like 3,7; "
        "repeatable (default: full and efficient)",
    )
    cap.add_argument(
        "--k", type=int_list_arg(minimum=1), default=[64, 256, 1024], help="caps, e.g. 64,256,1024"
    )
    cap.add_argument(
        "--sinks", type=int, default=0, help="first tokens full-attention layers keep seeing"
    )
    cap.add_argument("--length", type=length_arg, default=4096, help="sequence / task length")
    cap.add_argument(
        "--num-sequences", type=int, default=4, help="loss-by-position sequences (0: none)"
    )
    cap.add_argument("--ppl-data", help=".jsonl ('text'), .txt or dir (default: built-in corpus)")
    cap.add_argument("--bin-width", type=int, help="position bin width (default powers of 2)")
    cap.add_argument(
        "--tasks", type=_tasks, default=["niah_single_1"], help="comma list of tasks, or none"
    )
    cap.add_argument("--num-samples", type=positive_arg, default=10, help="samples per task")
    cap.add_argument(
        "--max-new-tokens", type=positive_arg, default=32, help="generation budget per sample"
    )
    cap.add_argument("--out", required=True, help="output directory")
    add_model_options(cap)
    cap.set_defaults(func=cmd_cap)

    grad = sub.add_parser(
        "grad-distance",
        help="gradient of a late-token target (summed logits of the last N positions) with "
        "respect to the input embeddings, by distance to the last token",
    )
    grad.add_argument("model", metavar="MODEL", help="HF dir, run dir or Megatron checkpoint")
    grad.add_argument("--length", type=length_arg, default=4096, help="sequence length")
    grad.add_argument("--num-sequences", type=positive_arg, default=8, help="sequences averaged")
    grad.add_argument("--last-n", type=positive_arg, default=20, help="target positions (20)")
    grad.add_argument(
        "--target",
        choices=["logit_sum", "argmax_logit"],
        default="logit_sum",
        help="sum over the vocabulary of the averaged logits (paper) or their maximum",
    )
    grad.add_argument("--data", help=".jsonl ('text'), .txt or dir (default: built-in corpus)")
    grad.add_argument("--out", required=True, help="output directory")
    add_model_options(grad)
    grad.set_defaults(func=cmd_grad_distance)

    probe = sub.add_parser(
        "probe",
        help="logistic-regression probes per layer (residual stream and layer delta at the "
        "last token) classifying a needle's value",
    )
    probe.add_argument("model", metavar="MODEL", help="HF dir, run dir or Megatron checkpoint")
    probe.add_argument("--task", default="niah_single_1", help="niah_single_* prompt generator")
    probe.add_argument("--length", type=length_arg, default=4096, help="prompt length")
    probe.add_argument("--num-samples", type=positive_arg, default=200, help="prompts")
    probe.add_argument("--num-classes", type=positive_arg, default=4, help="needle values")
    probe.add_argument(
        "--test-fraction", type=float, default=0.3, help="held-out share of the prompts"
    )
    probe.add_argument("--l2", type=float, default=1e-3, help="L2 penalty of the probe")
    probe.add_argument("--out", required=True, help="output directory")
    add_model_options(probe)
    probe.set_defaults(func=cmd_probe)

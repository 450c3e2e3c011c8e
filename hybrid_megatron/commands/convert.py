"""`convert` subcommands (to-hf, from-hf, verify) for the hybrid-megatron command line.

Wire into the main parser with `add_subcommands(subparsers)`; handlers return an exit code and
raise ConfigError (exit 2 in `hybrid_megatron.cli.main`) for refused conversions.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def _print_report(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=1))
        return
    check = report.get("verify")
    for key, value in report.items():
        if key != "verify":
            print(f"{key:<14} {value}")
    if check:
        print(
            f"verify         max |diff| {check['max_abs_diff']:.3g}"
            f"  mean {check['mean_abs_diff']:.3g}"
            f"  top-1 agreement {check['top1_agreement']:.4f}  over {check['tokens']} tokens"
            f"  -> {'ok' if check['ok'] else 'MISMATCH'}"
        )


def cmd_to_hf(args: argparse.Namespace) -> int:
    """Megatron checkpoint -> Hugging Face directory."""
    from hybrid_megatron.hf.convert import megatron_to_hf

    tokenizer: Any = False if args.no_tokenizer else args.tokenizer
    report = megatron_to_hf(
        args.checkpoint,
        args.output,
        dtype=args.dtype,
        overwrite=args.overwrite,
        verify=not args.no_verify,
        max_shard_size=args.max_shard_size,
        tokenizer=tokenizer,
        verify_tokens=args.verify_tokens,
    )
    _print_report(report, args.json)
    return 0


def cmd_from_hf(args: argparse.Namespace) -> int:
    """Hugging Face directory -> Megatron dist checkpoint."""
    from hybrid_megatron.hf.convert import hf_to_megatron

    report = hf_to_megatron(
        args.hf_dir,
        args.output,
        overwrite=args.overwrite,
        verify=not args.no_verify,
        iteration=args.iteration,
        verify_tokens=args.verify_tokens,
    )
    _print_report(report, args.json)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Compare logits; exit 1 when they disagree beyond the tolerance."""
    from hybrid_megatron.hf.convert import verify

    report = verify(
        args.hf_dir,
        args.checkpoint,
        num_tokens=args.verify_tokens,
        batch_size=args.batch_size,
        atol=args.atol,
    )
    summary = {"checkpoint": report["checkpoint"], "hf_dir": report["hf_dir"], "verify": report}
    _print_report(report if args.json else summary, args.json)
    return 0 if report["ok"] else 1


def add_subcommands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `convert {to-hf,from-hf,verify}` to a parser's subcommands; returns `convert`."""
    convert = subparsers.add_parser(
        "convert", help="convert checkpoints between Megatron and Hugging Face formats"
    )
    sub = convert.add_subparsers(dest="convert_command", required=True)

    to_hf = sub.add_parser("to-hf", help="Megatron checkpoint -> Hugging Face directory")
    to_hf.add_argument("checkpoint", help="run dir, its checkpoints/ dir, or one iter_* dir")
    to_hf.add_argument("output", help="new Hugging Face model directory")
    to_hf.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    to_hf.add_argument("--max-shard-size", default="5GB", help="safetensors shard size")
    to_hf.add_argument("--tokenizer", default=None, help="HF tokenizer dir (default: the run's)")
    to_hf.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files")
    to_hf.set_defaults(func=cmd_to_hf)

    from_hf = sub.add_parser("from-hf", help="Hugging Face directory -> Megatron checkpoint")
    from_hf.add_argument("hf_dir", help="directory written by `convert to-hf`/save_pretrained")
    from_hf.add_argument("output", help="new directory; gets checkpoints/iter_NNNNNNN/")
    from_hf.add_argument("--iteration", type=int, default=None, help="default: the recorded one")
    from_hf.set_defaults(func=cmd_from_hf)

    for p in (to_hf, from_hf):
        p.add_argument("--overwrite", action="store_true", help="replace an existing output")
        p.add_argument("--no-verify", action="store_true", help="skip the logit comparison")

    check = sub.add_parser("verify", help="compare logits of an HF dir and a Megatron checkpoint")
    check.add_argument("hf_dir")
    check.add_argument("checkpoint", help="run dir, its checkpoints/ dir, or one iter_* dir")
    check.add_argument("--batch-size", type=int, default=2)
    check.add_argument("--atol", type=float, default=1e-3, help="max |logit diff| accepted")
    check.set_defaults(func=cmd_verify)

    for p in (to_hf, from_hf, check):
        p.add_argument("--verify-tokens", type=int, default=None, help="tokens per sequence")
        p.add_argument("--json", action="store_true", help="print the report as JSON")
    return convert

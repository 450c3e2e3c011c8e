"""Option types and helpers shared by the `hybrid-megatron analyze` subcommands.

Imported when the parser is built, so nothing here imports torch.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

from hybrid_megatron.procenv import is_rank0

SettingsT = TypeVar("SettingsT")


def report(message: str) -> None:
    """Print once per job (rank 0)."""
    if is_rank0():
        print(message)


def length_arg(text: str) -> int:
    """A token count such as 4096, 4k or 32K."""
    from hybrid_megatron.eval.plan import parse_length

    try:
        return parse_length(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def positive_arg(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def int_list_arg(minimum: int | None = None):
    """An option type for a comma list of integers, each >= `minimum` when given."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a comma list of integers") from None
        if not values:
            raise argparse.ArgumentTypeError(f"'{text}': give at least one integer")
        if minimum is not None and min(values) < minimum:
            raise argparse.ArgumentTypeError(f"'{text}': every value must be >= {minimum}")
        return values

    return parse


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every analysis that loads a model."""
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda")
    p.add_argument("--dtype", default=None, help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp32")
    p.add_argument("--tokenizer", help="tokenizer override: 'byte' or a local HF tokenizer dir")
    p.add_argument("--seed", type=int, default=42, help="seed of the generated prompts")
    p.add_argument(
        "--no-verify-conversion",
        action="store_true",
        help="skip the logit check when converting Megatron checkpoints",
    )


def model_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The model-loading keywords of the analyses, from `add_model_options`' options."""
    return dict(
        device=args.device,
        dtype=args.dtype,
        tokenizer=args.tokenizer,
        verify_conversion=not args.no_verify_conversion,
    )


def settings_from(cls: type[SettingsT], args: argparse.Namespace, **given: Any) -> SettingsT:
    """The settings dataclass `cls` from the parsed options of the same names (options a
    subcommand lacks keep the dataclass default); `given` sets the rest or overrides."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {n: getattr(args, n) for n in names if n not in given and hasattr(args, n)}
    return cls(**values, **given)

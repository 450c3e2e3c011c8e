"""`hybrid-megatron analyze ...`: the mechanism-analysis subcommand group.

    hybrid-megatron analyze retrieval-heads MODEL --out DIR
    hybrid-megatron analyze trace RUN_DIR --out DIR
    hybrid-megatron analyze cap MODEL --out DIR
    hybrid-megatron analyze grad-distance MODEL --out DIR
    hybrid-megatron analyze probe MODEL --out DIR

`REGISTRARS` lists "module:function" names; each function receives the group's subparsers
and adds its subcommands. Another module joins the group with one line in that list. The
modules are imported when the parser is built, so they must not import torch at import time.
"""

from __future__ import annotations

import argparse
import importlib

REGISTRARS: list[str] = [
    "hybrid_megatron.commands.analyze_mechanism:add_subcommands",
    "hybrid_megatron.commands.analyze_inference:add_subcommands",
    "hybrid_megatron.commands.analyze_study:add_subcommands",
]


def add_subcommands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `analyze` group and every subcommand of `REGISTRARS` under it."""
    group = subparsers.add_parser(
        "analyze",
        help="mechanism analysis of checkpoints: retrieval heads, tracing over training, "
        "receptive-field capping, gradient distance, probes",
    )
    sub = group.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    for spec in REGISTRARS:
        module, _, function = spec.partition(":")
        getattr(importlib.import_module(module), function)(sub)
    return group

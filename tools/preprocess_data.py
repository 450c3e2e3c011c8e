#!/usr/bin/env python
"""Same as `hybrid-megatron preprocess ...` (kept for Megatron-style workflows)."""

from __future__ import annotations

import sys

from hybrid_megatron.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["preprocess", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

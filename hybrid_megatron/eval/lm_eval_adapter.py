"""Make converted directories usable by lm-evaluation-harness (see LM_EVAL.md).

lm-eval's `hf` model loads the tokenizer from the model directory. Conversion writes it for
byte-tokenizer runs; for directories converted before that, `add_byte_tokenizer(DIR)` writes
a Hugging Face tokenizer with exactly the same ids (UTF-8 byte b -> id b, `<eod>` = 256,
`<pad>` = 257):

    python -m hybrid_megatron.eval.lm_eval_adapter add-byte-tokenizer DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from hybrid_megatron.data.tokenizer import byte_hf_tokenizer
from hybrid_megatron.errors import ConfigError


def add_byte_tokenizer(hf_dir: str | os.PathLike, force: bool = False) -> Path:
    """Save the byte tokenizer into an HF model directory trained with the byte tokenizer."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{hf_dir} is not a Hugging Face model directory (no config.json).")
    config = json.loads(config_path.read_text())
    recorded = ((config.get("megatron") or {}).get("run_config") or {}).get("data", {})
    tokenizer = recorded.get("tokenizer", "byte")
    if tokenizer != "byte" and not force:
        raise ConfigError(
            f"{hf_dir} was trained with tokenizer {tokenizer!r}, not the byte tokenizer; "
            "convert with that tokenizer instead (or pass --force)."
        )
    if (hf_dir / "tokenizer.json").exists() and not force:
        raise ConfigError(f"{hf_dir} already has a tokenizer.json (pass --force to replace it).")
    byte_hf_tokenizer().save_pretrained(str(hf_dir))
    return hf_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybrid_megatron.eval.lm_eval_adapter")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add-byte-tokenizer", help="write the byte tokenizer into an HF dir")
    add.add_argument("hf_dir")
    add.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    try:
        print(f"wrote the byte tokenizer into {add_byte_tokenizer(args.hf_dir, args.force)}")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

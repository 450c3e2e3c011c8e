"""`hybrid-megatron preprocess`: raw .jsonl/.txt -> Megatron indexed dataset (.bin/.idx/.json);
`hybrid-megatron train-tokenizer`: the same inputs -> a byte-level BPE tokenizer directory.

Examples:
    hybrid-megatron preprocess --input data/train.jsonl --output-prefix data/train
    hybrid-megatron preprocess --input books/ --txt-mode paragraph \\
        --tokenizer path/to/hf_tokenizer_dir --output-prefix data/books

.jsonl: one JSON object per line, text under --json-key (default "text").
.txt: one document per file (--txt-mode file, default) or per blank-line-separated paragraph
(--txt-mode paragraph). Directories are searched recursively for .jsonl/.txt files.
Each document is followed by the tokenizer's end-of-document token.
"""

from __future__ import annotations

import argparse
import sys


def _add_input_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl/.txt files or dirs")
    parser.add_argument("--json-key", default="text", help="JSON key holding the text")
    parser.add_argument("--txt-mode", choices=("file", "paragraph"), default="file")


def add_preprocess_arguments(parser: argparse.ArgumentParser) -> None:
    _add_input_arguments(parser)
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx/.json")
    parser.add_argument(
        "--tokenizer", default="byte", help="'byte' (built-in) or a local HF tokenizer directory"
    )
    parser.add_argument("--batch-size", type=int, default=1024, help="documents per encode call")
    parser.add_argument(
        "--progress-interval", type=float, default=10.0, help="seconds between progress lines"
    )


def cmd_preprocess(args: argparse.Namespace) -> int:
    """Run preprocessing; DataError (a ConfigError) is reported by the caller with exit 2."""
    from hybrid_megatron.data.preprocess import preprocess

    preprocess(
        args.input,
        args.output_prefix,
        args.tokenizer,
        json_key=args.json_key,
        txt_mode=args.txt_mode,
        batch_size=args.batch_size,
        progress_interval=args.progress_interval,
    )
    return 0


def add_subcommands(subparsers) -> None:
    """Register `preprocess` and `train-tokenizer` on a CLI's subparsers."""
    add_preprocess_subcommand(subparsers)
    add_train_tokenizer_subcommand(subparsers)


def add_preprocess_subcommand(subparsers) -> None:
    parser = subparsers.add_parser(
        "preprocess",
        help="tokenize .jsonl/.txt files into a Megatron indexed dataset",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_preprocess_arguments(parser)
    parser.set_defaults(func=cmd_preprocess)


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from hybrid_megatron.data.train_tokenizer import train_tokenizer_from_files

    train_tokenizer_from_files(
        args.input,
        args.vocab_size,
        args.output,
        json_key=args.json_key,
        txt_mode=args.txt_mode,
        log=lambda msg: print(msg, file=sys.stderr),
    )
    return 0


def add_train_tokenizer_subcommand(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-tokenizer",
        help="train a byte-level BPE tokenizer on .jsonl/.txt files (offline)",
        description="Train a byte-level BPE tokenizer on local .jsonl/.txt files, offline. The "
        "result is a Hugging Face tokenizer directory usable as data.tokenizer, by preprocess, "
        "conversion and evaluation; digits are single tokens, <eod> and <pad> are special.",
    )
    _add_input_arguments(parser)
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--output", required=True, help="new tokenizer directory")
    parser.set_defaults(func=cmd_train_tokenizer)

"""`python -m hybrid_megatron.data.synthetic`: write a generated corpus as JSONL."""

from __future__ import annotations

import argparse

from hybrid_megatron.data.synthetic.corpus import generate_corpus
from hybrid_megatron.errors import ConfigError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m hybrid_megatron.data.synthetic",
        description="Write a deterministic synthetic retrieval corpus as JSONL.",
    )
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--num-docs", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-distance", type=int, default=16)
    parser.add_argument("--max-distance", type=int, default=256)
    parser.add_argument("--max-facts", type=int, default=3)
    parser.add_argument("--niah-fraction", type=float, default=0.0)
    parser.add_argument("--passkey-fraction", type=float, default=0.0)
    parser.add_argument("--copy-fraction", type=float, default=0.0)
    parser.add_argument("--repeat-fraction", type=float, default=0.0)
    parser.add_argument("--doc-length", type=int, default=None)
    parser.add_argument(
        "--max-haystack", type=int, default=None, help="niah/passkey haystack characters"
    )
    parser.add_argument("--include-facts", action="store_true")
    args = parser.parse_args(argv)
    try:
        out = generate_corpus(
            args.output,
            args.num_docs,
            args.seed,
            min_distance=args.min_distance,
            max_distance=args.max_distance,
            max_facts=args.max_facts,
            niah_fraction=args.niah_fraction,
            passkey_fraction=args.passkey_fraction,
            copy_fraction=args.copy_fraction,
            repeat_fraction=args.repeat_fraction,
            doc_length=args.doc_length,
            max_haystack=args.max_haystack,
            include_facts=args.include_facts,
        )
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {args.num_docs} documents to {out}")


if __name__ == "__main__":
    main()

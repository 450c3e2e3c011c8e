"""`hybrid-megatron` command line: one entry point over the package's stages."""

from __future__ import annotations

import argparse
import sys

from hybrid_megatron.errors import ConfigError


def _fmt(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def cmd_info(args: argparse.Namespace) -> int:
    """Print the compiled layer plan, pipeline split and parameter counts of a config."""
    from hybrid_megatron.config import load_config
    from hybrid_megatron.model.params import count_params, layer_params
    from hybrid_megatron.pattern import compile_pattern

    cfg = load_config(args.config, args.set)
    m, p = cfg.model, cfg.parallel
    compiled = compile_pattern(m, p)
    print(f"pattern      {m.pattern}")
    print(f"megatron     {compiled.megatron_pattern}  ({compiled.num_layers} layers)")
    print(
        f"parallel     tp={p.tensor} pp={p.pipeline} cp={p.context} "
        f"vpp={p.virtual_pipeline or 1} sp={p.sequence_parallel}"
    )
    print(f"{'layer':>5}  {'stage':>5}  {'kind':<22} {'window':>6}  {'rope':<14} params")
    names = {
        "M": "mamba2",
        "*": "full attention",
        "S": "sliding-window attn",
        "-": "mlp",
        "E": "moe",
    }
    for plan in compiled.layers:
        stage = next(i for i, (a, b) in enumerate(compiled.stages) if a < plan.number <= b)
        rope = "" if plan.rope is None else (f"rope {plan.rope_theta:g}" if plan.rope else "nope")
        window = str(plan.window) if plan.window else ""
        print(
            f"{plan.number:>5}  {stage:>5}  {names[plan.kind.value]:<22} {window:>6}  "
            f"{rope:<14} {_fmt(layer_params(m, plan.kind))}"
        )
    counts = count_params(m)
    print(
        f"parameters   total {_fmt(counts['total'])}  non-embedding "
        f"{_fmt(counts['non_embedding'])}  embedding {_fmt(counts['embedding'])}"
        f"{'' if m.tie_embeddings else ' (+ untied output)'}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybrid-megatron",
        description="Pretrain, convert and evaluate hybrid attention / Mamba-2 language models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="show a config's compiled layer plan and parameter counts")
    info.add_argument("config", help="YAML run config, e.g. configs/tiny.yaml")
    info.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.swa.window=64",
    )
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"hybrid-megatron: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

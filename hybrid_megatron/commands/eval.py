"""`hybrid-megatron eval` and `hybrid-megatron eval-report` subcommands.

    hybrid-megatron eval --model runs/a/checkpoints/iter_0002000,runs/b \\
        --tasks niah_single_1,passkey,ppl --lengths 4k,8k,16k --num-samples 50 --output eval/ab
    torchrun --nproc-per-node 8 -m hybrid_megatron.cli eval ...      # 8 shards, one per GPU
    hybrid-megatron eval --all-checkpoints runs/a --tasks passkey --grid --output eval/a
    hybrid-megatron eval-report eval/a [eval/b ...] [--output report/]

"""

from __future__ import annotations

import argparse
from pathlib import Path

from hybrid_megatron.errors import ConfigError


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _lengths(text: str) -> list[int]:
    from hybrid_megatron.eval.plan import parse_length

    try:
        return [parse_length(t) for t in _csv(text)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _depths(text: str) -> list[float]:
    try:
        depths = [float(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma list of percents") from None
    if any(not 0 <= d <= 100 for d in depths):
        raise argparse.ArgumentTypeError("depths are percents in [0, 100]")
    return depths


def cmd_eval(args: argparse.Namespace) -> int:
    """Handler of `hybrid-megatron eval`."""
    from hybrid_megatron.eval.runner import EvalSettings, parse_task_options, run_eval, write_report

    if args.aggregate_only:
        write_report([Path(args.output)], Path(args.output), plots=not args.no_plots)
        return 0
    models = [m for group in args.model or [] for m in group]
    if not models and not args.all_checkpoints:
        raise ConfigError("pass --model PATH[,PATH...] or --all-checkpoints RUN_DIR")
    settings = EvalSettings(
        output=Path(args.output),
        models=models,
        all_checkpoints=list(args.all_checkpoints or []),
        tasks=_csv(args.tasks),
        lengths=args.lengths,
        num_samples=args.num_samples,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        max_new_tokens=args.max_new_tokens,
        task_options=parse_task_options(args.task_option),
        grid=args.grid or args.depths is not None,
        depths=args.depths,
        model_template=args.model_template,
        tokenizer=args.tokenizer,
        attn_implementation=args.attn_implementation,
        ppl_data=args.ppl_data,
        ppl_pack=args.ppl_pack,
        ppl_bin_width=args.ppl_bin_width,
        log_every=args.log_every,
        stop_after=args.stop_after,
        aggregate=not args.no_aggregate,
        plots=not args.no_plots,
        wait_timeout=args.wait_timeout,
        verify_conversion=not args.no_verify_conversion,
        check_generation=not args.skip_generation_check,
        threads=args.threads,
    )
    run_eval(settings)
    return 0


def cmd_eval_report(args: argparse.Namespace) -> int:
    """Handler of `hybrid-megatron eval-report`."""
    from hybrid_megatron.eval.runner import write_report

    dirs = [Path(d) for d in args.dirs]
    write_report(dirs, Path(args.output) if args.output else None, plots=not args.no_plots)
    return 0


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register `eval` and `eval-report` on a CLI's subparsers (handlers in `func`)."""
    ev = subparsers.add_parser(
        "eval",
        help="long-context evaluation (RULER tasks, passkey, needle grids, perplexity) of HF "
        "dirs or Megatron checkpoints; sharded over torchrun/srun ranks, resumable",
    )
    ev.add_argument(
        "--model",
        action="append",
        nargs="+",
        metavar="PATH",
        help="HF dir, run dir, checkpoints dir or iter dir; comma lists and globs "
        "(quoted: 'runs/a/checkpoints/iter_*') work; repeatable",
    )
    ev.add_argument(
        "--all-checkpoints",
        action="append",
        metavar="RUN_DIR",
        help="evaluate every complete checkpoint of a run (repeatable)",
    )
    ev.add_argument(
        "--tasks",
        default="niah_single_1",
        help="comma list of tasks: niah_*, vt, cwe, fwe, qa_1, qa_2, passkey, ppl "
        "(default niah_single_1)",
    )
    ev.add_argument("--lengths", type=_lengths, default=[4096], help="comma list, e.g. 4k,8k,16384")
    ev.add_argument("--num-samples", type=int, default=10, help="samples per task and length")
    ev.add_argument("--output", required=True, help="result directory (resumable)")
    ev.add_argument("--seed", type=int, default=42)
    ev.add_argument(
        "--batch-size", type=int, default=1, help="prompts of equal token length per generate"
    )
    ev.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK or cpu), cpu, cuda")
    ev.add_argument("--dtype", default=None, help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp32")
    ev.add_argument(
        "--max-new-tokens", type=int, help="generation budget for every task (default RULER's)"
    )
    ev.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="[TASK.]KEY=VALUE",
        help="task generator option, e.g. num_needle_v=2, qa_1.qa_path=squad.json, "
        "data_dir=DIR (repeatable)",
    )
    ev.add_argument(
        "--grid",
        action="store_true",
        help="needle grid: niah_*/passkey at every depth x length (other tasks as usual)",
    )
    ev.add_argument(
        "--depths", type=_depths, help="grid depths in percent (default 0,25,50,75,100)"
    )
    ev.add_argument("--model-template", help="prompt wrapper containing {task_template}")
    ev.add_argument("--tokenizer", help="tokenizer override: 'byte' or a local HF tokenizer dir")
    ev.add_argument(
        "--attn-implementation", help="sdpa (default), flex_attention, flash_attention_2, eager"
    )
    ev.add_argument("--ppl-data", help="long documents for ppl: .jsonl ('text'), .txt or a dir")
    ev.add_argument(
        "--ppl-pack", action="store_true", help="ppl: join documents instead of one per sequence"
    )
    ev.add_argument(
        "--ppl-bin-width", type=int, help="ppl: fixed position-bin width (default powers of 2)"
    )
    ev.add_argument("--log-every", type=int, default=10, help="progress line every N samples")
    ev.add_argument(
        "--stop-after", type=int, help="stop after N new samples on this rank (resume later)"
    )
    ev.add_argument(
        "--aggregate-only", action="store_true", help="only aggregate OUTPUT's samples and plot"
    )
    ev.add_argument("--no-aggregate", action="store_true", help="rank 0 does not aggregate")
    ev.add_argument("--no-plots", action="store_true")
    ev.add_argument(
        "--wait-timeout",
        type=float,
        default=600.0,
        help="seconds rank 0 waits for the other ranks before aggregating",
    )
    ev.add_argument(
        "--no-verify-conversion",
        action="store_true",
        help="skip the logit check when converting Megatron checkpoints",
    )
    ev.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads per process (default: OMP_NUM_THREADS if set, else 1 for models "
        "under 20M parameters, else the node's cores over its processes)",
    )
    ev.add_argument(
        "--skip-generation-check",
        action="store_true",
        help="do not check, before the sweep, that cached greedy decoding equals decoding by "
        "full forwards on each model's first prompt",
    )
    ev.set_defaults(func=cmd_eval)

    rep = subparsers.add_parser(
        "eval-report",
        help="aggregate eval directories into results.json / results.md and plots",
    )
    rep.add_argument("dirs", nargs="+", metavar="DIR", help="directories written by eval")
    rep.add_argument("--output", help="where results and plots go (default: the first DIR)")
    rep.add_argument("--no-plots", action="store_true")
    rep.set_defaults(func=cmd_eval_report)

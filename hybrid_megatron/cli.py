"""`hybrid-megatron` command line: one entry point over the package's stages."""

from __future__ import annotations

import argparse
import os
import sys
import time

from hybrid_megatron import procenv
from hybrid_megatron.commands import analyze, convert, data, launch, plot
from hybrid_megatron.commands import eval as eval_commands
from hybrid_megatron.errors import (
    BackendUnavailableError,
    ConfigError,
    DiskFullError,
    GenerationCheckError,
)


def cmd_info(args: argparse.Namespace) -> int:
    """Print the compiled layer plan, pipeline split and parameter counts of a config."""
    from hybrid_megatron.config import load_config
    from hybrid_megatron.context_parallel.plan import describe as describe_context_parallel
    from hybrid_megatron.model.params import count_params, layer_params
    from hybrid_megatron.pattern import compile_pattern
    from hybrid_megatron.training.progress import format_count

    cfg = load_config(args.config, args.set)
    m, p = cfg.model, cfg.parallel
    compiled = compile_pattern(m, p)
    print(f"pattern      {m.pattern}")
    print(f"megatron     {compiled.megatron_pattern}  ({compiled.num_layers} layers)")
    print(
        f"parallel     tp={p.tensor} pp={p.pipeline} cp={p.context} "
        f"vpp={p.virtual_pipeline or 1} sp={p.sequence_parallel}"
    )
    for line in describe_context_parallel(m, p):
        print(line)
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
            f"{rope:<14} {format_count(layer_params(m, plan.kind))}"
        )
    counts = count_params(m)
    print(
        f"parameters   total {format_count(counts['total'])}  non-embedding "
        f"{format_count(counts['non_embedding'])}  embedding {format_count(counts['embedding'])}"
        f"{'' if m.tie_embeddings else ' (+ untied output)'}"
    )
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Build the model for this rank's layout and run forward-backward on random tokens."""
    import time

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from hybrid_megatron import distributed
    from hybrid_megatron.config import load_config
    from hybrid_megatron.model.build import build_model
    from hybrid_megatron.training.schedule import forward_backward, wrap_ddp

    cfg = load_config(args.config, args.set)
    world = int(os.environ.get("WORLD_SIZE", 1))
    cfg.validate(world_size=world)
    device = distributed.initialize(cfg.parallel, device=args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = build_model(
        cfg,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        params_dtype=dtype,
        device=device,
    )
    build_s = time.perf_counter() - t0
    ddp = wrap_ddp([model], model.config)
    s, mb, n_micro = cfg.model.seq_length, args.micro_batch_size, args.num_microbatches
    gen = torch.Generator().manual_seed(0)

    def batches():
        while True:
            x = torch.randint(0, cfg.model.vocab_size, (mb, s + 1), generator=gen).to(device)
            yield dict(
                tokens=x[:, :-1],
                labels=x[:, 1:],
                loss_mask=torch.ones(mb, s, device=device),
                position_ids=torch.arange(s, device=device).expand(mb, -1),
            )

    times, loss = [], None
    for _ in range(args.steps):
        ddp[0].zero_grad_buffer()
        t0 = time.perf_counter()
        loss = forward_backward(ddp, batches(), n_micro, s, mb)
        times.append(time.perf_counter() - t0)
    dp = ps.get_data_parallel_world_size()
    tokens = s * mb * n_micro * dp
    if (
        ps.is_pipeline_last_stage()
        and ps.get_tensor_model_parallel_rank() == 0
        and ps.get_context_parallel_rank() == 0
        and (ps.get_data_parallel_rank() == 0)
    ):
        best = min(times)
        print(
            f"check ok: device={device.type} world={dist.get_world_size()} "
            f"tp={cfg.parallel.tensor} pp={cfg.parallel.pipeline} "
            f"cp={cfg.parallel.context} dp={dp} | build {build_s:.2f}s | loss {loss:.4f} | "
            f"fwd+bwd {best:.3f}s for {tokens} tokens ({tokens / best:,.0f} tokens/s)"
        )
    distributed.destroy()
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Pretrain (or resume) the run a config describes, then what follows (see command.py)."""
    from hybrid_megatron.config import load_config
    from hybrid_megatron.training.command import run_train_command

    overrides = list(args.set)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    cfg = load_config(args.config, overrides)
    argv = ["train", args.config, *(a for o in overrides for a in ("--set", o))]
    return run_train_command(cfg, argv)


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
    check = sub.add_parser(
        "check",
        help="build the model for this machine/launch layout and time forward+backward "
        "(also under torchrun for TP/PP)",
    )
    check.add_argument("config")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    check.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    check.add_argument("--micro-batch-size", type=int, default=2)
    check.add_argument("--num-microbatches", type=int, default=2)
    check.add_argument("--steps", type=int, default=3, help="timed repetitions (best is shown)")
    check.set_defaults(func=cmd_check)
    train = sub.add_parser(
        "train",
        help="pretrain a hybrid (resumes from the run directory's newest complete checkpoint)",
    )
    train.add_argument("config", help="YAML run config, e.g. configs/tiny.yaml")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    train.add_argument("--run-dir", help="where checkpoints and metrics go (default runs/NAME)")
    train.add_argument("--steps", type=int, help="override train.steps")
    train.set_defaults(func=cmd_train)
    # Each group registers its subcommands; handlers import what they need when they run, so
    # `--help` and argument errors stay fast (no torch / transformers / Megatron import).
    for group in (plot, data, convert, eval_commands, launch, analyze):
        group.add_subcommands(sub)
    return parser


def _quiet_third_party_warnings() -> None:
    """Hide known, harmless warnings from Megatron-Core and torch.distributed internals."""
    import warnings

    warnings.filterwarnings("ignore", module=r"megatron\.core(\..*)?")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
    warnings.filterwarnings("ignore", message=r".*grad attribute of a Tensor that is not a leaf.*")
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine|transformer_engine).*")


def _user_error(message: str) -> int:
    """Exit code 2 with `message` from rank 0 only. Other ranks of a launcher job wait a
    moment first: the launcher stops the job when a rank exits, possibly before rank 0 has
    printed the same error."""
    if procenv.is_rank0():
        print(f"hybrid-megatron: {message}", file=sys.stderr, flush=True)
    elif procenv.launched():
        time.sleep(10)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # recorded by `launch` scripts
    _quiet_third_party_warnings()
    try:
        return args.func(args)
    except ConfigError as e:  # every rank sees the same config: one of them says so
        return _user_error(f"config error: {e}")
    except BackendUnavailableError as e:
        return _user_error(str(e))
    except GenerationCheckError as e:
        print(f"hybrid-megatron: {e}", file=sys.stderr)
        return 3
    except (FloatingPointError, DiskFullError) as e:
        print(f"hybrid-megatron: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())

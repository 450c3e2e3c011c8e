"""`hybrid-megatron launch {slurm,sweep,local}`.

    hybrid-megatron launch slurm configs/paper/s1_swa128.yaml --nodes 4 --gpus-per-node 8 \\
        --partition gpu --time 24:00:00 --then convert,eval --eval-tasks passkey --eval-lengths 4k
    hybrid-megatron launch sweep --all-checkpoints runs/s1 --tasks niah_single_1,passkey \\
        --lengths 4k,8k --output eval/s1 --gpus-per-node 1
    hybrid-megatron launch local configs/tiny.yaml --nproc 2

Module imports stay light (argparse only): handlers import the launch machinery when called.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _lengths(text: str) -> list[int]:
    from hybrid_megatron.eval.plan import parse_length

    try:
        return [parse_length(t) for t in _csv(text)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _options(args: argparse.Namespace):
    from hybrid_megatron.launch.options import find_profile, load_profile, merge_options, parse_env

    cli = dict(
        nodes=getattr(args, "nodes", None),
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=getattr(args, "tasks_per_node", None),
        cpus_per_task=args.cpus_per_task,
        mode=getattr(args, "mode", None),
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        reservation=args.reservation,
        time=args.time,
        exclusive=True if args.exclusive else None,
        container_image=args.container_image,
        container_mounts=_csv(args.container_mounts) if args.container_mounts else None,
        env=parse_env(args.env, "--env") if args.env else None,
        setup=args.setup or None,
        log_dir=args.log_dir,
        job_name=args.job_name,
        python=args.python,
        signal_seconds=getattr(args, "signal_seconds", None),
        requeue=False if getattr(args, "no_requeue", False) else None,
        max_restarts=getattr(args, "max_restarts", None),
        array_parallel=getattr(args, "array_parallel", None),
        sbatch_args=args.sbatch_arg or None,
        srun_args=args.srun_arg or None,
    )
    return merge_options(load_profile(find_profile(args.profile)), cli)


def _print_jobs(jobs, records, as_json: bool) -> None:
    from hybrid_megatron.launch.submit import dependency_args

    if records is None:  # dry run: the scripts
        ids = [f"<{job.stage} job id>" for job in jobs]
        for i, job in enumerate(jobs):
            if len(jobs) > 1:
                deps = " ".join(dependency_args(job, ids))
                after = f"  (sbatch {deps})" if deps else ""
                print(f"# ===== job {i + 1}/{len(jobs)}: {job.stage}{after}")
            print(job.script, end="" if job.script.endswith("\n") else "\n")
        return
    if as_json:
        print(json.dumps(records, indent=1))
        return
    for r in records:
        after = f", after {r['after']}" if r["after"] else ""
        print(f"submitted {r['stage']} job {r['job_id']} ({r['name']}{after}); log {r['log']}")
    print(f"scripts and submissions.jsonl in {records[0]['script'].rsplit('/', 1)[0]}")


def _submit_or_print(jobs, args) -> int:
    from pathlib import Path

    from hybrid_megatron.launch.submit import LaunchError, submit

    if args.dry_run:
        _print_jobs(jobs, None, False)
        return 0
    try:
        records = submit(jobs, Path(jobs[0].log).parent)
    except LaunchError as err:
        print(f"hybrid-megatron launch: {err}", file=sys.stderr)
        return 2
    _print_jobs(jobs, records, args.json)
    return 0


def cmd_launch_slurm(args: argparse.Namespace) -> int:
    """Handler of `launch slurm`: validate, render, submit the training job (+ chain)."""
    from hybrid_megatron.launch.plan import EvalRequest, describe_command, plan_training

    request = EvalRequest(
        tasks=_csv(args.eval_tasks) if args.eval_tasks else None,
        lengths=args.eval_lengths,
        num_samples=args.eval_samples,
        extra_args=[w for a in args.eval_arg for w in shlex.split(a)],
    )
    jobs = plan_training(
        args.config,
        args.set,
        _options(args),
        run_dir=args.run_dir,
        then=_csv(args.then) if args.then else [],
        eval_request=request,
        hf_dir=args.hf_dir,
        command=describe_command(args.argv or []),
        create_dirs=not args.dry_run,
    )
    return _submit_or_print(jobs, args)


def cmd_launch_sweep(args: argparse.Namespace) -> int:
    """Handler of `launch sweep`: an eval job array over models x lengths + one report."""
    from hybrid_megatron.errors import ConfigError
    from hybrid_megatron.launch.plan import EvalRequest, describe_command, plan_sweep

    models = [m for group in args.model or [] for m in group]
    if not models and not args.all_checkpoints:
        raise ConfigError("pass --model PATH[,PATH...] or --all-checkpoints RUN_DIR")
    request = EvalRequest(
        tasks=_csv(args.tasks),
        lengths=args.lengths,
        num_samples=args.num_samples,
        extra_args=[w for a in args.eval_arg for w in shlex.split(a)],
    )
    jobs = plan_sweep(
        models,
        list(args.all_checkpoints or []),
        request,
        args.output,
        _options(args),
        command=describe_command(args.argv or []),
        create_dirs=not args.dry_run,
    )
    return _submit_or_print(jobs, args)


def cmd_launch_local(args: argparse.Namespace) -> int:
    """Handler of `launch local`: torchrun on this machine."""
    from hybrid_megatron.launch.local import local_command, run_local

    return run_local(local_command(args.config, args.set, args.nproc, args.run_dir), args.dry_run)


def _cluster_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster (defaults from the Slurm profile)")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node (0 for a CPU cluster)")
    g.add_argument("--cpus-per-task", type=int, help="CPUs per rank (also OMP_NUM_THREADS)")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--reservation")
    g.add_argument("--time", help="time limit, e.g. 24:00:00 or 2-00:00:00 (default 24:00:00)")
    g.add_argument("--exclusive", action="store_true", help="whole nodes only")
    g.add_argument("--container-image", help="pyxis/enroot image (srun --container-image)")
    g.add_argument("--container-mounts", help="SRC:DST[,SRC:DST...] (srun --container-mounts)")
    g.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="export in the job "
        "(repeatable; $VARIABLES expand in the job; KEY= drops a default such as an NCCL one)",
    )
    g.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar="LINE",
        help="shell line run before the launch, e.g. 'module load cuda' (repeatable)",
    )
    g.add_argument("--log-dir", help="job logs and scripts (default RUN_DIR/logs)")
    g.add_argument("--job-name")
    g.add_argument("--python", help="Python with hybrid_megatron (default: this one)")
    g.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG")
    g.add_argument("--srun-arg", action="append", default=[], metavar="ARG")
    g.add_argument("--profile", help="Slurm profile YAML (default: see slurm/README.md)")
    p.add_argument("--dry-run", action="store_true", help="print the job script(s), submit none")
    p.add_argument("--json", action="store_true", help="print the submitted jobs as JSON")
    p.set_defaults(argv=None)


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register `launch {slurm,sweep,local}` on a CLI's subparsers (handlers in `func`)."""
    launch = subparsers.add_parser(
        "launch", help="run a config on Slurm (jobs, chains, eval sweeps) or with local torchrun"
    )
    sub = launch.add_subparsers(dest="launch_command", required=True)

    sl = sub.add_parser(
        "slurm",
        help="validate, render and submit a (multi-node) training job with requeue, "
        "optionally followed by convert / eval jobs",
    )
    sl.add_argument("config", help="YAML run config")
    sl.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value"
    )
    sl.add_argument("--run-dir", help="shared run directory (default: the config's)")
    sl.add_argument("--nodes", type=int, help="nodes (default 1)")
    sl.add_argument("--tasks-per-node", type=int, help="ranks per node when --gpus-per-node 0")
    sl.add_argument(
        "--mode",
        choices=["srun", "torchrun"],
        help="srun: one task per rank (default); torchrun: one agent per node, c10d rendezvous",
    )
    sl.add_argument("--signal-seconds", type=int, help="checkpoint warning before the limit (180)")
    sl.add_argument("--no-requeue", action="store_true", help="no warning signal, no requeue")
    sl.add_argument("--max-restarts", type=int, help="requeue at most this often (100)")
    sl.add_argument("--then", help="follow-up jobs: convert, eval or convert,eval")
    sl.add_argument("--hf-dir", help="--then convert output (default RUN_DIR/hf)")
    sl.add_argument("--eval-tasks", help="--then eval tasks (default after_training.eval_tasks)")
    sl.add_argument("--eval-lengths", type=_lengths, help="--then eval lengths, e.g. 4k,8k")
    sl.add_argument("--eval-samples", type=int, help="--then eval samples per task and length")
    sl.add_argument(
        "--eval-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra `hybrid-megatron eval` arguments, e.g. --eval-arg='--batch-size 4' "
        "(repeatable)",
    )
    _cluster_arguments(sl)
    sl.set_defaults(func=cmd_launch_slurm)

    sw = sub.add_parser(
        "sweep", help="eval job array over checkpoints x lengths + one combined report job"
    )
    sw.add_argument(
        "--model",
        action="append",
        nargs="+",
        metavar="PATH",
        help="HF dirs or Megatron checkpoints; comma lists and quoted globs work",
    )
    sw.add_argument(
        "--all-checkpoints",
        action="append",
        metavar="RUN_DIR",
        help="every complete checkpoint of a run (repeatable)",
    )
    sw.add_argument("--tasks", required=True, help="comma list, e.g. niah_single_1,passkey")
    sw.add_argument("--lengths", type=_lengths, required=True, help="comma list, e.g. 4k,8k")
    sw.add_argument("--num-samples", type=int, default=10)
    sw.add_argument("--output", required=True, help="report directory (parts in OUTPUT/parts)")
    sw.add_argument("--array-parallel", type=int, help="array tasks running at once (%%N)")
    sw.add_argument(
        "--eval-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra `hybrid-megatron eval` arguments, e.g. --eval-arg='--batch-size 4' "
        "(repeatable)",
    )
    _cluster_arguments(sw)
    sw.set_defaults(func=cmd_launch_sweep)

    lo = sub.add_parser("local", help="train a config on this machine with torchrun")
    lo.add_argument("config")
    lo.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value"
    )
    lo.add_argument("--nproc", type=int, required=True, help="ranks (processes) on this machine")
    lo.add_argument("--run-dir")
    lo.add_argument("--dry-run", action="store_true", help="print the torchrun command only")
    lo.set_defaults(func=cmd_launch_local)

"""`hybrid-megatron train`: one command from config to results.

A plain command (no torchrun / srun) owns the whole pipeline: it checks the config, prints a
start banner, prepares the data (corpus, tokenizer) where its progress is visible, trains
(on CPU as one-thread worker processes, see `workers`), then runs the pipeline after training
(`after`). Under a launcher each process trains its rank, and rank 0 prints what is left to
do as commands. A run that already finished says so and does nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hybrid_megatron import procenv
from hybrid_megatron.config import RunConfig, validate_data_source
from hybrid_megatron.training.after import (
    finished_record,
    print_next_steps,
    run_pipeline,
    summary_lines,
    wants_hf,
)
from hybrid_megatron.training.progress import format_count
from hybrid_megatron.training.run_dir import check_same_model, check_steps_not_below
from hybrid_megatron.training.run_lock import acquire as acquire_run_lock


def _print(msg: str) -> None:
    print(msg, flush=True)


def newest_intact_iteration(cfg: RunConfig) -> int | None:
    from hybrid_megatron.checkpoint.layout import find_latest_valid

    info = find_latest_valid(
        cfg.resolved_run_dir / "checkpoints", cfg.checkpoint.checksums, quiet=True
    )
    return None if info is None else info.iteration


def banner(cfg: RunConfig, nproc: int, cpu: bool, start_step: int | None) -> list[str]:
    """What the run is and what will happen, before any slow work."""
    from hybrid_megatron.model.params import count_params

    m, p, t, a = cfg.model, cfg.parallel, cfg.train, cfg.after_training
    params = count_params(m)
    model_parallel = p.tensor * p.pipeline * p.context
    dp = max(1, nproc // model_parallel)
    tokens_per_step = t.global_batch_size * m.seq_length
    if cpu:
        device = (
            f"CPU, {nproc} worker processes x 1 thread (data parallel {dp})"
            if nproc > 1
            else f"CPU, 1 process x {_threads()} threads"
        )
        precision = "fp32"
    else:
        device, precision = "CUDA", "bf16" if t.precision == "auto" else t.precision
    lines = [
        f"run          {cfg.name} -> {cfg.resolved_run_dir}",
        f"model        {m.pattern}  {format_count(params['total'])} parameters "
        f"({format_count(params['non_embedding'])} without embeddings), seq {m.seq_length}",
        f"parallel     tp={p.tensor} pp={p.pipeline} cp={p.context} dp={dp}",
        f"device       {device}, {precision}",
        "data         "
        + (
            ", ".join(cfg.data.prefixes)
            if cfg.data.prefixes
            else f"built-in generated corpus ({cfg.data.synthetic.num_docs} documents)"
        )
        + f", tokenizer {cfg.data.tokenizer}",
        f"training     {t.steps} steps x {t.global_batch_size} sequences = "
        f"{format_count(t.steps * tokens_per_step)} tokens "
        f"({format_count(tokens_per_step)} per step)"
        + (f", resuming at step {start_step}" if start_step else ""),
    ]
    after = []
    if a.plots:
        after.append("loss plot")
    if wants_hf(cfg):
        after.append("convert to Hugging Face")
    if a.recall_probe and not cfg.data.prefixes:
        after.append("recall probe")
    if a.eval_tasks:
        lengths = ",".join(str(n) for n in a.eval_lengths)
        after.append(f"evaluate {','.join(a.eval_tasks)} at {lengths} tokens")
    lines.append(f"then         {'; '.join(after) if after else 'nothing (after_training)'}")
    return lines


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _prepare_data(cfg: RunConfig) -> None:
    """The built-in corpus (and its tokenizer) here, once, before workers start."""
    if not cfg.data.prefixes:
        from hybrid_megatron.training.data import synthetic_prefix

        synthetic_prefix(cfg, cfg.resolved_run_dir)


def run_train_command(cfg: RunConfig, argv: Sequence[str]) -> int:
    """The `train` command for `cfg`; `argv` re-creates it for worker processes."""
    if procenv.launched():
        return _train_under_launcher(cfg)
    from hybrid_megatron.training.preflight import check_environment
    from hybrid_megatron.training.workers import plan_cpu_processes, trains_on_cpu

    cfg.validate()
    validate_data_source(cfg)
    check_environment(cfg, plan_cpu_processes(cfg) if trains_on_cpu(cfg) else 1)
    run_dir = cfg.resolved_run_dir
    check_same_model(cfg, run_dir)
    with acquire_run_lock(run_dir, share_with_children=True):
        return _run_locked(cfg, argv, run_dir)


def _run_locked(cfg: RunConfig, argv: Sequence[str], run_dir: Path) -> int:
    """The plain command's work, while it holds the run-dir lock (shared with its workers)."""
    from hybrid_megatron.training.workers import plan_cpu_processes, run_workers, trains_on_cpu

    done = newest_intact_iteration(cfg)
    check_steps_not_below(cfg, done)
    if done is not None and done >= cfg.train.steps:
        record = finished_record(run_dir, done)
        if record is not None:
            _print(f"{run_dir} is finished (step {done}); nothing to do. Results:")
            for line in summary_lines(record):
                _print(line)
            return 0
        _print(f"{run_dir}: training finished at step {done}; running what follows it")
    else:
        cpu = trains_on_cpu(cfg)
        nproc = plan_cpu_processes(cfg) if cpu else 1
        for line in banner(cfg, nproc, cpu, done):
            _print(line)
        if nproc > 1:
            _prepare_data(cfg)
            code = run_workers(argv, nproc)
            if code:
                return code
        else:
            from hybrid_megatron import distributed
            from hybrid_megatron.training.trainer import train

            try:
                result = train(cfg)
            finally:
                distributed.destroy()
            if result.stopped_by:
                _print(
                    f"stopped at step {result.iteration} ({result.stopped_by}); checkpoint "
                    f"{result.last_checkpoint}. Run the same command to resume."
                )
                return 0
        done = newest_intact_iteration(cfg)
        if done is None or done < cfg.train.steps:
            return 0  # stopped early (signal): the workers said how to resume
    run_pipeline(cfg, run_dir, done)
    return 0


def _train_under_launcher(cfg: RunConfig) -> int:
    """One rank of a torchrun / srun job (or of this command's own workers)."""
    import signal

    from hybrid_megatron import distributed
    from hybrid_megatron.lifetime import die_with_parent, exit_when_orphaned
    from hybrid_megatron.training.trainer import train

    if os.environ.get("TORCHELASTIC_RUN_ID"):  # a torchrun worker: stop (and save) with it
        die_with_parent(signal.SIGTERM, parent=os.getppid())
        exit_when_orphaned()
    try:
        result = train(cfg)
    finally:
        distributed.destroy()
    if not procenv.is_rank0():
        return 0
    if os.environ.get("HM_TRAIN_STATUS"):  # read by the Slurm job script (requeue or not)
        from hybrid_megatron.launch.status import write_train_status

        write_train_status(os.environ["HM_TRAIN_STATUS"], result, cfg.train.steps)
    if result.stopped_by:
        _print(
            f"stopped at step {result.iteration} ({result.stopped_by}); checkpoint "
            f"{result.last_checkpoint}. Run the same command to resume."
        )
    elif result.iteration >= cfg.train.steps and not procenv.is_own_worker():
        print_next_steps(cfg, Path(result.run_dir))
    return 0

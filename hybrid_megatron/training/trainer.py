"""The pretraining loop on Megatron-Core: schedules, DDP, (distributed) optimizer, checkpoints.

`train(cfg)` is what `hybrid-megatron train CONFIG` runs on every rank. Order of work:
cheap checks first (config, batch layout, data files, checkpoints to load), then the model,
then the loop. Every step: this rank's micro-batches -> Megatron forward-backward (no
pipelining, 1F1B or interleaved, chosen by the parallel state) -> optimizer step -> scheduler
step -> metrics; validation, checkpoints and signal-triggered stops at step boundaries.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state as ps

from hybrid_megatron import distributed, procenv
from hybrid_megatron.analysis.monitor import retrieval_monitor
from hybrid_megatron.checkpoint.layout import CheckpointInfo, iter_dir_name, resolve_checkpoint
from hybrid_megatron.checkpoint.retention import resume_point
from hybrid_megatron.checkpoint.training_state import (
    FAULT_ENV,
    TrainingProgress,
    load_training_checkpoint,
    load_weights_only,
    save_training_checkpoint,
)
from hybrid_megatron.config import (
    RunConfig,
    to_dict,
    validate_batch_layout,
    validate_data_source,
)
from hybrid_megatron.errors import ConfigError
from hybrid_megatron.model.build import build_model
from hybrid_megatron.model.transformer_config import build_transformer_config
from hybrid_megatron.training.data import batch_checksum, build_train_valid, micro_batches
from hybrid_megatron.training.optimizer import build_optimizer, build_scheduler
from hybrid_megatron.training.preflight import check_environment
from hybrid_megatron.training.run_dir import (
    check_checkpoint_model,
    check_init_weights,
    check_same_model,
    check_steps_not_below,
    has_checkpoint,
)
from hybrid_megatron.training.run_lock import RunLock
from hybrid_megatron.training.run_lock import acquire as acquire_run_lock
from hybrid_megatron.training.schedule import forward_backward, wrap_ddp
from hybrid_megatron.training.signals import StopRequest


@dataclass
class TrainResult:
    """What a `train` call did (returned on every rank; losses are global averages)."""

    run_dir: Path
    start_iteration: int
    iteration: int
    losses: dict[int, float] = field(default_factory=dict)
    valid_losses: dict[int, float] = field(default_factory=dict)
    stopped_by: str | None = None
    last_checkpoint: Path | None = None


def _log(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


# --------------------------------------------------------------------------- setup


def _precision(cfg: RunConfig, device: torch.device) -> bool:
    """True for bf16 training."""
    p = cfg.train.precision
    if p == "auto":
        return device.type == "cuda"
    if p == "bf16" and device.type != "cuda":
        raise ConfigError(
            "train.precision=bf16 needs a CUDA device; CPU training runs in fp32 "
            "(set train.precision: auto or fp32)."
        )
    return p == "bf16"


def build_model_chunks(cfg: RunConfig, device: torch.device, bf16: bool) -> list[torch.nn.Module]:
    """This rank's model chunks (one per virtual pipeline stage), before DDP wrapping."""
    compiled = cfg.compiled
    dtype = torch.bfloat16 if bf16 else torch.float32
    vpp = cfg.parallel.virtual_pipeline or 1
    chunks = []
    for vp_stage in range(vpp):
        tconfig = build_transformer_config(
            cfg, compiled, params_dtype=dtype, use_cpu_initialization=device.type == "cpu"
        )
        tconfig.bf16 = bf16
        tconfig.pipeline_dtype = dtype
        stage = vp_stage if vpp > 1 else None
        chunk = build_model(
            cfg,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage,
            params_dtype=dtype,
            device=device,
            compiled=compiled,
            tconfig=tconfig,
        )
        if bf16:
            from megatron.core.transformer.module import Float16Module

            chunk = Float16Module(tconfig, chunk)
        chunks.append(chunk)
    return chunks


def _write_run_config(cfg: RunConfig, run_dir: Path) -> None:
    if dist.get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _resume_point(cfg: RunConfig, ckpt_root: Path) -> CheckpointInfo | None:
    """Rank 0 picks the newest checkpoint that verifies (setting unusable newer ones aside)
    and tells every other rank."""
    found = [None]
    if dist.get_rank() == 0:
        info = resume_point(ckpt_root, cfg.checkpoint.checksums)
        found = [None if info is None else info.iteration]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(found, src=0)
    if found[0] is None:
        return None
    return CheckpointInfo(found[0], ckpt_root / iter_dir_name(found[0]))


# --------------------------------------------------------------------------- steps


def _global_loss(local: float | None, device: torch.device) -> float:
    """Average a last-stage loss over data-parallel ranks and share it with every rank."""
    value = torch.tensor([local if local is not None else 0.0], device=device, dtype=torch.float64)
    if dist.get_world_size() > 1:
        dist.all_reduce(value, group=ps.get_pipeline_model_parallel_group())  # only last stage != 0
        dist.all_reduce(value, group=ps.get_data_parallel_group())
        value /= ps.get_data_parallel_world_size()
    return float(value.item())


def _global_sum(x: int, device: torch.device) -> int:
    value = torch.tensor([x], device=device, dtype=torch.float64)
    if dist.get_world_size() > 1:
        dist.all_reduce(value, group=ps.get_data_parallel_group())
    return int(value.item())


def _run_batches(cfg, chunks, batches, num_micro, forward_only):
    iters = [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)
    return forward_backward(
        chunks,
        iters,
        num_microbatches=num_micro,
        seq_length=cfg.model.seq_length,
        micro_batch_size=cfg.train.micro_batch_size,
        forward_only=forward_only,
    )


def evaluate(cfg: RunConfig, chunks, valid_ds, num_micro: int, device: torch.device) -> float:
    """Mean loss over the first `train.eval_batches` global batches of the valid split."""
    for c in chunks:
        c.eval()
    losses = []
    with torch.no_grad():
        for b in range(cfg.train.eval_batches):
            batches = list(
                micro_batches(
                    valid_ds,
                    b * cfg.train.global_batch_size,
                    cfg.train.global_batch_size,
                    cfg.train.micro_batch_size,
                    device,
                )
            )
            losses.append(_global_loss(_run_batches(cfg, chunks, batches, num_micro, True), device))
    for c in chunks:
        c.train()
    return sum(losses) / len(losses)


# --------------------------------------------------------------------------- main entry


def train(cfg: RunConfig) -> TrainResult:
    """Run (or resume) the pretraining job described by `cfg` on this rank."""
    t = cfg.train
    cfg.validate()
    validate_data_source(cfg)
    check_environment(cfg, procenv.world_size())
    run_dir = cfg.resolved_run_dir
    ckpt_root = run_dir / "checkpoints"
    # Fail on a bad init checkpoint before any process group or data work.
    init_info = None
    if t.init_from and not (cfg.checkpoint.resume and has_checkpoint(ckpt_root)):
        init_info = resolve_checkpoint(t.init_from, cfg.checkpoint.checksums)
        check_init_weights(cfg, init_info)
    # Handlers first: a stop signal during start-up is honoured at the first step boundary.
    stop = StopRequest(enabled=cfg.checkpoint.save_on_signal)
    try:
        device = distributed.initialize(cfg.parallel, seed=t.seed, device=t.device)
        return _train(cfg, run_dir, ckpt_root, init_info, device, stop)
    finally:
        stop.restore()


def _lock_run_dir(run_dir: Path) -> RunLock | None:
    """Rank 0 locks the run dir for this job before any rank writes; every rank learns
    whether it could (a held lock is a ConfigError on all of them)."""
    lock, error = None, [None]
    if dist.get_rank() == 0:
        try:
            lock = acquire_run_lock(run_dir)
        except ConfigError as e:
            error = [str(e)]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise ConfigError(error[0])
    return lock


def _train(cfg, run_dir, ckpt_root, init_info, device, stop: StopRequest) -> TrainResult:
    num_micro = validate_batch_layout(cfg, dist.get_world_size())
    check_same_model(cfg, run_dir)
    bf16 = _precision(cfg, device)
    lock = _lock_run_dir(run_dir)
    try:
        return _train_locked(cfg, run_dir, ckpt_root, init_info, device, stop, num_micro, bf16)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(
    cfg, run_dir, ckpt_root, init_info, device, stop: StopRequest, num_micro: int, bf16: bool
) -> TrainResult:
    t = cfg.train
    resume = _resume_point(cfg, ckpt_root) if cfg.checkpoint.resume else None
    if resume is not None:
        check_checkpoint_model(cfg, resume)
        check_steps_not_below(cfg, resume.iteration)
    _log("building datasets")
    datasets = build_train_valid(cfg, run_dir)
    _write_run_config(cfg, run_dir)

    _log(f"building the model on {dist.get_world_size()} rank(s)")
    chunks = build_model_chunks(cfg, device, bf16)
    chunks = wrap_ddp(chunks, chunks[0].config, use_distributed_optimizer=cfg.optimizer.distributed)
    optimizer = build_optimizer(cfg, chunks, bf16)
    scheduler = build_scheduler(cfg, optimizer)

    progress = TrainingProgress()
    if resume is not None:
        progress = load_training_checkpoint(cfg, resume, chunks, optimizer, scheduler)
        _log(
            f"resumed from {resume.path} (step {progress.iteration}, "
            f"{progress.consumed_samples} samples consumed)"
        )
    elif init_info is not None:
        load_weights_only(init_info, chunks)
        optimizer.reload_model_params()
        _log(
            f"initialised weights from {init_info.path} (step {init_info.iteration}); "
            "optimizer, schedule and data start fresh"
        )

    result = TrainResult(
        run_dir=run_dir, start_iteration=progress.iteration, iteration=progress.iteration
    )
    log = _StepLogger(cfg, run_dir, device, bf16, progress.iteration)
    monitor = retrieval_monitor(cfg, run_dir, chunks, device)
    tokens_per_step = t.global_batch_size * cfg.model.seq_length
    steps_this_run = 0
    if progress.iteration < t.steps:
        _log(
            f"training from step {progress.iteration + 1} to {t.steps} (a line every "
            f"{t.log_interval} steps)"
        )
    slow_down = _fault_step_delay()
    try:
        while progress.iteration < t.steps:
            step_start = time.perf_counter()
            batches = list(
                micro_batches(
                    datasets.train,
                    progress.consumed_samples,
                    t.global_batch_size,
                    t.micro_batch_size,
                    device,
                )
            )
            for c in chunks:
                c.zero_grad_buffer()
            optimizer.zero_grad()
            local_loss = _run_batches(cfg, chunks, batches, num_micro, False)
            ok, grad_norm, _ = optimizer.step()
            scheduler.step(increment=1)
            progress.iteration += 1
            progress.consumed_samples += t.global_batch_size
            steps_this_run += 1
            loss = _global_loss(local_loss, device)
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss} at step {progress.iteration}; lower optimizer.lr or check "
                    "the data. The last complete checkpoint is untouched."
                )
            checksum = _global_sum(batch_checksum(batches), device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            result.losses[progress.iteration] = loss
            log.step(
                progress,
                loss,
                optimizer.param_groups[0]["lr"],
                grad_norm,
                time.perf_counter() - step_start,
                tokens_per_step,
                checksum,
            )

            if slow_down:
                time.sleep(slow_down)
            last = progress.iteration == t.steps
            if (t.eval_interval and progress.iteration % t.eval_interval == 0) or last:
                vloss = evaluate(cfg, chunks, datasets.valid, num_micro, device)
                result.valid_losses[progress.iteration] = vloss
                log.valid(progress.iteration, vloss)
            if monitor is not None:
                monitor.maybe_log(progress.iteration, log.writer)
            stopping = stop.agreed(device)
            exit_now = t.exit_after_steps is not None and steps_this_run >= t.exit_after_steps
            periodic = cfg.checkpoint.interval and progress.iteration % cfg.checkpoint.interval == 0
            if periodic or last or stopping or exit_now:
                result.last_checkpoint = save_training_checkpoint(
                    cfg,
                    ckpt_root,
                    chunks,
                    optimizer,
                    scheduler,
                    progress,
                    protect=[resume.path] if resume else [],
                )
                _log(f"saved checkpoint {result.last_checkpoint}")
                stopping = stopping or stop.agreed(device)  # a signal during the save
            if stopping or exit_now:
                result.stopped_by = stop.name if stopping else "exit_after_steps"
                _log(
                    f"stopping at step {progress.iteration} ({result.stopped_by}); run the same "
                    "command again to resume"
                )
                break
    finally:
        log.close()
    result.iteration = progress.iteration
    return result


def _fault_step_delay() -> float:
    """Testing hook: HYBRID_MEGATRON_FAULT=slow_steps:SECONDS sleeps after every step (keeps a
    tiny run alive past a Slurm time-limit warning without burning CPU)."""
    fault = os.environ.get(FAULT_ENV, "")
    return float(fault.split(":", 1)[1]) if fault.startswith("slow_steps:") else 0.0


class _StepLogger:
    """Per-step console line + metrics rows (rank 0)."""

    def __init__(self, cfg, run_dir, device, bf16, start_step) -> None:
        from hybrid_megatron.training.flops import model_flops_per_sequence, peak_flops_per_device
        from hybrid_megatron.training.metrics import MetricsWriter
        from hybrid_megatron.training.progress import ThroughputMeter

        self.cfg = cfg
        self.rank0 = dist.get_rank() == 0
        self.writer = MetricsWriter(run_dir, enabled=self.rank0)
        if self.rank0:
            self.writer.truncate_after(start_step)
        self.meter = ThroughputMeter()
        self.flops_per_step = (
            model_flops_per_sequence(cfg, cfg.model.seq_length, training=True)
            * cfg.train.global_batch_size
        )
        self.peak = peak_flops_per_device(device, torch.bfloat16 if bf16 else torch.float32)
        self.world = dist.get_world_size()
        self.device = device
        self.start = time.perf_counter()

    def step(self, progress, loss, lr, grad_norm, seconds, tokens, checksum) -> None:
        from hybrid_megatron.training.flops import mfu
        from hybrid_megatron.training.metrics import memory_gb

        self.meter.update(tokens, seconds)
        tok_s = self.meter.tokens_per_s or tokens / seconds
        flops_per_device = self.flops_per_step / max(seconds, 1e-9) / self.world
        if self.meter.tokens_per_s:
            flops_per_device = self.flops_per_step * tok_s / tokens / self.world
        row = dict(
            consumed_samples=progress.consumed_samples,
            tokens=progress.consumed_samples * self.cfg.model.seq_length,
            loss=loss,
            lr=lr,
            grad_norm=None if grad_norm is None else float(grad_norm),
            tokens_per_s=tok_s,
            tflops_per_device=flops_per_device / 1e12,
            mfu=mfu(flops_per_device, self.peak),
            mem_gb=memory_gb(self.device),
            elapsed_s=time.perf_counter() - self.start,
            step_s=seconds,
            data_checksum=checksum,
        )
        self.writer.log_train(progress.iteration, **row)
        t = self.cfg.train
        if self.rank0 and (
            progress.iteration % t.log_interval == 0 or progress.iteration == t.steps
        ):
            from hybrid_megatron.training.progress import eta, format_step_line

            print(
                format_step_line(
                    step=progress.iteration,
                    total_steps=t.steps,
                    loss=loss,
                    lr=lr,
                    grad_norm=row["grad_norm"],
                    tokens_per_s=tok_s,
                    tflops_per_device=row["tflops_per_device"],
                    mfu=row["mfu"],
                    mem_gb=row["mem_gb"],
                    eta_s=eta(progress.iteration, t.steps, self.meter.seconds_per_step or seconds),
                ),
                flush=True,
            )

    def valid(self, step, loss) -> None:
        self.writer.log_valid(step, loss)
        _log(f"validation at step {step}: loss {loss:.4f} ppl {math.exp(min(loss, 700)):.2f}")

    def close(self) -> None:
        self.writer.close()


def validation_loss(cfg: RunConfig, checkpoint: str | Path) -> float:
    """Validation loss of a checkpoint's weights under `cfg`'s parallel layout (collective)."""
    info = resolve_checkpoint(checkpoint, cfg.checkpoint.checksums)
    device = distributed.initialize(cfg.parallel, seed=cfg.train.seed, device=cfg.train.device)
    num_micro = validate_batch_layout(cfg, dist.get_world_size())
    bf16 = _precision(cfg, device)
    datasets = build_train_valid(cfg, cfg.resolved_run_dir)
    chunks = build_model_chunks(cfg, device, bf16)
    load_weights_only(info, chunks)
    return evaluate(cfg, chunks, datasets.valid, num_micro, device)

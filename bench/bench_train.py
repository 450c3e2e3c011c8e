"""Benchmark: tokens/s of the real training loop vs a bare forward-backward of the same model.

Usage: python bench/bench_train.py [--config configs/tiny.yaml] [--rounds 3] [--steps 4]
                                   [--set KEY=VALUE ...] [--device auto|cpu|cuda]

One process, one device (CUDA if available, else CPU). Measured in one run, side by side, at
the same batch shape (global batch, micro-batch, sequence length):
  loop         `hybrid_megatron.training.trainer.train` on a temporary run dir
               (checkpoint.interval=0, validation only at the end, LR warmup 0); per-step
               seconds from RUN_DIR/metrics.jsonl (`step_s`: data, forward-backward,
               optimizer, scheduler, loss/checksum reductions).
  loop (wall)  the time between consecutive metrics rows: also counts per-step logging
               (metrics.jsonl, TensorBoard, console).
  bare         `training.schedule.forward_backward` on random tokens; model from
               `trainer.build_model_chunks`, wrapped with `schedule.wrap_ddp`; no optimizer.
  bare+opt     the same plus the Megatron optimizer.step() the loop uses.
Rounds: bare block, loop block, bare block, loop block, ... Each loop block is one `train`
call that stops after `--warmup + --steps` steps (train.exit_after_steps) and the next one
resumes from its checkpoint; the bare variants alternate step by step. Interleaving keeps
load from other work on a shared machine from landing on one side only. The first `--warmup`
steps of every loop block (and of the first bare block) are left out. Rates use the median
step; means are in the JSON too. Ratios below 1 mean the loop is slower. On a GPU the figures
include TFLOP/s per device and MFU (set HM_PEAK_TFLOPS for a GPU the peak table does not
know); `loop_reported` averages the loop's own metrics rows (tokens_per_s, tflops_per_device,
mfu). Prints a table, then a JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybrid_megatron.cli import _quiet_third_party_warnings

_quiet_third_party_warnings()  # before Megatron's import-time warnings

from hybrid_megatron import distributed  # noqa: E402
from hybrid_megatron.config import load_config, validate_batch_layout  # noqa: E402
from hybrid_megatron.training.flops import (  # noqa: E402
    model_flops_per_sequence,
    peak_flops_per_device,
)
from hybrid_megatron.training.metrics import read_metrics  # noqa: E402
from hybrid_megatron.training.optimizer import build_optimizer  # noqa: E402
from hybrid_megatron.training.schedule import forward_backward, wrap_ddp  # noqa: E402
from hybrid_megatron.training.trainer import (  # noqa: E402
    _precision,
    build_model_chunks,
    train,
)

REPO = Path(__file__).resolve().parents[1]
REPORTED = ("tokens_per_s", "tflops_per_device", "mfu")  # the loop's own per-row figures


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    ap.add_argument("--rounds", type=int, default=3, help="bare/loop rounds")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant and round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per loop block")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        ap.error("--rounds and --steps must be >= 1, --warmup >= 0")
    return args


# --------------------------------------------------------------------------- the real loop


def summarize(times: list[float], tokens: int, flops_per_token: float, peak) -> dict:
    """Figures of one variant from its per-step seconds. Rates use the median step, which
    shrugs off steps slowed by other work on a shared machine; `tokens_per_s_mean` does not."""
    med = statistics.median(times)
    return {
        "steps_timed": len(times),
        "step_s_median": med,
        "tokens_per_s": tokens / med,
        "tokens_per_s_mean": tokens * len(times) / sum(times),
        "tflops_per_device": tokens * flops_per_token / med / 1e12,
        "mfu": tokens * flops_per_token / med / peak if peak else None,
    }


def mean_of(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(vals) if vals else None


def run_loop_block(cfg, run_dir: Path, warmup: int) -> tuple[list[float], list[float], list]:
    """One `train` call (resumes, runs train.exit_after_steps steps, checkpoints, stops).

    Returns its per-step seconds after `warmup` from metrics.jsonl: the loop's step timer
    (`step_s`) and the wall time between consecutive rows (also counts logging), plus the
    timed rows themselves."""

    def train_rows() -> list[dict]:
        if not (run_dir / "metrics.jsonl").exists():
            return []
        return [r for r in read_metrics(run_dir) if r["split"] == "train"]

    done = len(train_rows())
    train(cfg)
    rows = train_rows()[done:]
    elapsed = [0.0] + [r["elapsed_s"] for r in rows]  # seconds since this call's logger began
    wall = [elapsed[i + 1] - elapsed[i] for i in range(warmup, len(rows))]
    timed = rows[warmup:]
    return [r["step_s"] for r in timed], wall, timed


# --------------------------------------------------------------------------- bare steps


class Bare:
    """The same model and batch shape as the loop, stepped on random tokens."""

    def __init__(self, cfg, device: torch.device):
        self.cfg, self.device = cfg, device
        bf16 = _precision(cfg, device)
        chunks = build_model_chunks(cfg, device, bf16)
        self.chunks = wrap_ddp(
            chunks, chunks[0].config, use_distributed_optimizer=cfg.optimizer.distributed
        )
        self.optimizer = build_optimizer(cfg, self.chunks, bf16)
        self.num_micro = validate_batch_layout(cfg, 1)
        s, mb = cfg.model.seq_length, cfg.train.micro_batch_size
        gen = torch.Generator().manual_seed(0)
        self.batches = []
        for _ in range(self.num_micro):
            x = torch.randint(0, cfg.model.vocab_size, (mb, s + 1), generator=gen).to(device)
            self.batches.append(
                dict(
                    tokens=x[:, :-1],
                    labels=x[:, 1:],
                    loss_mask=torch.ones(mb, s, device=device),
                    position_ids=torch.arange(s, device=device).expand(mb, -1),
                )
            )
        self.times: dict[str, list[float]] = {"bare": [], "bare+opt": []}

    def step(self, variant: str, record: bool = True) -> None:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for c in self.chunks:
            c.zero_grad_buffer()
        if variant == "bare+opt":
            self.optimizer.zero_grad()
        iters = iter(self.batches)
        if len(self.chunks) > 1:  # virtual pipeline: one iterator per chunk
            iters = [iter(self.batches) for _ in self.chunks]
        forward_backward(
            self.chunks,
            iters,
            num_microbatches=self.num_micro,
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size,
        )
        if variant == "bare+opt":
            self.optimizer.step()
        sync()
        if record:
            self.times[variant].append(time.perf_counter() - t0)

    def run(self, steps: int, warmup: int) -> None:
        """`warmup` untimed steps of each variant, then `steps` of each, alternating."""
        for i in range(warmup + steps):
            for variant in self.times:
                self.step(variant, record=i >= warmup)


# --------------------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    block = args.warmup + args.steps
    loop_s, loop_wall, loop_rows = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        run_dir = Path(tmp) / "run"
        overrides = [
            "checkpoint.interval=0",  # checkpoints only where a loop block stops
            "train.eval_interval=0",  # validation only at the very end
            "train.log_interval=1000000",  # keep the console quiet
            "optimizer.warmup_steps=0",  # LR warmup must fit in a short run; speed unchanged
            *args.set,  # the user's overrides win over the defaults above
            f"train.steps={args.rounds * block}",
            f"train.exit_after_steps={block}",
            f"run_dir={run_dir}",
            f"train.device={args.device}",
        ]
        cfg = load_config(args.config, overrides)
        cfg.validate(world_size=1)
        device = distributed.initialize(cfg.parallel, seed=cfg.train.seed, device=args.device)
        t0 = time.perf_counter()
        bare = Bare(cfg, device)
        for r in range(args.rounds):
            bare.run(args.steps, warmup=args.warmup if r == 0 else 0)
            step_s, wall, rows = run_loop_block(cfg, run_dir, args.warmup)
            loop_s += step_s
            loop_wall += wall
            loop_rows += rows
            print(f"round {r + 1}/{args.rounds} done ({time.perf_counter() - t0:.0f} s)")
        distributed.destroy()

    bf16 = _precision(cfg, device)
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    seq = cfg.model.seq_length
    flops_per_token = model_flops_per_sequence(cfg, seq, training=True) / seq
    peak = peak_flops_per_device(device, torch.bfloat16 if bf16 else torch.float32)
    figures = {"loop": loop_s, "loop (wall)": loop_wall, **bare.times}
    result = {
        "config": args.config,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "dtype": "bf16" if bf16 else "fp32",
        "tokens_per_step": tokens,
        **{k: summarize(v, tokens, flops_per_token, peak) for k, v in figures.items() if v},
        "loop_reported": {k: mean_of(loop_rows, k) for k in REPORTED},
    }
    tps = {k: result[k]["tokens_per_s"] for k in figures if k in result}
    result["ratio_loop_vs_bare"] = tps["loop"] / tps["bare"]
    result["ratio_loop_vs_bare_opt"] = tps["loop"] / tps["bare+opt"]
    if "loop (wall)" in tps:
        result["ratio_loop_wall_vs_bare_opt"] = tps["loop (wall)"] / tps["bare+opt"]

    print(
        f"\n{args.config} on {result['device']} ({result['dtype']}, "
        f"{result['threads']} threads), {tokens} tokens/step; rates from the median step"
    )
    print(f"{'variant':<12} {'steps':>5} {'median s':>9} {'tokens/s':>10} {'TFLOP/s':>8}  MFU")
    for name in tps:
        r = result[name]
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        print(
            f"{name:<12} {r['steps_timed']:>5} {r['step_s_median']:>9.3f} "
            f"{r['tokens_per_s']:>10,.0f} {r['tflops_per_device']:>8.3f}  {mfu}"
        )
    print(
        f"ratio loop / bare fwd-bwd: {result['ratio_loop_vs_bare']:.3f}   "
        f"loop / bare+optimizer: {result['ratio_loop_vs_bare_opt']:.3f}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Benchmark: context-parallel traffic per layer type, and CP=2 vs CP=1 step time on CPU.

Usage: python bench/bench_cp_volume.py [--cp 2 4] [--seq 8192 32768] [--window 128]
                                       [--time-config configs/tiny_base.yaml] [--no-time]

Volume (gloo, CP processes per CP size): one forward+backward of each layer type's CP path
on this rank's shard, inside `context_parallel.comm.record_volume()`, which counts the
elements each rank sends (max over ranks, forward + backward). Head sizes are small (one KV
head of dim 64, batch 1; Mamba 4 heads x 16 x state 16, 1 group, conv 4): scale by your
model's KV heads x head dim (attention) or heads x head dim x state (Mamba) per TP rank.
  full attention   K/V all-gather (forward) + dK/dV reduce-scatter (backward)
  swa halo         our point-to-point halo of W-1 tokens per chunk
  swa all-gather   the same layer through the all-gather path (what TE's all_gather CP
                   sends): the baseline of the ratio
  mamba2           conv halo + all-gather of the chunk states (+ their gradients)
Attention volumes do not depend on the kernel, so a cheap differentiable stand-in replaces
the local kernel there (exactness is tested in tests/test_context_parallel*.py); Mamba runs
the real chunked SSD. Each figure is checked against `context_parallel.plan.sent_per_layer`.

Step time: the model of --time-config (seq --time-seq) forward+backward with one thread per
process, CP=1 in one process then CP=2 in two, alternating for --rounds; median seconds per
step and the ratio CP=2 / CP=1 (wall time of one step of the same global batch). Prints a
table, then a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KV_HEADS, HEAD_DIM = 1, 64
MAMBA = dict(heads=4, head_dim=16, state=16, groups=1, conv=4)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--seq", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--time-config", default=str(REPO / "configs" / "tiny_base.yaml"))
    ap.add_argument("--time-seq", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-time", action="store_true", help="volumes only")
    return ap.parse_args()


# --------------------------------------------------------------------------- processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, queue):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    try:
        queue.put((rank, fn(*args)))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, world: int, *args) -> list:
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, fn, args, queue)) for r in range(world)
    ]
    for p in procs:
        p.start()
    out = dict(queue.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    return [out[r] for r in range(world)]


# --------------------------------------------------------------------------- volume
def _stand_in(q, k, v, window):
    """Differentiable, O(n): touches every K/V row it is given (volume only)."""
    return q * (k.mean(dim=2, keepdim=True) + v.mean(dim=2, keepdim=True)).repeat_interleave(
        q.shape[1] // k.shape[1], dim=1
    )


def _volumes(seqs: list[int], window: int) -> dict:
    import torch.distributed as dist

    from hybrid_megatron.context_parallel.attention import context_parallel_attention
    from hybrid_megatron.context_parallel.comm import gather_sequence, record_volume
    from hybrid_megatron.context_parallel.mamba import context_parallel_conv, context_parallel_ssd
    from hybrid_megatron.kernels.mamba_ops import causal_conv1d
    from hybrid_megatron.kernels.ssd import ssd_chunk_scan

    dist.init_process_group("gloo")
    group, cp = dist.group.WORLD, dist.get_world_size()
    m = MAMBA
    results = {}
    for seq in seqs:
        local = seq // cp
        q = torch.randn(1, KV_HEADS, local, HEAD_DIM, requires_grad=True)
        k, v = (torch.randn(1, KV_HEADS, local, HEAD_DIM, requires_grad=True) for _ in range(2))
        row = {}
        for name, window_ in (("full attention", None), ("swa halo", window)):
            with record_volume() as sent:
                context_parallel_attention(q, k, v, window_, group, _stand_in).sum().backward()
            row[name] = sum(sent.values())
        with record_volume() as sent:  # the all-gather baseline for the same SWA layer
            full = gather_sequence(torch.stack([k, v]), 3, group, tag="swa_all_gather")
            full.sum().backward()
        row["swa all-gather"] = sum(sent.values())
        h, p, n, g, w = m["heads"], m["head_dim"], m["state"], m["groups"], m["conv"]
        x = torch.randn(1, local, h, p, requires_grad=True)
        dt = torch.randn(1, local, h, requires_grad=True)
        B, C = (torch.randn(1, local, g, n, requires_grad=True) for _ in range(2))
        xBC = torch.randn(1, local, h * p + 2 * g * n, requires_grad=True)
        weight = torch.randn(h * p + 2 * g * n, w)
        with record_volume() as sent:
            y = context_parallel_ssd(
                ssd_chunk_scan,
                x,
                dt,
                -torch.rand(h),
                B,
                C,
                64,
                torch.ones(h),
                torch.zeros(h),
                group,
            )
            conv = context_parallel_conv(
                xBC,
                lambda t, s, wt=weight: causal_conv1d(t, wt, None, "silu", initial_state=s),
                w,
                group,
            )
            (y.sum() + conv.sum()).backward()
        row["mamba2"] = sum(sent.values())
        results[seq] = row
    return results


def _expected(cp: int, seq: int, window: int) -> dict:
    """The traffic model (plan.sent_per_layer) for the bench's shapes, forward + backward."""
    from hybrid_megatron.config import ModelConfig, ParallelConfig, from_dict
    from hybrid_megatron.context_parallel.plan import sent_per_layer

    m = MAMBA
    model = from_dict(ModelConfig, dict(
        pattern="MS*", hidden_size=m["heads"] * m["head_dim"] // 2, num_attention_heads=1,
        num_query_groups=1, kv_channels=HEAD_DIM, vocab_size=8, seq_length=seq,
        swa={"window": window}, mamba={"state_dim": m["state"], "head_dim": m["head_dim"],
        "num_groups": m["groups"], "expand": 2, "conv_kernel": m["conv"]},
    ))  # fmt: skip
    vol = sent_per_layer(model, ParallelConfig(context=cp))
    return {
        "full attention": 2 * vol["full attention"],
        "swa halo": 2 * vol["sliding window"],
        "swa all-gather": 2 * vol["sliding window (all-gather)"],
        "mamba2": 2 * vol["mamba2"],
    }


# --------------------------------------------------------------------------- step time
def _step_times(config: str, seq: int, cp: int, steps: int) -> list[float]:
    from hybrid_megatron.cli import _quiet_third_party_warnings

    _quiet_third_party_warnings()
    from megatron.core import parallel_state as ps

    from hybrid_megatron import distributed
    from hybrid_megatron.config import load_config
    from hybrid_megatron.model.build import build_model
    from hybrid_megatron.training.schedule import forward_backward, wrap_ddp

    cfg = load_config(config, [f"model.seq_length={seq}", f"parallel.context={cp}"])
    cfg.validate(world_size=cp)
    distributed.initialize(cfg.parallel, device="cpu")
    model = build_model(cfg, pre_process=ps.is_pipeline_first_stage(), post_process=True)
    ddp = wrap_ddp([model], model.config)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.model.vocab_size, (1, seq + 1), generator=gen)
    batch = dict(
        tokens=x[:, :-1], labels=x[:, 1:], loss_mask=torch.ones(1, seq),
        position_ids=torch.arange(seq)[None],
    )  # fmt: skip
    times = []
    for _ in range(steps + 1):  # the first step warms up
        ddp[0].zero_grad_buffer()
        t0 = time.perf_counter()
        forward_backward(ddp, iter([dict(batch)]), 1, seq, 1)
        times.append(time.perf_counter() - t0)
    distributed.destroy()
    return times[1:]


def main() -> None:
    args = parse_args()
    report: dict = {"window": args.window, "volume": {}, "step_time": None}
    print(f"elements sent per rank per layer and sequence (forward + backward), W={args.window}")
    print(f"{'cp':>3} {'seq':>6} {'full attn':>12} {'swa halo':>10} {'swa all-gather':>15} "
          f"{'halo/gather':>12} {'mamba2':>9}")  # fmt: skip
    for cp in args.cp:
        per_rank = spawn(_volumes, cp, args.seq, args.window)
        for seq in args.seq:
            row = {k: max(r[seq][k] for r in per_rank) for k in per_rank[0][seq]}
            expected = _expected(cp, seq, args.window)
            assert row == expected, f"measured {row} != traffic model {expected} (cp={cp})"
            ratio = row["swa halo"] / row["swa all-gather"]
            report["volume"][f"cp{cp}_seq{seq}"] = {**row, "halo_over_all_gather": ratio}
            print(f"{cp:>3} {seq:>6} {row['full attention']:>12,} {row['swa halo']:>10,} "
                  f"{row['swa all-gather']:>15,} {ratio:>12.4f} {row['mamba2']:>9,}")  # fmt: skip
    print("(every figure equals context_parallel.plan.sent_per_layer)")
    if not args.no_time:
        cp1, cp2 = [], []
        for _ in range(args.rounds):
            cp1 += spawn(_step_times, 1, args.time_config, args.time_seq, 1, args.steps)[0]
            cp2 += spawn(_step_times, 2, args.time_config, args.time_seq, 2, args.steps)[0]
        a, b = statistics.median(cp1), statistics.median(cp2)
        report["step_time"] = {"cp1_s": a, "cp2_s": b, "cp2_over_cp1": b / a, "seq": args.time_seq}
        print(f"step time (seq {args.time_seq}, CPU, 1 thread per process): CP=1 {a:.3f} s, "
              f"CP=2 {b:.3f} s, ratio CP=2/CP=1 {b / a:.2f}")  # fmt: skip
    print(json.dumps(report))


if __name__ == "__main__":
    main()

"""Benchmark: chunked SSD (torch) vs the sequential scan, optionally vs mamba_ssm on CUDA.

Usage: python bench/bench_ssd.py [--seq 4096] [--device cpu|cuda] [--chunk 128] ...
Forward only. Prints per-impl median times, the ratio sequential/chunked, and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybrid_megatron.kernels.ssd import (
    mamba_backend_available,
    ssd_chunk_scan,
    ssd_sequential_reference,
)


def time_fn(fn, device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """(median, min) wall time in seconds of ``fn()`` after ``warmup`` calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--dstate", type=int, default=64)
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seq-repeats", type=int, default=3, help="repeats for the slow scan")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    b, l, h, p, g, n = args.batch, args.seq, args.heads, args.headdim, args.groups, args.dstate

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    x = rnd(b, l, h, p)
    dt = (torch.rand(b, l, h, generator=gen) * 0.1 + 0.001).to(device)
    A = -(torch.rand(h, generator=gen) * 2 + 0.5).to(device)
    B, C = rnd(b, l, g, n, scale=0.3), rnd(b, l, g, n, scale=0.3)
    D = rnd(h)

    def chunked() -> torch.Tensor:
        return ssd_chunk_scan(x, dt, A, B, C, args.chunk, D=D)

    def sequential() -> torch.Tensor:
        return ssd_sequential_reference(x, dt, A, B, C, args.chunk, D=D)

    res: dict[str, object] = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "shape": {"b": b, "l": l, "h": h, "p": p, "g": g, "n": n, "chunk": args.chunk},
    }
    t_chunk, t_chunk_min = time_fn(chunked, device, args.warmup, args.repeats)
    t_seq, t_seq_min = time_fn(sequential, device, 1, args.seq_repeats)
    y_chunk, y_seq = chunked(), sequential()
    res.update(
        chunked_ms=t_chunk * 1e3,
        sequential_ms=t_seq * 1e3,
        speedup_seq_over_chunked=t_seq / t_chunk,
        chunked_min_ms=t_chunk_min * 1e3,
        sequential_min_ms=t_seq_min * 1e3,
        max_abs_diff_chunked_vs_seq=(y_chunk - y_seq).abs().max().item(),
    )
    print(f"chunked SSD (torch):  {t_chunk * 1e3:10.2f} ms median ({t_chunk_min * 1e3:.2f} min)")
    print(f"sequential scan:      {t_seq * 1e3:10.2f} ms median ({t_seq_min * 1e3:.2f} min)")
    print(f"sequential/chunked:   {t_seq / t_chunk:10.1f} x")

    if device.type == "cuda" and mamba_backend_available():
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        def mamba() -> torch.Tensor:
            return mamba_chunk_scan_combined(x, dt, A, B, C, args.chunk, D=D)

        t_mamba, _ = time_fn(mamba, device, args.warmup, args.repeats)
        diff = (mamba().float() - y_chunk.float()).abs().max().item()
        res.update(mamba_ssm_ms=t_mamba * 1e3, max_abs_diff_torch_vs_mamba_ssm=diff)
        print(f"mamba_ssm kernel:     {t_mamba * 1e3:10.2f} ms  (max |torch - mamba| = {diff:.3e})")
    print(json.dumps(res))


if __name__ == "__main__":
    main()

"""Benchmark SWA attention: compiled flex vs SDPA with a dense boolean mask (and flash-attn on GPU).

Forward only. Flex is warmed up first, so its compile time is reported separately and not
included in the timings. Usage::

    python bench/bench_attention.py                           # CPU, fp32, seq 4096 and 16384
    python bench/bench_attention.py --device cuda --dtype bf16

Ends with one JSON line holding all results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def timed(fn: Callable[[], torch.Tensor], device: torch.device, iters: int) -> float:
    """Median wall time of ``fn`` in seconds (after one warm-up call)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(err)


def bench_length(args: argparse.Namespace, seq: int, attn: Any) -> dict[str, Any]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, args.heads, seq, args.head_dim)
    q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(3))
    w = args.window
    res: dict[str, Any] = {"seq": seq}

    def flex() -> torch.Tensor:
        return attn.attention(q, k, v, window=w, backend="flex", flex_eager=False)

    start = time.perf_counter()
    out_flex = flex()  # compiles (cached on disk by inductor after the first run)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    res["flex_first_call_s"] = time.perf_counter() - start
    res["flex_s"] = timed(flex, device, args.iters)

    out_sdpa = None
    try:
        mask = attn.sdpa_mask(seq, seq, w, device)  # dense [seq, seq] bools, built once

        def sdpa() -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        out_sdpa = sdpa()
        res["sdpa_s"] = timed(sdpa, device, max(1, args.iters // 2))
        res["sdpa_over_flex"] = res["sdpa_s"] / res["flex_s"]
        res["max_abs_diff_flex_sdpa"] = (out_flex - out_sdpa).abs().max().item()
    except (RuntimeError, MemoryError) as err:
        if not is_oom(err):
            raise
        res["sdpa_s"] = None
        res["sdpa_error"] = f"OOM: {str(err).splitlines()[0][:200]}"
        mask = None
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if attn.available_backends()["flash_attn"] and device.type == "cuda" and dtype != torch.float32:

        def flash() -> torch.Tensor:
            return attn.attention(q, k, v, window=w, backend="flash_attn")

        out_flash = flash()
        res["flash_attn_s"] = timed(flash, device, args.iters)
        res["max_abs_diff_flex_flash"] = (out_flex - out_flash).abs().max().item()
        if out_sdpa is not None:
            res["max_abs_diff_sdpa_flash"] = (out_sdpa - out_flash).abs().max().item()
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--seqs", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=6)
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout
    from hybrid_megatron.kernels import attention as attn

    header = (
        f"SWA W={args.window} b={args.batch} h={args.heads} d={args.head_dim} "
        f"device={args.device} dtype={args.dtype} torch={torch.__version__} "
        f"threads={torch.get_num_threads()}"
    )
    print(header)
    results = []
    with torch.no_grad():
        for seq in args.seqs:
            r = bench_length(args, seq, attn)
            results.append(r)
            line = f"seq={seq:6d}  flex={r['flex_s'] * 1e3:9.2f} ms"
            line += f" (first call {r['flex_first_call_s']:.1f} s)"
            if r["sdpa_s"] is not None:
                line += f"  sdpa(dense mask)={r['sdpa_s'] * 1e3:9.2f} ms"
                line += f"  sdpa/flex={r['sdpa_over_flex']:.2f}x"
                line += f"  max|flex-sdpa|={r['max_abs_diff_flex_sdpa']:.2e}"
            else:
                line += f"  sdpa: {r['sdpa_error']}"
            if "flash_attn_s" in r:
                line += f"  flash_attn={r['flash_attn_s'] * 1e3:.2f} ms"
                line += f"  max|flex-flash|={r['max_abs_diff_flex_flash']:.2e}"
                if "max_abs_diff_sdpa_flash" in r:
                    line += f"  max|sdpa-flash|={r['max_abs_diff_sdpa_flash']:.2e}"
            print(line, flush=True)
    summary: dict[str, Any] = {"config": vars(args), "torch": torch.__version__}
    summary["results"] = results
    if len(results) >= 2:
        first, last = results[0], results[-1]
        scale = last["flex_s"] / first["flex_s"]
        summary["flex_time_ratio"] = {f"{last['seq']}/{first['seq']}": scale}
        print(
            f"flex time({last['seq']})/time({first['seq']}) = {scale:.2f}x "
            f"(sequence ratio {last['seq'] / first['seq']:.0f}x; linear scaling expected)"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

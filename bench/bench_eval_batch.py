"""Benchmark: batched (left-padded, length-sorted) vs one-by-one generation in `eval`.

Usage: python bench/bench_eval_batch.py [--model PATH] [--config configs/tiny.yaml]
           [--task niah_single_1] [--length 4096] [--samples 8] [--batch-size 8] [--repeats 3]

RULER prompts fitted per sample to one target length differ by a few tokens, so batches of
equal-length prompts are mostly of size 1; left padding lets them share a batch. This times
the runner's `greedy_generate` at batch 1 and at --batch-size on the same prompts, interleaved
(--repeats rounds, medians), checks that both give identical texts, and prints samples/s and
their ratio, then one JSON line. Without --model: --config's architecture, random weights.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_eval import random_model  # noqa: E402

from hybrid_megatron.eval.generation import greedy_generate  # noqa: E402
from hybrid_megatron.eval.models import load_eval_model  # noqa: E402
from hybrid_megatron.eval.tasks import generate_samples  # noqa: E402


def run(model, tok, prompts, budgets, batch_size) -> tuple[float, dict[int, str]]:
    start = time.perf_counter()
    texts = {g.index: g.text for b in greedy_generate(model, tok, prompts, budgets, batch_size)
             for g in b}  # fmt: skip
    return time.perf_counter() - start, texts


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", help="HF dir or Megatron checkpoint (default: random weights)")
    ap.add_argument("--config", default="configs/tiny.yaml", help="architecture without --model")
    ap.add_argument("--task", default="niah_single_1")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    if args.model:
        model, tok, info = load_eval_model(args.model, args.device)
        name = info.name
    else:
        model, tok = random_model(args.config, None)
        model.to(args.device)
        name = f"{Path(args.config).stem} (random weights)"
    samples = generate_samples(args.task, tok, args.length, args.samples)
    prompts = [tok.encode(s.prompt) for s in samples]
    budgets = [args.max_new_tokens] * len(prompts)
    lengths = sorted(len(p) for p in prompts)
    print(
        f"model: {name}, {torch.get_num_threads()} threads; {args.task} at {args.length}: "
        f"{len(prompts)} prompts of {lengths[0]}..{lengths[-1]} tokens "
        f"({len(set(lengths))} distinct lengths), {args.max_new_tokens} new tokens"
    )
    run(model, tok, prompts[:1], budgets[:1], 1)  # warm-up
    times: dict[int, list[float]] = {1: [], args.batch_size: []}
    texts: dict[int, dict[int, str]] = {}
    for _ in range(args.repeats):  # interleaved: both settings see the same machine load
        for bs in times:
            seconds, texts[bs] = run(model, tok, prompts, budgets, bs)
            times[bs].append(seconds)
    identical = texts[1] == texts[args.batch_size]
    rate = {bs: len(prompts) / statistics.median(t) for bs, t in times.items()}
    ratio = rate[args.batch_size] / rate[1]
    for bs in times:
        print(f"batch {bs:>3}: {rate[bs]:8.2f} samples/s (median of {args.repeats})")
    print(f"batch {args.batch_size} / batch 1: {ratio:.2f}x; identical outputs: {identical}")
    print(json.dumps({
        "model": name, "task": args.task, "length": args.length, "samples": len(prompts),
        "distinct_lengths": len(set(lengths)), "samples_per_s": {str(k): round(v, 3)
        for k, v in rate.items()}, "ratio": round(ratio, 3), "identical": identical,
    }))  # fmt: skip
    if not identical:
        sys.exit("batched generation differs from one-by-one generation")


if __name__ == "__main__":
    main()

"""Benchmark: long-context prompt generation speed per task at 4K and 32K tokens.

Usage: python bench/bench_eval_tasks.py [--tokenizer byte|HF_DIR] [--lengths 4096 32768]
           [--samples 20] [--tasks ...] [--data-dir DIR]
Times `generate_samples` (setup and calibration included) for each task and length and
prints prompts/s, tokenizations per sample (one of them of the smallest prompt, cheap) and
the mean unused part of the token budget. Tasks that need
user data (essay/QA) are skipped with their message unless --data-dir provides it.
Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybrid_megatron.data.tokenizer import build_tokenizer
from hybrid_megatron.eval.tasks import TASKS, MissingTaskDataError, generate_samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokenizer", default="byte", help="'byte' or a local HF tokenizer dir")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--samples", type=int, default=20, help="samples per task and length")
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--data-dir", default=None, help="essays/QA files (see eval.tasks)")
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()

    tok = build_tokenizer(args.tokenizer)
    print(f"tokenizer: {tok!r}; {args.samples} samples per cell")
    header = f"{'task':<16} {'length':>7} {'prompts/s':>10} {'tok./sample':>12} {'unused':>8}"
    print(header)
    print("-" * len(header))
    results = []
    for task in args.tasks:
        for length in args.lengths:
            t0 = time.perf_counter()
            try:
                samples = generate_samples(
                    task, tok, length, args.samples, args.seed, data_dir=args.data_dir
                )
            except MissingTaskDataError as err:
                print(f"{task:<16} skipped: {str(err).split('. ')[0]} (see --data-dir)")
                break
            dt = time.perf_counter() - t0
            evals = statistics.fmean(s.metadata["fit_evals"] for s in samples)
            unused = statistics.fmean(length - s.length for s in samples)
            rate = len(samples) / dt
            print(f"{task:<16} {length:>7} {rate:>10.1f} {evals:>12.1f} {unused:>8.1f}")
            results.append(
                {
                    "task": task,
                    "length": length,
                    "prompts_per_s": round(rate, 2),
                    "tokenizations_per_sample": round(evals, 2),
                    "mean_unused_tokens": round(unused, 1),
                }
            )
    print(
        json.dumps({"tokenizer": str(args.tokenizer), "samples": args.samples, "results": results})
    )


if __name__ == "__main__":
    main()

"""Benchmark: how to spend a CPU's cores on training and evaluation of a small model.

Usage: python bench/bench_threads.py [--config configs/tiny_base.yaml] [--steps 12]
                                     [--rounds 3] [--eval-prompts 16]

Measured side by side in one run, interleaved round by round (a shared machine's load lands
on both sides), medians over rounds:
  train  `hybrid-megatron train` of --config for --steps steps on a fresh run dir:
         A) one process with C threads (train.cpu_processes=1, OMP_NUM_THREADS=C);
         B) C worker processes of one thread each (train.cpu_processes=C), what a plain
            `train` on CPU does by default. Rate: median tokens/s of the steps after the
            first 2 (metrics.jsonl), so start-up costs are not counted.
  eval   greedy generation of --eval-prompts niah_single_1 prompts of 1024 byte tokens
         (`eval.generation.greedy_generate`, batch 8) with the config's architecture and
         random weights, in a subprocess with torch.set_num_threads(1) vs (C).
C is the number of available cores. Prints rates and ratios, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

EVAL_SNIPPET = """
import sys, time, torch
sys.path.insert(0, {bench!r})
torch.set_num_threads({threads})
from bench_eval import random_model
from hybrid_megatron.eval.generation import greedy_generate
from hybrid_megatron.eval.tasks import generate_samples
model, tok = random_model({config!r}, None)
prompts = [tok.encode(s.prompt) for s in generate_samples("niah_single_1", tok, 1024, {n})]
list(greedy_generate(model, tok, prompts[:2], 4, 2))  # warm-up
start = time.perf_counter()
list(greedy_generate(model, tok, prompts, 16, 8))
print(len(prompts) / (time.perf_counter() - start))
"""


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def train_rate(config: str, steps: int, processes: int, threads: int) -> float:
    """Median tokens/s of a short training run (steps after the first two)."""
    with tempfile.TemporaryDirectory() as tmp:
        sets = [
            f"train.steps={steps}", "optimizer.warmup_steps=1", "checkpoint.interval=0",
            "train.eval_interval=0", "train.log_interval=1", f"train.cpu_processes={processes}",
            "after_training.plots=false", "after_training.recall_probe=false",
            "after_training.convert_to_hf=false", "after_training.eval_tasks=[]",
            "data.synthetic.num_docs=1500",
        ]  # fmt: skip
        cmd = [sys.executable, "-m", "hybrid_megatron.cli", "train", config, "--run-dir", tmp]
        for s in sets:
            cmd += ["--set", s]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").open()]
    rates = [r["tokens_per_s"] for r in rows if r.get("split") == "train" and r["step"] > 2]
    return statistics.median(rates)


def eval_rate(config: str, threads: int, prompts: int) -> float:
    code = EVAL_SNIPPET.format(bench=str(REPO / "bench"), threads=threads, config=config, n=prompts)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO
    )
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return float(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/tiny_base.yaml")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--eval-prompts", type=int, default=16)
    args = ap.parse_args()
    c = cores()
    if c < 2:
        raise SystemExit("needs at least 2 cores to compare")
    train_a, train_b, eval_1, eval_c = [], [], [], []
    for r in range(args.rounds):
        train_a.append(train_rate(args.config, args.steps, 1, c))
        train_b.append(train_rate(args.config, args.steps, c, 1))
        eval_1.append(eval_rate(args.config, 1, args.eval_prompts))
        eval_c.append(eval_rate(args.config, c, args.eval_prompts))
        print(
            f"round {r + 1}: train {train_a[-1]:.0f} vs {train_b[-1]:.0f} tok/s, "
            f"eval {eval_1[-1]:.2f} vs {eval_c[-1]:.2f} samples/s",
            flush=True,
        )
    med = statistics.median
    result = {
        "cores": c,
        "train_tokens_per_s": {
            f"1 process x {c} threads": med(train_a),
            f"{c} processes x 1 thread": med(train_b),
        },  # fmt: skip
        "train_ratio_processes_over_threads": med(train_b) / med(train_a),
        "eval_samples_per_s": {"1 thread": med(eval_1), f"{c} threads": med(eval_c)},
        "eval_ratio_1_thread_over_all": med(eval_1) / med(eval_c),
    }
    print(
        f"train: {c} processes x 1 thread / 1 process x {c} threads = "
        f"{result['train_ratio_processes_over_threads']:.2f}x"
    )
    print(
        f"eval:  1 thread / {c} threads = {result['eval_ratio_1_thread_over_all']:.2f}x (samples/s)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()

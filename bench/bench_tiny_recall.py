"""Train the tiny hybrid on CPU, then measure the retrieval it learned, end to end.

    python bench/bench_tiny_recall.py                          # configs/tiny.yaml as it is
    python bench/bench_tiny_recall.py --set train.steps=400 --samples 20
    python bench/bench_tiny_recall.py --run-dir runs/tiny --skip-train   # evaluate only

1. `hybrid-megatron train CONFIG` (the README command) in a subprocess, timed wall-clock;
   tokens/s is the mean of the trainer's per-step figures after the first 10 steps. The
   trainer's recall probe (held-out documents of the training mix, teacher-forced exact
   match by document kind) lands in RUN_DIR/eval/recall.json.
2. `hybrid-megatron eval --model RUN_DIR --tasks niah_single_1,passkey --lengths L`: the
   runner converts the final Megatron checkpoint, generates RULER niah_single_1 and passkey
   prompts fitted to L tokens (default: the training length), decodes greedily and scores
   them with RULER's rules (x100), into RUN_DIR/bench_eval/results.json.
Prints one JSON summary (also RUN_DIR/bench_tiny_recall.json) with the chance levels. Timings
share the machine with whatever else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import fmean

REPO = Path(__file__).resolve().parents[1]
# Chance x100 of guessing the answer: a 7-digit number (niah), a key in 1..50000 (passkey).
CHANCE_X100 = {"niah_single_1": 100 / 9e6, "passkey": 100 / 50000}


def _cli(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    cmd = [sys.executable, "-m", "hybrid_megatron.cli", *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"`{' '.join(cmd[2:])}` failed with exit code {proc.returncode}")
    return time.perf_counter() - start, proc


def train(config: str, run_dir: Path, overrides: list[str]) -> dict:
    """Run the training CLI; wall time, throughput and losses from its metrics."""
    args = ["train", config, "--run-dir", str(run_dir)]
    for item in overrides:
        args += ["--set", item]
    wall, _ = _cli(*args)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["split"] == "train"]
    valid = [r for r in rows if r["split"] == "valid"]
    per_step = [b["tokens"] - a["tokens"] for a, b in zip(steps, steps[1:])]
    rates = [n / r["step_s"] for n, r in zip(per_step, steps[1:])][10:]
    return {
        "command": "hybrid-megatron " + " ".join(args),
        "wall_s": round(wall, 1),
        "steps": len(steps),
        "tokens": steps[-1]["tokens"],
        "tokens_per_s": round(fmean(rates)) if rates else None,
        "final_loss": round(fmean(r["loss"] for r in steps[-5:]), 4),
        "final_valid_loss": round(valid[-1]["loss"], 4) if valid else None,
    }


def evaluate(run_dir: Path, samples: int, length: int, max_new_tokens: int) -> dict:
    """The eval runner on the run's final checkpoint; scores x100 per task."""
    out = run_dir / "bench_eval"
    wall, _ = _cli(
        "eval", "--model", str(run_dir), "--tasks", "niah_single_1,passkey",
        "--lengths", str(length), "--num-samples", str(samples),
        "--max-new-tokens", str(max_new_tokens), "--output", str(out), "--no-plots",
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    (name, model), *_ = results["models"].items()
    summary: dict = {"model": name, "wall_s": round(wall, 1), "length": length}
    for task, per_length in model["tasks"].items():
        summary[task] = per_length.get(str(length))
    if model.get("skipped"):
        summary["skipped"] = model["skipped"]
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    p.add_argument("--run-dir", default=None, help="default: a fresh directory under /tmp")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--skip-train", action="store_true", help="evaluate RUN_DIR as it is")
    p.add_argument("--samples", type=int, default=50, help="prompts per task")
    p.add_argument("--length", type=int, default=None, help="prompt length (default: seq_length)")
    p.add_argument("--max-new-tokens", type=int, default=12)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    run_dir = Path(args.run_dir or f"/tmp/bench_tiny_recall_{int(time.time())}")
    summary: dict = {"run_dir": str(run_dir), "cpus": os.cpu_count()}
    if not args.skip_train:
        summary["train"] = train(args.config, run_dir, args.set)
    if args.length is None:
        from hybrid_megatron.config import load_config

        args.length = load_config(args.config, args.set).model.seq_length
    probe = run_dir / "eval" / "recall.json"
    if probe.is_file():
        result = json.loads(probe.read_text())
        summary["recall_probe"] = {
            k: f"{v['accuracy'] * 100:.1f}% (n={v['n']})" for k, v in result["by_kind"].items()
        }
    summary["eval"] = evaluate(run_dir, args.samples, args.length, args.max_new_tokens)
    summary["chance_x100"] = CHANCE_X100
    text = json.dumps(summary, indent=1)
    (run_dir / "bench_tiny_recall.json").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

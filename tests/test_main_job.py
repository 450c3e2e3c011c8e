"""Acceptance: the README's main job, as a new user runs it, shows long-range retrieval.

`hybrid-megatron train configs/tiny.yaml` (here with --run-dir) on a 2-core CPU: trains a
BPE tokenizer on the generated corpus, trains the tiny hybrid as one-thread worker processes,
then writes the loss plot, converts to Hugging Face format and evaluates RULER niah_single_1
and passkey at the 256-token training length (20 fresh prompts each, greedy, RULER scoring);
the scores must be far above chance (1.1e-5 and 0.002, x100). A rerun says the run is finished
and does nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIN_SCORE = 25.0  # x100, per task; see the README's main-job figures for what runs reach


def _train(run_dir: Path, timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "HYBRID_MEGATRON_FAULT", "RANK", "WORLD_SIZE"):
        env.pop(name, None)  # the job chooses its own processes and threads
    return subprocess.run(
        [sys.executable, "-m", "hybrid_megatron.cli", "train", "configs/tiny.yaml",
         "--run-dir", str(run_dir)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_main_job_trains_converts_and_retrieves(tmp_path):
    run_dir = tmp_path / "tiny"
    start = time.perf_counter()
    proc = _train(run_dir, timeout=2700)
    minutes = (time.perf_counter() - start) / 60
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = proc.stdout
    print(out[-2500:], f"\nmain job: {minutes:.1f} min")
    assert "2 worker processes x 1 thread" in out  # the banner: CPU workers chosen by itself
    record = json.loads((run_dir / "pipeline.json").read_text())
    scores = {task: per_length["256"] for task, per_length in record["scores"].items()}
    assert scores["niah_single_1"] >= MIN_SCORE, scores
    assert scores["passkey"] >= MIN_SCORE, scores
    assert "(chance 1.1e-05)" in out and "(chance 2.0e-03)" in out
    for name in ("loss plot", "eval results", "eval plots", "hf model"):
        assert Path(record["files"][name]).exists() and record["files"][name] in out
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert any((run_dir / "eval" / "plots").glob("*.png"))
    assert (run_dir / "hf" / "tokenizer.json").is_file()  # the trained BPE ships with the model

    again = _train(run_dir, timeout=300)
    assert again.returncode == 0 and "is finished (step 1700); nothing to do" in again.stdout
    assert "converted" not in again.stdout and "evaluating" not in again.stdout
    assert json.loads((run_dir / "pipeline.json").read_text()) == record

"""Analyses on a short real training run (tiny_base, a checkpoint every 3 steps): the trace
over its checkpoints writes its JSON and plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_base.yaml")
SHORT = [
    "train.steps=6",
    "optimizer.warmup_steps=2",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "model.seq_length=128",
    "data.synthetic.num_docs=300",
    "train.eval_interval=0",
    "checkpoint.interval=3",
    "checkpoint.keep_last=null",
    "train.log_interval=1",
    "after_training.recall_probe=false",
    "after_training.plots=false",
]


def _env(tmp: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HYBRID_MEGATRON_EVAL_CACHE=str(tmp / "cache"))
    env.pop("HYBRID_MEGATRON_FAULT", None)
    return env


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "hybrid_megatron.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("analysis")
    run = tmp / "run"
    env = _env(tmp)
    args = ["train", TINY, "--run-dir", str(run)]
    for item in SHORT:
        args += ["--set", item]
    _cli(*args, env=env)
    return run, env


NEEDLE = ["--length", "400", "--num-samples", "2", "--max-new-tokens", "4"]


def test_trace_writes_json_and_plots_over_the_checkpoints(short_run, tmp_path):
    run, env = short_run
    out = tmp_path / "trace"
    _cli("analyze", "trace", str(run), *NEEDLE, "--top-k", "3", "--out", str(out), env=env)
    result = json.loads((out / "trace.json").read_text())
    assert result["steps"] == [3, 6] and result["reference"]["step"] == 3
    assert result["final"]["step"] == 6
    layers = result["layout"]["attention_layers"]
    assert len(result["heads"]) >= 3 and all(h["layer"] in layers for h in result["heads"])
    first, last = result["checkpoints"]
    for head in first["heads"]:  # the reference is the first checkpoint: distance 0
        assert head["qk_dist"] == 0.0 and head["qk_rel"] == 0.0
    for head in last["heads"]:  # trained: Q/K moved, entropies are in range
        assert head["qk_dist"] > 0 and head["q_rel"] > 0 and head["k_rel"] > 0
        assert head["entropy"] > 0 and 0 < head["entropy_norm"] <= 1 + 1e-6
        assert 0 <= head["attention_mass"] <= 1 + 1e-6
    # the final checkpoint's top head by attention mass is traced with that score
    top = result["final"]["top_heads"]["attention_mass"][0]
    traced = next(
        h for h in last["heads"] if (h["layer"], h["head"]) == (top["layer"], top["head"])
    )
    assert traced["attention_mass"] == pytest.approx(top["score"])
    for name in ("attention_mass", "copy_paste", "entropy", "qk_distance"):
        assert (out / f"trace_{name}.png").stat().st_size > 1000
    # a reference step the run does not have is refused, naming the steps it has
    bad = subprocess.run(
        [sys.executable, "-m", "hybrid_megatron.cli", "analyze", "trace", str(run),
         "--reference", "5", "--out", str(tmp_path / "bad")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert bad.returncode == 2 and "[3, 6]" in bad.stderr


def test_probe_and_grad_distance_write_json_and_plots(short_run, tmp_path):
    run, env = short_run
    out = tmp_path / "probe"
    _cli("analyze", "probe", str(run), "--length", "400", "--num-samples", "12",
         "--num-classes", "2", "--out", str(out), env=env)  # fmt: skip
    result = json.loads((out / "probe.json").read_text())
    assert result["chance"] == 0.5 and sum(result["label_counts"]) == 12
    assert [r["layer"] for r in result["layers"]] == list(range(12))  # every layer of M-S-*-M-S-*-
    assert result["layers"][0]["kind"] == "mamba" and result["layers"][1]["kind"] == "mlp"
    for row in result["layers"]:
        for kind in ("residual", "delta"):
            assert 0 <= row[kind]["test_acc"] <= 1 and 0 <= row[kind]["train_acc"] <= 1
    assert (out / "probe.png").stat().st_size > 1000

    out = tmp_path / "grad"
    _cli("analyze", "grad-distance", str(run), "--length", "128", "--num-sequences", "2",
         "--last-n", "4", "--out", str(out), env=env)  # fmt: skip
    result = json.loads((out / "grad_distance.json").read_text())
    assert len(result["mean_by_distance"]) == 128 and result["sequences"] == 2
    assert result["bins"][0] == {"lo": 0, "hi": 1, "mean": result["mean_by_distance"][0]}
    assert all(m > 0 for m in result["mean_by_distance"])  # Mamba and full attention: all
    assert (out / "grad_distance.png").stat().st_size > 1000

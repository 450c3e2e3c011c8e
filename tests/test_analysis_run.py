"""Analyses on a short real training run (tiny_base, a checkpoint every 3 steps, the
retrieval monitor every 3 steps): the monitor's logged scores equal the HF analysis of the
same checkpoint; trace, probe and grad-distance write their JSON and plots."""

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
    "train.retrieval_monitor_interval=3",
    "train.retrieval_monitor_prompts=4",
    "train.cpu_processes=2",  # two data-parallel workers: one replica reports
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


def _check_monitor_rows(run: Path, steps: list[int], prompts: int, cache: str) -> None:
    """The run's retrieval rows are well-formed, and the last equals the HF analysis of the
    converted last checkpoint on the same prompts."""
    import torch

    from hybrid_megatron.analysis.attention_probe import AttentionProbe
    from hybrid_megatron.analysis.monitor import QUERY_OFFSET, probe_prompts
    from hybrid_megatron.config import load_config
    from hybrid_megatron.eval.models import load_eval_model
    from hybrid_megatron.training.metrics import read_metrics

    rows = [r for r in read_metrics(run) if r["split"] == "retrieval"]
    assert [r["step"] for r in rows] == steps
    heads = [f"L{layer}H{h}" for layer in (4, 10) for h in range(4)]  # '*' of M-S-*-M-S-*-
    for r in rows:
        assert r["prompts"] == prompts and all(0 <= r[k] <= 1 for k in heads)
        assert r["mass_max"] == max(r[k] for k in heads)
        assert r[f"L{r['top_layer']}H{r['top_head']}"] == r["mass_max"]
    cfg = load_config(run / "config.yaml")
    items = probe_prompts(cfg, run, prompts)
    ckpt = run / "checkpoints" / f"iter_{steps[-1]:07d}"
    model, _, _ = load_eval_model(ckpt, "cpu", "fp32", cache_dir=cache)
    total = {4: torch.zeros(4), 10: torch.zeros(4)}
    for prompt, positions in items:
        probe = AttentionProbe(model)
        probe.prefill(torch.tensor(prompt[:-QUERY_OFFSET]))
        step = probe.attend(torch.tensor(prompt[-QUERY_OFFSET:]))
        for layer in total:
            total[layer] += step.attentions[layer][:, 0, positions].sum(-1)
    for layer, sums in total.items():
        for h in range(4):
            expected = float(sums[h]) / prompts
            assert rows[-1][f"L{layer}H{h}"] == pytest.approx(expected, abs=1e-4)


def test_monitor_logs_the_attention_mass_of_the_full_attention_heads(short_run):
    run, env = short_run
    _check_monitor_rows(run, [3, 6], 4, env["HYBRID_MEGATRON_EVAL_CACHE"])
    assert (run / "tensorboard").is_dir()


def _train_rank(run_dir: str, tp: int, pp: int, vpp: int | None = None) -> None:
    from hybrid_megatron.config import load_config
    from hybrid_megatron.training.trainer import train

    overrides = [*SHORT, "train.steps=2", "optimizer.warmup_steps=1", "checkpoint.interval=0"]
    overrides += ["train.retrieval_monitor_interval=2", f"run_dir={run_dir}"]
    overrides += [f"parallel.tensor={tp}", f"parallel.pipeline={pp}"]
    if vpp:
        overrides.append(f"parallel.virtual_pipeline={vpp}")
    train(load_config(TINY, overrides))


def test_monitor_under_tensor_and_pipeline_parallelism(tmp_path):
    """Each rank scores the heads it holds (TP=2: a slice of heads; PP=2 with two virtual
    stages each: some layers); the logged row equals the HF analysis of the checkpoint."""
    from tests.dist_utils import run_distributed

    run = tmp_path / "run"
    run_distributed(_train_rank, 4, str(run), 2, 2, 2)
    _check_monitor_rows(run, [2], 4, str(tmp_path / "cache"))


def test_monitor_settings_are_validated():
    from hybrid_megatron.config import load_config
    from hybrid_megatron.errors import ConfigError

    with pytest.raises(ConfigError, match="has none"):
        load_config(TINY, ["train.retrieval_monitor_interval=5", "model.pattern=M-S-"])
    with pytest.raises(ConfigError, match="retrieval_monitor_interval must be >= 0"):
        load_config(TINY, ["train.retrieval_monitor_interval=-1"])
    with pytest.raises(ConfigError, match="retrieval_monitor_prompts"):
        load_config(
            TINY, ["train.retrieval_monitor_interval=5", "train.retrieval_monitor_prompts=0"]
        )

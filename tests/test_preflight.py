"""Config checks that depend on the machine and the job (issue 14.7, 14.8): exit 2 from
`train` before any data or model work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybrid_megatron.config import load_config
from hybrid_megatron.errors import ConfigError
from hybrid_megatron.kernels.attention import available_backends
from hybrid_megatron.kernels.ssd import mamba_backend_available
from hybrid_megatron.training.preflight import check_environment

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_base.yaml")


def _cfg(*overrides: str):
    return load_config(TINY, list(overrides))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_cuda_device_without_cuda():
    with pytest.raises(ConfigError, match="train.device is 'cuda' but no CUDA device"):
        check_environment(_cfg("train.device=cuda"), 1)


@pytest.mark.skipif(available_backends()["flash_attn"], reason="flash_attn is installed")
def test_flash_attn_backend_without_the_package():
    with pytest.raises(ConfigError, match="attention_backend is 'flash_attn' but its package"):
        check_environment(_cfg("model.attention_backend=flash_attn"), 1)


@pytest.mark.skipif(mamba_backend_available(), reason="mamba_ssm is installed")
def test_mamba_ssm_backend_without_the_package():
    with pytest.raises(ConfigError, match="mamba_backend is 'mamba_ssm' but mamba_ssm"):
        check_environment(_cfg("model.mamba_backend=mamba_ssm"), 1)


def test_world_size_must_be_a_multiple_of_the_model_parallel_size():
    cfg = _cfg("parallel.tensor=2")
    check_environment(cfg, 4)
    with pytest.raises(ConfigError, match="world size 3 is not divisible by tensor"):
        check_environment(cfg, 3)


def _train(run_dir: Path, *overrides: str, env: dict | None = None):
    args = [sys.executable, "-m", "hybrid_megatron.cli", "train", TINY, "--run-dir", str(run_dir)]
    for o in overrides:
        args += ["--set", o]
    env = dict(os.environ if env is None else env, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("optimizer.lr=.nan",), "optimizer.lr must be a finite number"),
        (("after_training.eval_tasks=[nope]",), "unknown task 'nope'"),
    ],
)
def test_train_refuses_before_any_work(tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    proc = _train(run_dir, *overrides)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not run_dir.exists(), "nothing written before the check"


def test_train_under_a_launcher_checks_the_world_size(tmp_path):
    """A rank of a 3-process job with TP=2 used to fail inside Megatron's process groups."""
    env = dict(os.environ, RANK="0", WORLD_SIZE="3", LOCAL_RANK="0")
    proc = _train(tmp_path / "run", "parallel.tensor=2", env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "world size 3 is not divisible by tensor*pipeline*context = 2" in proc.stderr
    assert not (tmp_path / "run").exists()

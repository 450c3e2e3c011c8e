"""Training at CP=2: stopped by SIGTERM mid-run and resumed, it reproduces an uninterrupted
CP=2 run exactly; the stopped run also resumes at CP=1 (model, optimizer and data position;
same losses up to fp32 reduction order), and the final checkpoint gives the same validation
loss at CP=1."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.dist_utils import run_distributed
from tests.test_train import SMALL, TINY, _cli, _env, _rows, _trajectory

CP2 = ("parallel.context=2", "train.cpu_processes=2", "train.steps=6", "checkpoint.interval=3")


def _run(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        _cli(run_dir, *CP2, *extra), env=_env(), capture_output=True, text=True, timeout=600
    )


def _validation_rank(run_dir: str, ckpt: str) -> float:
    from hybrid_megatron.config import load_config
    from hybrid_megatron.training.trainer import validation_loss

    cfg = load_config(TINY, [*SMALL, "train.steps=6", f"run_dir={run_dir}"])
    assert cfg.parallel.context == 1
    return validation_loss(cfg, ckpt)


def test_cp2_sigterm_resume_is_exact_and_checkpoint_loads_at_cp1(tmp_path):
    reference = tmp_path / "reference"
    proc = _run(reference)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cp=2" in proc.stdout

    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        _cli(run_dir, *CP2), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").is_file() and len(_rows(run_dir, "train")) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    stopped = len(_rows(run_dir, "train"))
    assert 2 <= stopped < 6 and "stopped at step" in out, out[-2000:]
    at_cp1 = tmp_path / "at_cp1"
    shutil.copytree(run_dir, at_cp1)
    resumed = _run(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert _trajectory(run_dir) == _trajectory(reference)  # bit-identical losses and data

    resumed = _run(at_cp1, "parallel.context=1", "train.cpu_processes=1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "cp=1" in resumed.stdout and "resumed from" in resumed.stdout
    got, want = _trajectory(at_cp1), _trajectory(reference)
    assert [r[0] for r in got] == list(range(1, 7))
    assert [(r[0], r[2], r[3]) for r in got] == [(r[0], r[2], r[3]) for r in want]  # same data
    for (_, loss, *_), (_, ref, *_) in zip(got[stopped:], want[stopped:]):
        assert loss == pytest.approx(ref, rel=1e-4)

    final = reference / "checkpoints" / "iter_0000006"
    assert json.loads((final / "hm_complete.json").read_text())["layout"]["context"] == 2
    valid = {r["step"]: r["loss"] for r in _rows(reference, "valid")}
    (cp1,) = run_distributed(_validation_rank, 1, str(tmp_path / "cp1"), str(final))
    assert cp1 == pytest.approx(valid[6], rel=1e-5, abs=1e-6)


def test_train_refuses_cp_without_its_processes(monkeypatch, tmp_path):
    """A one-process train at CP=2 is a config error before any process group starts."""
    import torch.distributed as dist

    from hybrid_megatron.config import load_config
    from hybrid_megatron.errors import ConfigError
    from hybrid_megatron.training.trainer import train

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_config(TINY, [*SMALL, "parallel.context=2", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"world size 1 is not divisible by .*context = 2"):
        train(cfg)
    assert not dist.is_initialized()
    assert not (tmp_path / "run").exists()


def _first_step(run_dir: str, init: str | None, pp: int, vpp: int | None, cp: int):
    from hybrid_megatron.config import load_config
    from hybrid_megatron.training.trainer import train

    sets = [*SMALL, "train.steps=1", "optimizer.warmup_steps=0", "train.global_batch_size=8",
            "train.micro_batch_size=2", f"run_dir={run_dir}", f"parallel.pipeline={pp}",
            f"parallel.context={cp}", "train.eval_interval=0"]  # fmt: skip
    if init:
        sets.append(f"train.init_from={init}")
    if vpp:
        sets.append(f"parallel.virtual_pipeline={vpp}")
    train(load_config(TINY, sets))
    row = _rows(Path(run_dir), "train")[0]
    return row["loss"], row["grad_norm"]


def test_interleaved_pipeline_with_cp2_matches_cp1(tmp_path):
    """PP=2 with 2 virtual stages per rank x CP=2 (4 processes) reproduces CP=1's first step
    from the same weights (loss 1e-5, gradient norm 1e-4 relative)."""
    run_distributed(_first_step, 1, str(tmp_path / "init"), None, 1, None, 1)
    init = str(tmp_path / "init")
    (want,) = run_distributed(_first_step, 1, str(tmp_path / "a"), init, 1, None, 1)
    got = run_distributed(_first_step, 4, str(tmp_path / "b"), init, 2, 2, 2)[0]
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    assert got[1] == pytest.approx(want[1], rel=1e-4)

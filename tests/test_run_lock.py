"""The run-dir lock (issue 14.3): one training job per run dir, stale locks taken over,
shared by the processes of one job (no training needed)."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hybrid_megatron.errors import ConfigError
from hybrid_megatron.training import run_lock
from hybrid_megatron.training.run_lock import LOCK_NAME, TOKEN_ENV, acquire

REPO = Path(__file__).resolve().parents[1]


def _write_lock(run_dir: Path, **fields) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = dict(host=socket.gethostname(), pid=os.getpid(), job_id=None, started="then",
                  token="other", process_start=None)  # fmt: skip
    holder.update(fields)
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps(holder))
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(autouse=True)
def _no_inherited_token(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)


def test_second_job_is_refused_naming_the_holder(tmp_path):
    lock = acquire(tmp_path / "run")
    holder = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(ConfigError, match="in use by another training job") as err:
        acquire(tmp_path / "run")
    assert f"pid {os.getpid()}" in str(err.value) and socket.gethostname() in str(err.value)
    lock.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    acquire(tmp_path / "run").release()  # free again


def test_slurm_job_id_is_named(tmp_path):
    _write_lock(tmp_path, host="node7", job_id="slurm:4242")
    with pytest.raises(ConfigError, match="host node7, pid .*job 4242"):
        acquire(tmp_path)


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, capsys):
    _write_lock(tmp_path, pid=_dead_pid())
    lock = acquire(tmp_path)
    assert lock.owned and "is gone" in capsys.readouterr().err
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_remote_holder_is_stale_only_when_its_heartbeat_stopped(tmp_path, capsys):
    path = _write_lock(tmp_path, host="elsewhere", pid=1)
    with pytest.raises(ConfigError, match="host elsewhere"):
        acquire(tmp_path)
    old = time.time() - run_lock.STALE_AFTER_S - 5
    os.utime(path, (old, old))
    acquire(tmp_path).release()
    assert "heartbeat stopped" in capsys.readouterr().err


def test_a_requeued_job_takes_over_its_own_earlier_lock(tmp_path, monkeypatch):
    _write_lock(tmp_path, host="node1", pid=1, job_id="slurm:77")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    acquire(tmp_path).release()


def test_heartbeat_refreshes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    lock = acquire(tmp_path)
    path = tmp_path / LOCK_NAME
    os.utime(path, (1, 1))
    deadline = time.time() + 10
    while path.stat().st_mtime < 10 and time.time() < deadline:
        time.sleep(0.05)
    assert path.stat().st_mtime > 10
    lock.release()


def _child_acquires(run_dir: Path, env: dict) -> subprocess.CompletedProcess:
    code = "import sys; from hybrid_megatron.training.run_lock import acquire; acquire(sys.argv[1])"
    return subprocess.run([sys.executable, "-c", code, str(run_dir)], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_worker_processes_of_the_job_share_the_lock(tmp_path):
    lock = acquire(tmp_path, share_with_children=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    assert env[TOKEN_ENV] == lock.token
    joined = _child_acquires(tmp_path, env)
    assert joined.returncode == 0, joined.stderr
    assert (tmp_path / LOCK_NAME).exists(), "a sharing worker does not release the job's lock"
    env.pop(TOKEN_ENV)
    stranger = _child_acquires(tmp_path, env)
    assert stranger.returncode != 0 and "in use by another training job" in stranger.stderr
    lock.release()
    assert TOKEN_ENV not in os.environ


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.mark.skipif(not _can_unshare(), reason="needs unprivileged user+mount namespaces")
def test_read_only_run_dir_is_named_as_such(tmp_path):
    """Issue 14.12: a read-only run dir used to be reported as "pass a writable cache_dir"."""
    ro = tmp_path / "ro"
    (ro / "run").mkdir(parents=True)
    train = [sys.executable, "-m", "hybrid_megatron.cli", "train",
             str(REPO / "configs" / "tiny_base.yaml"), "--run-dir", str(ro / "run")]  # fmt: skip
    script = f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && exec {shlex.join(train)}"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "not writable (read-only file system)" in proc.stderr and "--run-dir" in proc.stderr
    assert "cache_dir" not in proc.stderr

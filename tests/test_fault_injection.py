"""Seeded fault injection against a short training job (issue 14, acceptance).

One tiny run is hit by >= 20 faults: SIGKILL mid-step (the trainer alone: its helper
processes must die with it), SIGKILL mid-save (the whole process group, before the checkpoint
is marked complete, or at a random moment of a save), a corrupted newest checkpoint, and a
concurrent second job on the same run dir. After each fault the same command resumes. At the
end the run's per-step losses, data checksums and validation losses equal those of an
uninterrupted run exactly; at every observation at least one intact checkpoint existed and
`latest_checkpointed_iteration.txt` named one; no process of a killed job outlived it.

Speed: every job is forked by `tests/fork_server.py`, which has imported torch and Megatron
once, so a job costs its training, not interpreter start-up.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from hybrid_megatron.checkpoint.layout import (
    COMPLETE_MARKER,
    LATEST_FILE,
    checkpoint_problem,
    list_checkpoint_dirs,
)

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_base.yaml")
STEPS = 16
SETTINGS = [
    f"train.steps={STEPS}",
    "optimizer.warmup_steps=2",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "model.seq_length=64",
    "model.hidden_size=64",
    "data.synthetic.num_docs=200",
    "data.synthetic.max_distance=48",
    "train.eval_interval=4",
    "train.eval_batches=1",
    "checkpoint.interval=2",
    "checkpoint.keep_last=2",
    "checkpoint.checksums=true",
    "train.log_interval=1",
    "train.cpu_processes=1",
    "after_training.recall_probe=false",
    "after_training.plots=false",
]
SEED = 1414
MIN_FAULTS = 20


class ForkServer:
    """tests/fork_server.py: forks warm `hybrid-megatron` jobs on request."""

    def __init__(self) -> None:
        path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
        env.pop("HYBRID_MEGATRON_FAULT", None)
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "fork_server.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)  # fmt: skip
        assert self.proc.stdout.readline().strip() == "ready"

    def start(self, argv: list[str], log: Path, env: dict[str, str]) -> int:
        job = {"argv": argv, "log": str(log), "env": env, "unset": ["HYBRID_MEGATRON_FAULT"]}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class Job:
    """`hybrid-megatron train` forked by the server (own session, output to a log file)."""

    def __init__(self, server: ForkServer, run_dir: Path, log: Path, fault: str | None = None):
        argv = ["train", TINY, "--run-dir", str(run_dir)]
        for item in SETTINGS:
            argv += ["--set", item]
        self.log = log
        self.rc_file = Path(f"{log}.rc")
        self.pid = server.start(argv, log, {"HYBRID_MEGATRON_FAULT": fault} if fault else {})
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and self.rc_file.exists():
            self.returncode = int(self.rc_file.read_text())
        return self.returncode

    def wait(self, timeout: float = 300) -> int:
        deadline = time.time() + timeout
        while self.poll() is None:
            assert time.time() < deadline, f"job did not finish: {self.output()[-3000:]}"
            time.sleep(0.02)
        return self.returncode

    def kill(self) -> None:
        """SIGKILL the trainer alone: its helper processes must die with it."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _rows(run_dir: Path, split: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return [r for r in rows if r.get("split") == split]


def _trajectory(run_dir: Path) -> tuple[list, list]:
    train = [(r["step"], r["loss"], r["consumed_samples"], r["data_checksum"])
             for r in _rows(run_dir, "train")]  # fmt: skip
    return train, [(r["step"], r["loss"]) for r in _rows(run_dir, "valid")]


def _intact(ckpts: Path, checksums: bool) -> list[int]:
    return [c.iteration for c in list_checkpoint_dirs(ckpts)
            if checkpoint_problem(c.path, verify_checksums=checksums) is None]  # fmt: skip


class Invariants:
    """At least one intact checkpoint once one was written; the latest pointer names one."""

    def __init__(self, run_dir: Path) -> None:
        self.ckpts = run_dir / "checkpoints"
        self.armed = False  # set once the first checkpoint is complete
        self.observations = 0

    def check(self, full: bool) -> None:
        for _ in range(3):  # a sampled listing can race a rename; look again
            intact = _intact(self.ckpts, checksums=full)
            latest = self.ckpts / LATEST_FILE
            named = int(latest.read_text()) if latest.is_file() else None
            ok = bool(intact) and (named is None or named in intact or not full)
            if ok or not self.armed:
                break
            time.sleep(0.05)
        self.observations += 1
        if intact:
            self.armed = True
        elif self.armed:
            raise AssertionError(f"no intact checkpoint left: {sorted(os.listdir(self.ckpts))}")
        if full and named is not None:
            assert named in intact, f"{LATEST_FILE} names {named}; intact: {intact}"


def _session(sid: int) -> list[int]:
    found = []
    for pid in psutil.pids():
        with contextlib.suppress(OSError):
            if os.getsid(pid) == sid:
                found.append(pid)
    return found


def _assert_nothing_left(job: Job) -> None:
    """No process of the killed job's session (its trainer started it) outlives it."""
    deadline = time.time() + 10
    while _session(job.pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not _session(job.pid), f"orphaned processes: {_session(job.pid)}"


def _steps_logged(job: Job) -> int:
    return max((int(m) for m in re.findall(r"^step (\d+)/", job.output(), re.M)), default=0)


def _run_until(job: Job, inv: Invariants, stop) -> bool:
    """Poll `job` (checking invariants) until `stop()` is true (True) or it exits (False)."""
    deadline = time.time() + 300
    while job.poll() is None:
        if stop(job):
            return True
        inv.check(full=False)
        assert time.time() < deadline, "job hangs"
        time.sleep(0.01)
    return False


def _logged(step: int):
    return lambda job: _steps_logged(job) >= step


def _saving_new(ckpts: Path):
    existing = {c.iteration for c in list_checkpoint_dirs(ckpts)}
    return lambda job: bool({c.iteration for c in list_checkpoint_dirs(ckpts)} - existing)


def _done(run_dir: Path) -> int:
    return max(_intact(run_dir / "checkpoints", checksums=False), default=0)


def _flip_newest(ckpts: Path) -> str | None:
    """Corrupt one byte of the newest complete checkpoint, if an older intact one remains."""
    intact = _intact(ckpts, checksums=True)
    if len(intact) < 2:
        return None
    newest = ckpts / f"iter_{intact[-1]:07d}"
    target = max((p for p in newest.glob("*.distcp")), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 3] ^= 0x40
    target.write_bytes(bytes(data))
    return newest.name


@pytest.fixture
def server():
    server = ForkServer()
    yield server
    server.close()


def test_seeded_faults_end_with_the_uninterrupted_runs_exact_losses(tmp_path, server):
    reference = tmp_path / "reference"
    job = Job(server, reference, tmp_path / "reference.log")
    assert job.wait() == 0, job.output()[-3000:]
    want = _trajectory(reference)
    assert [r[0] for r in want[0]] == list(range(1, STEPS + 1))

    run_dir = tmp_path / "faulted"
    ckpts = run_dir / "checkpoints"
    inv = Invariants(run_dir)
    rng = random.Random(SEED)
    faults: list[str] = []
    n = 0

    def log() -> Path:
        nonlocal n
        n += 1
        return tmp_path / f"job{n:02d}.log"

    while len(faults) < MIN_FAULTS:
        done = _done(run_dir)
        if done >= STEPS - 4:  # near the end: faults that do not move it forward
            kind = rng.choice(["corrupt", "kill_save_here"])
        else:
            kind = rng.choice(["kill_step", "kill_step", "kill_save", "kill_save_random",
                               "corrupt", "concurrent"])  # fmt: skip
        if kind == "corrupt":
            name = _flip_newest(ckpts)
            if name:  # (the latest pointer names it until the next job sets it aside)
                faults.append(f"corrupt {name}")
            continue
        if kind.startswith("kill_save") and kind != "kill_save_random":
            step = done + (2 if kind == "kill_save_here" else 2 * rng.randint(1, 2))
            job = Job(server, run_dir, log(), fault=f"kill_during_save:{step}")
            _run_until(job, inv, lambda job: False)
            assert job.returncode == -signal.SIGKILL, job.output()[-3000:]
            faults.append(f"kill -9 (process group) in the save of step {step}")
        elif kind == "kill_save_random":
            job = Job(server, run_dir, log())
            if not _run_until(job, inv, _saving_new(ckpts)):
                assert job.returncode == 0, job.output()[-3000:]
                continue
            time.sleep(rng.uniform(0.0, 0.15))
            job.kill()
            faults.append("kill -9 (trainer) at a random moment of a save")
        elif kind == "kill_step":
            job = Job(server, run_dir, log())
            target = done + rng.randint(1, 3)
            if not _run_until(job, inv, _logged(target)):
                assert job.returncode == 0, job.output()[-3000:]
                continue
            time.sleep(rng.uniform(0.0, 0.1))
            job.kill()
            faults.append(f"kill -9 (trainer) after step {target}")
        else:  # concurrent
            job = Job(server, run_dir, log())
            if not _run_until(job, inv, _logged(done + 1)):
                assert job.returncode == 0, job.output()[-3000:]
                continue
            second = Job(server, run_dir, log())
            assert second.wait() == 2, second.output()[-3000:]
            assert "in use by another training job" in second.output()
            assert f"pid {job.pid}" in second.output()
            faults.append("concurrent second job (refused)")
            job.kill()
        _assert_nothing_left(job)
        inv.check(full=True)

    # resume to the end
    job = Job(server, run_dir, log())
    assert job.wait() == 0, job.output()[-3000:]
    inv.check(full=True)
    assert len(faults) >= MIN_FAULTS, f"only {len(faults)} faults: {faults}"
    kinds = ("after step", "in the save of step", "random moment of a save", "corrupt",
             "concurrent")  # fmt: skip
    assert all(any(k in f for f in faults) for k in kinds), faults
    print(f"{len(faults)} faults:", *faults, sep="\n  ")
    got = _trajectory(run_dir)
    assert got == want, f"after faults {faults}"
    assert not (run_dir / "train.lock").exists()
    aside = [p.name for p in ckpts.iterdir() if ".corrupt-" in p.name or ".partial-" in p.name]
    assert any(".corrupt-" in a for a in aside) == any(f.startswith("corrupt") for f in faults)
    assert (ckpts / f"iter_{STEPS:07d}" / COMPLETE_MARKER).is_file()


if __name__ == "__main__":  # pragma: no cover - run by hand: python tests/test_fault_injection.py
    sys.exit(pytest.main([__file__, "-x", "-q"]))

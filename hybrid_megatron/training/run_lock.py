"""One training job per run dir: `RUN_DIR/train.lock`, held for the life of the job.

The lock is a file created with O_CREAT | O_EXCL (atomic on local disks and on the NFS /
Lustre / GPFS filesystems Slurm clusters share), holding who owns it: host, pid, Slurm job id
(or torchrun run id), start time and a random token. The holder refreshes its mtime every
`HEARTBEAT_S` seconds. A lock is stale, and is taken over with a warning, when

- its holder ran on this host and that process is gone (pid dead or reused), or
- it belongs to an earlier incarnation of this job (same Slurm job / torchrun run id on
  another host: a requeued or restarted job), or
- its heartbeat is older than `STALE_AFTER_S` (a holder on a host that died).

The ranks of one job share the lock: rank 0 acquires it before any rank writes (the others
wait at a collective), and a plain `train` that starts its own worker processes passes its
token to them in `TOKEN_ENV`, so their rank 0 joins the lock instead of fighting for it.
No torch imports here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from hybrid_megatron.errors import ConfigError

LOCK_NAME = "train.lock"
TOKEN_ENV = "HM_RUN_LOCK_TOKEN"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


def _job_id() -> str | None:
    for key in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        value = os.environ.get(key)
        if value and value != "none":
            return f"{key.split('_')[0].lower()}:{value}"
    return None


def _process_start(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - psutil missing or process gone: unknown
        return None


def _alive(pid: int, started: float | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _process_start(pid)
    return started is None or now is None or abs(now - started) < 1.0  # not a reused pid


@dataclass
class Holder:
    """What a lock file says about the job that holds it."""

    host: str
    pid: int
    job_id: str | None
    started: str
    token: str
    process_start: float | None = None

    def describe(self) -> str:
        job = f", job {self.job_id.split(':', 1)[1]}" if self.job_id else ""
        return f"host {self.host}, pid {self.pid}{job}, started {self.started}"


def _read_holder(path: Path) -> Holder | None:
    try:
        data = json.loads(path.read_text())
        return Holder(**data)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):  # being written right now, or garbled
        return Holder("?", -1, None, "?", "")


def stale_reason(holder: Holder, age_s: float) -> str | None:
    """Why the job in a lock file no longer holds the run dir, or None while it may."""
    here = socket.gethostname()
    if holder.host == here and holder.pid > 0 and not _alive(holder.pid, holder.process_start):
        return f"its process {holder.pid} on this host is gone"
    if holder.job_id and holder.job_id == _job_id() and holder.host != here:
        return "it belongs to an earlier run of this job on another host (requeued/restarted)"
    if age_s > STALE_AFTER_S:
        return f"its heartbeat stopped {age_s:.0f} s ago"
    return None


class RunLock:
    """A held (or shared) run-dir lock; `release()` removes it if this process owns it."""

    def __init__(self, path: Path, token: str, owned: bool) -> None:
        self.path, self.token, self.owned = path, token, owned
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if owned:
            self._thread = threading.Thread(target=self._beat, name="run-lock", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        if not self.owned:
            return
        self._stop.set()
        self.owned = False
        holder = _read_holder(self.path)
        if holder is not None and holder.token == self.token:
            with contextlib.suppress(OSError):
                self.path.unlink()
        if os.environ.get(TOKEN_ENV) == self.token:
            del os.environ[TOKEN_ENV]

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _not_writable(run_dir: Path, err: OSError) -> ConfigError:
    why = "read-only file system" if err.errno == errno.EROFS else (err.strerror or str(err))
    return ConfigError(
        f"run dir {run_dir} is not writable ({why}): training writes its checkpoints, data and "
        "metrics there. Pass --run-dir (or run_dir:) a writable directory, or fix its "
        "permissions."
    )


def _create(path: Path, holder: Holder) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(holder.__dict__, f)
        f.flush()
        os.fsync(f.fileno())
    return True


def _take_over(path: Path, judged: Holder) -> None:
    """Move a stale lock out of the way, unless it changed since it was judged stale."""
    moved = path.with_name(f"{path.name}.stale.{os.getpid()}.{uuid.uuid4().hex[:6]}")
    try:
        os.rename(path, moved)
    except FileNotFoundError:
        return
    now = _read_holder(moved)
    if now is not None and now.token != judged.token:  # a fresh lock: put it back
        with contextlib.suppress(OSError):
            os.link(moved, path)
    with contextlib.suppress(OSError):
        moved.unlink()


def acquire(run_dir: Path, share_with_children: bool = False) -> RunLock:
    """Lock `run_dir` for this job, or raise ConfigError naming the job that holds it.

    `share_with_children`: export the token so worker processes this one starts join the lock.
    """
    run_dir = Path(run_dir)
    path = run_dir / LOCK_NAME
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _not_writable(run_dir, err) from err
    inherited = os.environ.get(TOKEN_ENV)
    me = Holder(
        host=socket.gethostname(),
        pid=os.getpid(),
        job_id=_job_id(),
        started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        token=uuid.uuid4().hex,
        process_start=_process_start(os.getpid()),
    )
    for _ in range(20):
        try:
            created = _create(path, me)
        except OSError as err:
            raise _not_writable(run_dir, err) from err
        if created:
            if share_with_children:
                os.environ[TOKEN_ENV] = me.token
            return RunLock(path, me.token, owned=True)
        holder = _read_holder(path)
        if holder is None:
            continue  # released meanwhile: try again
        if inherited and holder.token == inherited:
            return RunLock(path, holder.token, owned=False)  # our parent job's lock
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            continue
        if holder.pid < 0 and age < 10:  # being written: look again
            time.sleep(0.2)
            continue
        reason = stale_reason(holder, age)
        if reason is None:
            raise ConfigError(
                f"run dir {run_dir} is in use by another training job ({holder.describe()}; "
                f"lock file {path}, refreshed {age:.0f} s ago). Wait for that job to finish or "
                "stop it, or train in another run_dir. If that job is certainly gone, delete "
                f"{path}."
            )
        print(
            f"hybrid-megatron: warning: taking over the lock of {run_dir}: {reason} "
            f"({holder.describe()}).",
            file=sys.stderr,
            flush=True,
        )
        _take_over(path, holder)
    raise ConfigError(f"could not lock run dir {run_dir}: {path} keeps changing; retry.")

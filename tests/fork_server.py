"""A fork server for tests that start many short `hybrid-megatron` jobs.

Started once (`python tests/fork_server.py`), it imports torch, Megatron-Core and the
trainer (running no torch op, so no thread pool exists to be broken by fork), then for each
JSON line on stdin, {"argv": [...], "log": PATH, "env": {...}}, forks a child that runs
`hybrid_megatron.cli.main(argv)` in its own session with stdout/stderr to PATH, and prints
the child's pid. When a child ends, its exit code (negative: killed by that signal) is
written to PATH + ".rc". A job then costs its own work, not an interpreter start-up.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback

import hybrid_megatron.cli  # noqa: F401 - warm imports for the children
import hybrid_megatron.training.trainer  # noqa: F401

_jobs: dict[int, str] = {}


def _write_rc(log: str, code: int) -> None:
    tmp = f"{log}.rc.tmp"
    with open(tmp, "w") as f:
        f.write(str(code))
    os.replace(tmp, f"{log}.rc")


def _reap(_signum: int, _frame: object) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        log = _jobs.pop(pid, None)
        if log is not None:
            _write_rc(log, os.waitstatus_to_exitcode(status))


def _child(job: dict) -> None:
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        os.setsid()
        fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        for key in job.get("unset", []):
            os.environ.pop(key, None)
        os.environ.update(job.get("env", {}))
        import torch

        torch.set_num_threads(1)
        from hybrid_megatron.cli import main

        code = main(job["argv"])
    except BaseException:  # noqa: BLE001 - report anything, then exit
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)


def serve() -> None:
    signal.signal(signal.SIGCHLD, _reap)
    print("ready", flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            pid = os.fork()
            if pid == 0:
                _child(job)
            _jobs[pid] = job["log"]
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        print(pid, flush=True)


if __name__ == "__main__":
    serve()

"""Helper processes die with the process that started them (Linux; a no-op elsewhere).

A SIGKILLed trainer cannot clean up, so every process it starts is tied to it with
prctl(PR_SET_PDEATHSIG): the kernel signals the child when its parent dies. That covers
worker processes (set in the child before exec), processes forked from the trainer's main
thread (Megatron's checkpoint write workers, the checkpoint writer's manager: an at-fork
hook), and a rank started by a launcher (torchrun) dies with the launcher. No torch imports.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

_PR_SET_PDEATHSIG = 1
_hook_installed = False
_fork_state: dict[str, object] = {}


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> None:
    """Have the kernel send `sig` to this process when its parent dies (already dead: now)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig))
        if parent is not None and os.getppid() != parent:  # died before prctl took effect
            os.kill(os.getpid(), sig)


def _before_fork() -> None:
    _fork_state["parent"] = os.getpid()
    _fork_state["main_thread"] = threading.current_thread() is threading.main_thread()


def _after_fork_in_child() -> None:
    # PDEATHSIG fires when the *thread* that forked exits: only tie children of the main
    # thread (whose end is the process's end), never those of short-lived threads.
    if _fork_state.get("main_thread"):
        die_with_parent(signal.SIGKILL, parent=_fork_state.get("parent"))  # type: ignore[arg-type]


def tie_forked_children() -> None:
    """From now on, processes forked by this process's main thread die with it (SIGKILL:
    checkpoint helpers ignore SIGTERM on purpose, see megatron_compat.checkpoint_writer)."""
    global _hook_installed
    if not _hook_installed and hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _hook_installed = True


def exit_when_orphaned(grace_s: float = 120.0, poll_s: float = 1.0) -> None:
    """Exit hard `grace_s` seconds after this process's parent (a launcher) is gone.

    The launcher's death also sends SIGTERM (see `die_with_parent`), which asks for a save at
    the next step boundary; a rank stuck in a collective with a dead peer never gets there,
    and would otherwise linger until the process-group timeout.
    """
    parent = os.getppid()

    def watch() -> None:
        import time

        while os.getppid() == parent:
            time.sleep(poll_s)
        time.sleep(grace_s)
        os._exit(1)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()

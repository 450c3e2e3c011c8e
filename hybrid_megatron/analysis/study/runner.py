"""Run a toy study: train every (variant, seed), evaluate every checkpoint, find and trace
retrieval heads, then write the report. Each stage is resumable and skipped when done:

    OUT/runs/NAME/       training run (`hybrid-megatron train`, a subprocess; resumes itself)
    OUT/logs/NAME.*.log  each stage's output
    OUT/eval/NAME/       `eval` over every checkpoint (results.json, plots)
    OUT/heads/NAME/      `analyze retrieval-heads` on the final checkpoint
    OUT/trace/NAME/      `analyze trace` over every checkpoint
    OUT/converted/       HF conversions shared by eval and the analyses
    OUT/report.md, OUT/plots/*.png, OUT/study.json
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hybrid_megatron.analysis.study.config import StudyConfig, Variant


class StudyError(RuntimeError):
    """A stage of the study failed; the message names the run and its log."""


def _say(msg: str) -> None:
    print(f"[study] {msg}", flush=True)


def mechanism_tools() -> tuple[Any, str | None]:
    """The retrieval-heads / trace analyses, or (None, why not) when they are unavailable."""
    try:
        from hybrid_megatron.analysis import retrieval_heads, trace
    except ImportError as err:  # pragma: no cover - both ship with the package
        return None, f"analyze retrieval-heads / trace unavailable ({err})"
    return (retrieval_heads, trace), None


def _final_step(run_dir: Path) -> int | None:
    from hybrid_megatron.checkpoint.layout import complete_checkpoints

    done = complete_checkpoints(run_dir / "checkpoints")
    return done[-1].iteration if done else None


def _steps(run_dir: Path) -> list[int]:
    from hybrid_megatron.checkpoint.layout import complete_checkpoints

    return [c.iteration for c in complete_checkpoints(run_dir / "checkpoints")]


def train(study: StudyConfig, variant: Variant, seed: int, run_dir: Path, logs: Path) -> None:
    """Train (or resume) one run in a subprocess; nothing when its last step is saved."""
    from hybrid_megatron.config import load_config

    name = study.run_name(variant, seed)
    cfg = load_config(study.base, study.overrides(variant, seed))
    if _final_step(run_dir) == cfg.train.steps:
        _say(f"{name}: trained ({cfg.train.steps} steps), skipping")
        return
    cmd = [sys.executable, "-m", "hybrid_megatron.cli", "train", str(study.base),
           "--run-dir", str(run_dir)]  # fmt: skip
    for item in study.overrides(variant, seed):
        cmd += ["--set", item]
    log = logs / f"{name}.train.log"
    _say(f"{name}: training {cfg.train.steps} steps ({cfg.model.pattern}); log {log}")
    t0 = time.perf_counter()
    with open(log, "a") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0 or _final_step(run_dir) != cfg.train.steps:
        tail = "".join(log.read_text(errors="replace").splitlines(True)[-15:])
        raise StudyError(f"{name}: training failed (exit {done.returncode}); see {log}:\n{tail}")
    _say(f"{name}: trained in {time.perf_counter() - t0:.0f}s")


@contextlib.contextmanager
def _logged(path: Path):
    """Send this process's stdout/stderr (Python level) to `path` for a stage."""
    with open(path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


def evaluate(study: StudyConfig, name: str, run_dir: Path, out: Path, logs: Path, device: str):
    """`eval` over every checkpoint of the run (resumable: finished samples are skipped)."""
    from hybrid_megatron.eval.runner import EvalSettings, run_eval

    e = study.eval
    settings = EvalSettings(
        output=out / "eval" / name,
        all_checkpoints=[str(run_dir)],
        tasks=list(e.tasks),
        lengths=list(e.lengths),
        num_samples=e.num_samples,
        max_new_tokens=e.max_new_tokens,
        batch_size=e.batch_size,
        device=device,
    )
    _say(f"{name}: evaluating {len(_steps(run_dir))} checkpoints on {', '.join(e.tasks)}")
    with _logged(logs / f"{name}.eval.log"):
        run_eval(settings)


def _done(path: Path, steps: list[int], key: str) -> bool:
    if not path.is_file():
        return False
    with contextlib.suppress(json.JSONDecodeError, KeyError):
        data = json.loads(path.read_text())
        return (data["steps"] if key == "steps" else [data["model"]["iteration"]]) == steps
    return False


def analyse(study: StudyConfig, name: str, run_dir: Path, out: Path, logs: Path, device: str):
    """Retrieval heads on the final checkpoint and their trace over every checkpoint."""
    tools, why = mechanism_tools()
    if tools is None:
        _say(f"{name}: {why}; skipping the head analyses")
        return
    retrieval_heads, trace = tools
    a = study.analysis
    common = dict(task=a.task, length=a.length, num_samples=a.num_samples, top_k=a.top_k,
                  threshold=a.threshold, max_new_tokens=a.max_new_tokens)  # fmt: skip
    steps = _steps(run_dir)
    heads_dir, trace_dir = out / "heads" / name, out / "trace" / name
    heads_done = _done(heads_dir / "retrieval_heads.json", steps[-1:], "model")
    trace_done = _done(trace_dir / "trace.json", steps, "steps")
    if heads_done and trace_done:
        _say(f"{name}: retrieval heads and trace up to date, skipping")
        return
    with _logged(logs / f"{name}.analysis.log"):
        if not heads_done:
            final = run_dir / "checkpoints" / f"iter_{steps[-1]:07d}"
            retrieval_heads.run_retrieval_heads(
                str(final), heads_dir, retrieval_heads.RetrievalSettings(**common), device=device
            )
        if not trace_done:
            trace.run_trace(
                run_dir, trace_dir,
                trace.TraceSettings(**common, last_queries=a.last_queries), device=device,
            )  # fmt: skip
    _say(f"{name}: retrieval heads and trace written")


def run_study(
    study: StudyConfig, out: Path, device: str = "auto", analysis: bool = True
) -> dict[str, Any]:
    """Every stage for every run, then the report; returns the report's data."""
    from hybrid_megatron.analysis.study.report import write_report
    from hybrid_megatron.eval.models import CACHE_ENV

    out = Path(out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault(CACHE_ENV, str((out / "converted").absolute()))
    do_heads = analysis and study.analysis.enabled
    t0 = time.perf_counter()
    runs = study.runs()
    _say(f"{study.name}: {len(runs)} runs ({len(study.variants)} variants x seeds "
         f"{study.seeds}) under {out}")  # fmt: skip
    for variant, seed in runs:
        name = study.run_name(variant, seed)
        run_dir = out / "runs" / name
        train(study, variant, seed, run_dir, logs)
        evaluate(study, name, run_dir, out, logs, device)
        if do_heads:
            analyse(study, name, run_dir, out, logs, device)
    data = write_report(study, out, heads=do_heads)
    _say(f"done in {time.perf_counter() - t0:.0f}s: {out / 'report.md'}")
    return data

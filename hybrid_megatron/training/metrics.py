"""Training metrics: one JSON line per logged step in `run_dir/metrics.jsonl`, plus
TensorBoard scalars under `run_dir/tensorboard/`.

Train rows: {"step", "split": "train", "consumed_samples", "tokens", "loss", "lr",
"grad_norm", "tokens_per_s", "tflops_per_device", "mfu", "mem_gb", "elapsed_s"} with null
for unknown values (`mfu` is a fraction; NaN/inf are written as null so every line is
strict JSON). Validation rows: {"step", "split": "valid", "loss", "ppl"}. Retrieval-monitor
rows (`train.retrieval_monitor_interval`): {"step", "split": "retrieval", ...}, see
`hybrid_megatron/analysis/monitor.py`.

On resume call `truncate_after(resumed_step)` before logging: rows an interrupted run wrote
after its last checkpoint are dropped (atomically), and TensorBoard purges them too.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import IO, Any

import torch

from hybrid_megatron.jsonl import read_records

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
TRAIN_KEYS = (
    "consumed_samples",
    "tokens",
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "tflops_per_device",
    "mfu",
    "mem_gb",
    "elapsed_s",
)

__all__ = ["MetricsWriter", "memory_gb", "read_metrics"]


def _clean(value: Any) -> Any:
    """JSON-safe scalar: tensors / numpy scalars to Python numbers, NaN/inf to None."""
    if hasattr(value, "item") and not isinstance(value, (int, float, str)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl file (or of `path/metrics.jsonl` for a run dir), in file order.

    Lines that are not valid JSON (a line cut off by a crash) are skipped with a warning."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    rows, bad = read_records(path, "step")
    if bad:
        warnings.warn(f"{path}: skipped {bad} unreadable line(s)", stacklevel=2)
    return rows


def memory_gb(device: torch.device | str | None = None) -> float | None:
    """Peak CUDA memory allocated on `device` (GB, 1e9 bytes), or this process's RSS on CPU."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / 1e9


class MetricsWriter:
    """Appends metric rows to `run_dir/metrics.jsonl` and TensorBoard; no-op when disabled
    (use `enabled=` on every rank but one)."""

    _warned_no_tensorboard = False

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / METRICS_FILE
        self._tensorboard = tensorboard
        self._file: IO[str] | None = None
        self._tb: Any = None
        self._tb_failed = False
        self._purge_step: int | None = None

    # ------------------------------------------------------------------ logging

    def log_train(self, step: int, **values: Any) -> dict | None:
        """Write a train row; keys of TRAIN_KEYS not given are null. Extra keys are kept."""
        row = {"step": step, "split": "train", **dict.fromkeys(TRAIN_KEYS)}
        row.update(values)
        return self.log(row)

    def log_valid(self, step: int, loss: float, **values: Any) -> dict | None:
        """Write a validation row with perplexity exp(loss)."""
        loss = _clean(loss)
        ppl = None if loss is None or loss > 700 else math.exp(loss)
        return self.log({"step": step, "split": "valid", "loss": loss, "ppl": ppl, **values})

    def log(self, row: dict) -> dict | None:
        """Write any row holding an int `step`; returns the row as written."""
        if not self.enabled:
            return None
        if not isinstance(row.get("step"), int):
            raise ValueError(f"metrics row needs an integer 'step', got {row!r}")
        row = {k: _clean(v) for k, v in row.items()}
        f = self._open()
        f.write(json.dumps(row, allow_nan=False) + "\n")
        f.flush()
        self._tensorboard_scalars(row)
        return row

    # ------------------------------------------------------------------ resume

    def truncate_after(self, step: int) -> int:
        """Keep only rows with step <= `step` (atomic rewrite); returns rows dropped.

        Call on resume from the checkpoint of `step`, before logging anything."""
        if not self.enabled:
            return 0
        self._purge_step = step + 1
        if self._tb is not None:  # reopen so TensorBoard purges later events too
            self._tb.close()
            self._tb = None
        if not self.path.exists():
            return 0
        self._close_file()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = read_metrics(self.path)
        kept = [r for r in rows if isinstance(r["step"], int) and r["step"] <= step]
        fd, tmp = tempfile.mkstemp(dir=self.run_dir, prefix=f".{METRICS_FILE}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for r in kept:
                    f.write(json.dumps(r) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return len(rows) - len(kept)

    # ------------------------------------------------------------------ files

    def _open(self) -> IO[str]:
        if self._file is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # a crash can leave a last line without its newline: start on a fresh line
            needs_newline = False
            if self.path.exists() and self.path.stat().st_size:
                with open(self.path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    needs_newline = f.read(1) != b"\n"
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
            if needs_newline:
                self._file.write("\n")
        return self._file

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _tensorboard_scalars(self, row: dict) -> None:
        if not self._tensorboard or self._tb_failed:
            return
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                self._tb_failed = True
                if not MetricsWriter._warned_no_tensorboard:
                    MetricsWriter._warned_no_tensorboard = True
                    warnings.warn(
                        f"TensorBoard logging is off ({e}); metrics still go to "
                        f"{self.path}. Install it with `pip install tensorboard`.",
                        stacklevel=3,
                    )
                return
            self._tb = SummaryWriter(
                str(self.run_dir / TENSORBOARD_DIR), purge_step=self._purge_step
            )
        split = row.get("split", "train")
        for key, value in row.items():
            if key in ("step", "split") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                self._tb.add_scalar(f"{split}/{key}", value, row["step"])
        self._tb.flush()

    def close(self) -> None:
        self._close_file()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

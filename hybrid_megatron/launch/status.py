"""The status file a training run leaves for its Slurm job script.

The job script requeues a run that stopped early on its time-limit warning and never one that
finished; it learns which from `"finished": true/false` in this file (written by rank 0 of
`hybrid-megatron train` when `HM_TRAIN_STATUS` names a path).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_train_status(path: str | os.PathLike, result: Any, steps: int) -> None:
    """Write {finished, iteration, steps, stopped_by, checkpoint} atomically to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    status = {
        "finished": result.iteration >= steps,
        "iteration": result.iteration,
        "steps": steps,
        "stopped_by": result.stopped_by,
        "checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
    }
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(status) + "\n")
    os.replace(tmp, path)

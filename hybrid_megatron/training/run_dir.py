"""Checks on an existing run dir before a run resumes in it (no torch imports)."""

from __future__ import annotations

from pathlib import Path

import yaml

from hybrid_megatron.checkpoint.layout import find_latest_valid
from hybrid_megatron.config import RunConfig, to_dict
from hybrid_megatron.errors import ConfigError

# model keys that choose kernels, not weights: changing them on resume is fine
_RESUMABLE_MODEL_KEYS = ("attention_backend", "mamba_backend")


def has_checkpoint(ckpt_root: Path) -> bool:
    return find_latest_valid(ckpt_root, verify_checksums=False, quiet=True) is not None


def check_same_model(cfg: RunConfig, run_dir: Path) -> None:
    """Refuse to resume (or report as finished) a run dir whose saved model differs."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    old = (yaml.safe_load(saved.read_text()) or {}).get("model", {})
    new = to_dict(cfg)["model"]
    diffs = [
        k
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k) and k not in _RESUMABLE_MODEL_KEYS
    ]
    if diffs and has_checkpoint(run_dir / "checkpoints"):
        raise ConfigError(
            f"{run_dir} holds checkpoints of a different model (changed: "
            f"{', '.join('model.' + d for d in diffs)}). Use a new run_dir, or start from those "
            "weights in a new run with train.init_from."
        )

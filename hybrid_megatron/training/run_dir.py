"""Checks on an existing run dir before a run resumes in it (no torch imports)."""

from __future__ import annotations

from pathlib import Path

import yaml

from hybrid_megatron.checkpoint.layout import RUN_CONFIG_FILE, CheckpointInfo, find_latest_valid
from hybrid_megatron.config import RunConfig, to_dict
from hybrid_megatron.errors import ConfigError

# model keys that choose kernels, not weights: changing them on resume is fine
_RESUMABLE_MODEL_KEYS = ("attention_backend", "mamba_backend")


def has_checkpoint(ckpt_root: Path) -> bool:
    return find_latest_valid(ckpt_root, verify_checksums=False, quiet=True) is not None


def _model_diffs(old: dict, new: dict) -> list[str]:
    return [
        k
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k) and k not in _RESUMABLE_MODEL_KEYS
    ]


def check_checkpoint_model(cfg: RunConfig, info: CheckpointInfo) -> None:
    """Refuse to resume from a checkpoint whose recorded run config has another model (a
    foreign checkpoint), instead of failing inside Megatron with a shape mismatch."""
    saved = info.path / RUN_CONFIG_FILE
    try:
        old = (yaml.safe_load(saved.read_text()) or {}).get("model", {})
    except (OSError, yaml.YAMLError):
        return  # older checkpoints may lack it; the load itself checks shapes
    diffs = _model_diffs(old, to_dict(cfg)["model"])
    if diffs:
        raise ConfigError(
            f"checkpoint {info.path} was written by a different model (changed: "
            f"{', '.join('model.' + d for d in diffs)}; its config is {saved}), so this run "
            "cannot resume from it. Resume with the config it was saved with, move that "
            f"checkpoint out of {info.path.parent}, or use a new run_dir (train.init_from "
            "starts a new run from a checkpoint's weights)."
        )


def check_same_model(cfg: RunConfig, run_dir: Path) -> None:
    """Refuse to resume (or report as finished) a run dir whose saved model differs: its
    config.yaml, or the run config recorded in the checkpoint a resume would load."""
    ckpt_root = run_dir / "checkpoints"
    saved = run_dir / "config.yaml"
    if saved.is_file():
        old = (yaml.safe_load(saved.read_text()) or {}).get("model", {})
        diffs = _model_diffs(old, to_dict(cfg)["model"])
        if diffs and has_checkpoint(ckpt_root):
            raise ConfigError(
                f"{run_dir} holds checkpoints of a different model (changed: "
                f"{', '.join('model.' + d for d in diffs)}). Use a new run_dir, or start from "
                "those weights in a new run with train.init_from."
            )
    if cfg.checkpoint.resume:
        newest = find_latest_valid(ckpt_root, verify_checksums=False, quiet=True)
        if newest is not None:
            check_checkpoint_model(cfg, newest)


def check_steps_not_below(cfg: RunConfig, done: int | None) -> None:
    """Asking for fewer steps than the run dir already holds is a mistake, not "finished"."""
    if done is not None and done > cfg.train.steps:
        raise ConfigError(
            f"{cfg.resolved_run_dir} already holds {done} trained steps, more than "
            f"train.steps={cfg.train.steps} (--steps): there is nothing to train, and its "
            f"results are those of step {done}. Pass --steps {done} (or more, to train on), or "
            "use a new run_dir for a shorter run."
        )

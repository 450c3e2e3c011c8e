"""Cluster options of a Slurm launch, and the profile file that supplies their defaults.

A profile is a YAML mapping whose keys are `SlurmOptions` fields, e.g.

    partition: gpu
    account: my-lab
    gpus_per_node: 8
    cpus_per_task: 8
    container_image: /shared/images/hybrid-megatron.sqsh
    container_mounts: [/shared:/shared]
    env: {NCCL_IB_HCA: mlx5}
    setup: ["module load cuda/12.4"]

It is read from `--profile FILE`, else `$HYBRID_MEGATRON_SLURM_PROFILE`, else
`$XDG_CONFIG_HOME/hybrid-megatron/slurm.yaml` (default `~/.config/...`) when that exists.
Command-line options win over the profile; `env` merges key by key (`--env KEY=` drops a key)
and `setup`, `sbatch_args`, `srun_args` append to the profile's lists.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import yaml

from hybrid_megatron.errors import ConfigError

PROFILE_ENV = "HYBRID_MEGATRON_SLURM_PROFILE"
LaunchMode = Literal["srun", "torchrun"]
MIN_SIGNAL_MARGIN_S = 60  # Slurm may deliver the --signal warning up to ~60 s early


@dataclass
class SlurmOptions:
    """What a job asks of the cluster, beyond the run config."""

    nodes: int = 1
    gpus_per_node: int | None = None  # required (0 for CPU clusters)
    tasks_per_node: int | None = None  # ranks per node: the GPUs per node, else 1
    cpus_per_task: int | None = None  # CPUs per rank; also OMP_NUM_THREADS
    mode: LaunchMode = "srun"  # srun: one task per rank; torchrun: one agent per node
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    reservation: str | None = None
    time: str = "24:00:00"
    exclusive: bool = False
    container_image: str | None = None  # pyxis/enroot: srun --container-image
    container_mounts: list[str] = field(default_factory=list)  # SRC:DST[:FLAGS]
    env: dict[str, str] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)  # shell lines run before the launch
    log_dir: str | None = None  # default RUN_DIR/logs
    job_name: str | None = None  # default hm-<config name>
    python: str | None = None  # default: this Python, or `python` inside a container
    signal_seconds: int = 180  # USR1 to the batch shell this long before the time limit
    requeue: bool = True
    max_restarts: int = 100
    array_parallel: int | None = None  # eval sweeps: array tasks running at once (%N)
    sbatch_args: list[str] = field(default_factory=list)
    srun_args: list[str] = field(default_factory=list)

    @property
    def ranks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


_MERGED_LISTS = ("setup", "sbatch_args", "srun_args")


def default_profile_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "hybrid-megatron" / "slurm.yaml"


def find_profile(explicit: str | None) -> Path | None:
    """The profile to read: --profile, else $HYBRID_MEGATRON_SLURM_PROFILE, else the default
    location when it exists. A named file that does not exist is an error."""
    for source, value in (("--profile", explicit), (PROFILE_ENV, os.environ.get(PROFILE_ENV))):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise ConfigError(f"Slurm profile {path} (from {source}) does not exist.")
            return path
    path = default_profile_path()
    return path if path.is_file() else None


def load_profile(path: Path | None) -> dict:
    """The profile's options as a dict of SlurmOptions fields (checked for unknown keys)."""
    if path is None:
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"Slurm profile {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"Slurm profile {path} must hold a mapping of options.")
    names = {f.name for f in fields(SlurmOptions)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"Slurm profile {path}: unknown key(s) {unknown}. Valid keys: {sorted(names)}."
        )
    if "env" in data:
        data["env"] = parse_env(data["env"], f"profile {path}: env")
    return data


def parse_env(items: dict | list[str], where: str) -> dict[str, str]:
    """{NAME: value} from a mapping or KEY=VALUE strings; checks the names."""
    if isinstance(items, dict):
        pairs = [(str(k), "" if v is None else str(v)) for k, v in items.items()]
    else:
        pairs = []
        for item in items:
            if "=" not in item:
                raise ConfigError(f"{where}: '{item}' must look like NAME=VALUE.")
            pairs.append(tuple(item.split("=", 1)))
    for name, _ in pairs:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"{where}: '{name}' is not a valid environment variable name.")
    return dict(pairs)


def merge_options(profile: dict, cli: dict) -> SlurmOptions:
    """Profile values under command-line values (None on the command line = not given)."""
    from hybrid_megatron.config import from_dict

    merged = dict(profile)
    for key, value in cli.items():
        if value is None:
            continue
        if key == "env":
            merged["env"] = {**merged.get("env", {}), **value}
        elif key in _MERGED_LISTS:
            merged[key] = [*merged.get(key, []), *value]
        else:
            merged[key] = value
    options = from_dict(SlurmOptions, merged, "slurm")
    check_options(options)
    return options


def parse_time(text: str) -> int | None:
    """Seconds in a Slurm time limit (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S); None: unlimited."""
    text = str(text).strip()
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise ConfigError(
            f"--time {text!r} is not a Slurm time limit; use minutes, MM:SS, HH:MM:SS or "
            "D-HH:MM:SS."
        )
    days, a, b, c = m.groups()
    a, b, c = int(a), int(b) if b else None, int(c) if c else None
    if days is not None:  # D-H, D-H:M, D-H:M:S
        return int(days) * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:  # H:M:S
        return a * 3600 + b * 60 + c
    if b is not None:  # M:S
        return a * 60 + b
    return a * 60  # M


def check_options(o: SlurmOptions) -> None:
    """Rules between the options themselves (the config is checked separately)."""
    if o.gpus_per_node is None:
        raise ConfigError(
            "Pass --gpus-per-node G (0 for a CPU cluster), or set gpus_per_node in the Slurm "
            "profile."
        )
    for name in ("nodes", "tasks_per_node", "cpus_per_task", "array_parallel"):
        value = getattr(o, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")
    if o.gpus_per_node < 0 or o.max_restarts < 0 or o.signal_seconds < 1:
        raise ConfigError(
            "--gpus-per-node and --max-restarts must be >= 0 and --signal-seconds >= 1."
        )
    if o.gpus_per_node and o.tasks_per_node not in (None, o.gpus_per_node):
        raise ConfigError(
            f"--tasks-per-node {o.tasks_per_node} differs from --gpus-per-node "
            f"{o.gpus_per_node}: training runs one rank per GPU. Drop --tasks-per-node (or "
            "request as many GPUs per node as ranks)."
        )
    limit = parse_time(o.time)
    if o.requeue and limit is not None and limit <= o.signal_seconds + MIN_SIGNAL_MARGIN_S:
        raise ConfigError(
            f"--time {o.time} ({limit} s) leaves no room for the checkpoint warning "
            f"--signal-seconds {o.signal_seconds} (Slurm may send it up to "
            f"{MIN_SIGNAL_MARGIN_S} s early): raise --time above "
            f"{o.signal_seconds + MIN_SIGNAL_MARGIN_S} s, lower --signal-seconds, or pass "
            "--no-requeue."
        )
    if o.container_mounts and not o.container_image:
        raise ConfigError("--container-mounts needs --container-image.")

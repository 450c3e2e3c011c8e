"""The toy-study file (configs/experiments/*.yaml): which runs, how they are evaluated.

```yaml
name: toy_study
base: ../tiny.yaml             # run config every variant starts from (relative to this file)
seeds: [0, 1]                  # each variant trains once per seed (train.seed)
set: [train.steps=1400]        # overrides for every run
variants:
  swa16: {description: "...", set: [model.pattern=S-S-*-S-S-*-, model.swa.window=16]}
  ...
eval: {tasks: [niah_single_1, passkey], lengths: [256], num_samples: 20,
       max_new_tokens: null, batch_size: 8, emergence_score: 50}
analysis: {enabled: true, task: niah_single_1, length: 256, num_samples: 10, top_k: 8,
           max_new_tokens: 16, threshold: 0.1, last_queries: 8}
```

Every run keeps all its checkpoints and skips the pipeline after training (the study
evaluates every checkpoint itself). Loading validates every run's config before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hybrid_megatron.errors import ConfigError

# What every study run overrides in its base config (after the study's and variant's `set`).
RUN_OVERRIDES = (
    "checkpoint.keep_last=null",
    "after_training.eval_tasks=[]",
    "after_training.convert_to_hf=false",
    "after_training.recall_probe=false",
)


@dataclass
class Variant:
    name: str
    description: str = ""
    set: list[str] = field(default_factory=list)


@dataclass
class StudyEval:
    tasks: list[str] = field(default_factory=lambda: ["niah_single_1", "passkey"])
    lengths: list[int] = field(default_factory=lambda: [256])
    num_samples: int = 20
    max_new_tokens: int | None = None
    batch_size: int = 1
    emergence_score: float = 50.0  # score (0-100) at which an ability counts as emerged


@dataclass
class StudyAnalysis:
    enabled: bool = True
    task: str = "niah_single_1"
    length: int = 256
    num_samples: int = 10
    top_k: int = 8
    max_new_tokens: int = 16
    threshold: float = 0.1  # copy-paste score of a retrieval head (Wu et al.)
    last_queries: int = 8


@dataclass
class StudyConfig:
    path: Path
    name: str
    base: Path
    seeds: list[int]
    set: list[str]
    variants: list[Variant]
    eval: StudyEval
    analysis: StudyAnalysis

    def runs(self) -> list[tuple[Variant, int]]:
        return [(v, s) for v in self.variants for s in self.seeds]

    @staticmethod
    def run_name(variant: Variant, seed: int) -> str:
        return f"{variant.name}_s{seed}"

    def overrides(self, variant: Variant, seed: int) -> list[str]:
        return [*self.set, *variant.set, f"train.seed={seed}", *RUN_OVERRIDES]


def _section(data: dict, key: str, cls: type, where: str) -> Any:
    raw = data.get(key) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: '{key}' must be a mapping")
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} in '{key}'; known: {sorted(known)}")
    return cls(**raw)


def _str_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of 'section.key=value' strings")
    return list(value)


def load_study(path: str | Path, seeds: list[int] | None = None, only: list[str] | None = None):
    """Read and validate a study file; `seeds` / `only` (variant names) narrow it down."""
    from hybrid_megatron.config import load_config

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist (see configs/experiments/)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a YAML mapping (name, base, variants, ...)")
    where = str(path)
    known = {"name", "base", "seeds", "set", "variants", "eval", "analysis"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    if "base" not in data:
        raise ConfigError(f"{where}: 'base' (the run config every variant starts from) is missing")
    base = (path.parent / data["base"]).resolve()
    if not base.is_file():
        raise ConfigError(f"{where}: base config {base} does not exist")
    raw_variants = data.get("variants") or {}
    if not isinstance(raw_variants, dict) or not raw_variants:
        raise ConfigError(f"{where}: 'variants' must map names to {{description, set}}")
    variants = []
    for name, spec in raw_variants.items():
        spec = spec or {}
        if not isinstance(spec, dict) or set(spec) - {"description", "set"}:
            raise ConfigError(f"{where}: variant '{name}' takes only 'description' and 'set'")
        variants.append(
            Variant(str(name), str(spec.get("description", "")),
                    _str_list(spec.get("set"), f"{where}: variants.{name}.set"))
        )  # fmt: skip
    if only:
        missing = sorted(set(only) - {v.name for v in variants})
        if missing:
            raise ConfigError(
                f"--only {missing}: no such variant; {where} has {[v.name for v in variants]}"
            )
        variants = [v for v in variants if v.name in only]
    file_seeds = data.get("seeds", [0])
    if not isinstance(file_seeds, list) or not all(isinstance(s, int) for s in file_seeds):
        raise ConfigError(f"{where}: 'seeds' must be a list of integers")
    study = StudyConfig(
        path=path,
        name=str(data.get("name") or path.stem),
        base=base,
        seeds=list(seeds) if seeds else file_seeds,
        set=_str_list(data.get("set"), f"{where}: set"),
        variants=variants,
        eval=_section(data, "eval", StudyEval, where),
        analysis=_section(data, "analysis", StudyAnalysis, where),
    )
    if study.eval.emergence_score <= 0 or study.eval.emergence_score > 100:
        raise ConfigError(f"{where}: eval.emergence_score must be in (0, 100]")
    for variant, seed in study.runs():  # every run's config errors now, before any training
        try:
            load_config(base, study.overrides(variant, seed))
        except ConfigError as err:
            raise ConfigError(f"{where}: variant '{variant.name}' (seed {seed}): {err}") from None
    return study

"""The layer pattern language and its compilation to Megatron-Core settings.

A pattern is a string with one symbol per layer, read left to right:

    M   Mamba-2 mixer layer
    *   full (global) causal attention
    S   sliding-window attention (window `model.swa.window`)
    -   MLP
    E   mixture-of-experts MLP (needs `model.num_moe_experts`)
    |   pipeline-stage boundary (not a layer)

Spaces are ignored, so `"M-M-S-*- | M-M-S-*-"` is valid. Each attention type has its own
options in the config (`model.full_attention`, `model.swa`): RoPE or NoPE and rope theta, and
for SWA the window.

Megatron-Core has no SWA symbol. We compile SWA and full attention both to `*` and emit the
per-layer lists Megatron reads by *global* layer number (1-based, over every position,
Mamba and MLP included): `window_attn_skip_freq` (1 = SWA) and `no_rope_freq` (1 = no RoPE).
Pipeline stages (from `|`, or an even split) compile to Megatron's
`pipeline_model_parallel_layout`, so every module agrees on each layer's global number.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hybrid_megatron.errors import ConfigError

if TYPE_CHECKING:  # the config imports this module: types only, so imports point one way
    from hybrid_megatron.config import ModelConfig, ParallelConfig


class LayerKind(enum.StrEnum):
    MAMBA = "M"
    FULL_ATTENTION = "*"
    SLIDING_WINDOW = "S"
    MLP = "-"
    MOE = "E"

    @property
    def is_attention(self) -> bool:
        return self in (LayerKind.FULL_ATTENTION, LayerKind.SLIDING_WINDOW)

    @property
    def megatron_symbol(self) -> str:
        return "*" if self.is_attention else self.value


STAGE_BOUNDARY = "|"
_KNOWN = {k.value for k in LayerKind} | {STAGE_BOUNDARY}
_NOT_IN_THIS_MEGATRON = {"G": "gated delta-net ('G')"}


@dataclass(frozen=True)
class LayerPlan:
    """What one layer is, as built: kind, window (tokens, None = full) and RoPE setting."""

    number: int  # global, 1-based (Megatron's layer_number)
    kind: LayerKind
    window: int | None
    rope: bool | None  # None for non-attention layers
    rope_theta: float | None


@dataclass(frozen=True)
class CompiledPattern:
    """A pattern compiled for one model + parallel layout."""

    layers: tuple[LayerPlan, ...]
    stages: tuple[tuple[int, int], ...]
    """Half-open [start, end) ranges of 0-based layer indices, one per model chunk in
    Megatron's order (virtual stage v of pipeline rank r is entry v * pp + r)."""
    megatron_pattern: str
    window_attn_skip_freq: list[int]
    no_rope_freq: list[int]
    window_size: tuple[int, int] | None
    """Megatron/TE/flash-attn (left, right) window for SWA layers: (W - 1, 0)."""

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def pipeline_layout(self) -> list[list[str]] | None:
        """Megatron `pipeline_model_parallel_layout` (embedding 'E' first, loss 'L' last)."""
        if len(self.stages) == 1:
            return None
        layout = [["t"] * (end - start) for start, end in self.stages]
        layout[0].insert(0, "embedding")
        layout[-1].append("loss")
        return [[("decoder" if s == "t" else s) for s in stage] for stage in layout]

    def stage_of(self, pp_rank: int, vp_stage: int = 0, pp_size: int = 1) -> tuple[int, int]:
        return self.stages[vp_stage * pp_size + pp_rank]


def parse_pattern(pattern: str) -> list[list[LayerKind]]:
    """Split a pattern into stages of layer kinds, with clear errors for bad symbols."""
    text = "".join(pattern.split())
    if not text.replace(STAGE_BOUNDARY, ""):
        raise ConfigError("model.pattern is empty; give one symbol per layer, e.g. 'M-S-*-'.")
    # Positions index the pattern as the user wrote it (spaces included), so they match
    # the pattern quoted in the message.
    for pos, ch in enumerate(pattern):
        if ch.isspace():
            continue
        if ch in _NOT_IN_THIS_MEGATRON:
            raise ConfigError(
                f"model.pattern symbol '{ch}' ({_NOT_IN_THIS_MEGATRON[ch]}) is not supported by "
                "this build; use M, *, S, -, E or |."
            )
        if ch not in _KNOWN:
            raise ConfigError(
                f"Unknown symbol '{ch}' at position {pos} of model.pattern '{pattern}'. "
                "Valid symbols: M (Mamba-2), * (full attention), S (sliding-window attention), "
                "- (MLP), E (MoE), | (pipeline-stage boundary)."
            )
    return [[LayerKind(ch) for ch in stage] for stage in text.split(STAGE_BOUNDARY)]


def _split_stages(
    stages: list[list[LayerKind]], num_layers: int, parallel: ParallelConfig | None
) -> list[tuple[int, int]]:
    chunks = (parallel.pipeline * (parallel.virtual_pipeline or 1)) if parallel else 1
    if len(stages) > 1:
        if len(stages) != chunks:
            raise ConfigError(
                f"model.pattern has {len(stages)} pipeline stages ('|' boundaries) but "
                f"parallel.pipeline * parallel.virtual_pipeline = {chunks}; add or remove '|' "
                "or change the pipeline sizes."
            )
        for i, stage in enumerate(stages):
            if not stage:
                raise ConfigError(
                    f"Pipeline stage {i} of model.pattern gets no layers (two '|' in a row, or "
                    "'|' at an end); every stage needs at least one layer."
                )
        ranges, start = [], 0
        for stage in stages:
            ranges.append((start, start + len(stage)))
            start += len(stage)
        return ranges
    if num_layers % chunks:
        raise ConfigError(
            f"{num_layers} layers cannot be split evenly over {chunks} pipeline stages; "
            "mark the stage boundaries with '|' in model.pattern or change parallel.pipeline."
        )
    if num_layers < chunks:
        raise ConfigError(f"{num_layers} layers leave some of the {chunks} pipeline stages empty.")
    per = num_layers // chunks
    return [(i * per, (i + 1) * per) for i in range(chunks)]


def compile_pattern(model: ModelConfig, parallel: ParallelConfig | None = None) -> CompiledPattern:
    """Compile `model.pattern` to per-layer plans and Megatron-Core's settings (no `parallel`:
    one pipeline stage)."""
    stages = parse_pattern(model.pattern)
    kinds = [k for stage in stages for k in stage]
    if model.num_layers is not None and model.num_layers != len(kinds):
        raise ConfigError(
            f"model.num_layers={model.num_layers} but model.pattern has {len(kinds)} layer "
            "symbols; drop num_layers or make them agree."
        )
    if LayerKind.SLIDING_WINDOW in kinds and model.swa.window is None:
        raise ConfigError("model.pattern uses 'S' but model.swa.window is not set.")
    if LayerKind.MOE in kinds and not model.num_moe_experts:
        raise ConfigError("model.pattern uses 'E' but model.num_moe_experts is not set.")
    if not any(k.is_attention or k == LayerKind.MAMBA for k in kinds):
        raise ConfigError(
            "model.pattern has no sequence mixer (M, * or S); tokens could not see each other."
        )
    ranges = _split_stages(stages, len(kinds), parallel)

    layers = []
    for i, kind in enumerate(kinds):
        if kind.is_attention:
            opts = model.swa if kind == LayerKind.SLIDING_WINDOW else model.full_attention
            window = model.swa.window if kind == LayerKind.SLIDING_WINDOW else None
            layers.append(
                LayerPlan(i + 1, kind, window, opts.rope, opts.rope_theta if opts.rope else None)
            )
        else:
            layers.append(LayerPlan(i + 1, kind, None, None, None))
    has_swa = LayerKind.SLIDING_WINDOW in kinds
    return CompiledPattern(
        layers=tuple(layers),
        stages=tuple(ranges),
        megatron_pattern="".join(k.megatron_symbol for k in kinds),
        window_attn_skip_freq=[int(k == LayerKind.SLIDING_WINDOW) for k in kinds],
        no_rope_freq=[int(p.kind.is_attention and not p.rope) for p in layers],
        window_size=(model.swa.window - 1, 0) if has_swa else None,
    )

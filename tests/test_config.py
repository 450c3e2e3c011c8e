"""Unit tests for the run config (`hybrid_megatron.config`) and the pattern compiler
(`hybrid_megatron.pattern`).

Pure Python: no process groups, no model building. The whole file runs in a few seconds.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from hybrid_megatron.config import (
    ModelConfig,
    ParallelConfig,
    RunConfig,
    from_dict,
    load_config,
    to_dict,
)
from hybrid_megatron.errors import ConfigError
from hybrid_megatron.pattern import LayerKind, compile_pattern, parse_pattern

REPO_ROOT = Path(__file__).resolve().parent.parent
# Run configs; configs/experiments/ holds study files (`analyze study`, see test_analysis_study)
CONFIG_FILES = sorted(
    p
    for p in [*REPO_ROOT.glob("configs/**/*.yaml"), *REPO_ROOT.glob("configs/**/*.yml")]
    if "experiments" not in p.relative_to(REPO_ROOT).parts
)

# A small, valid base config; each test changes what it needs.
BASE = {
    "model": {
        "pattern": "M-S-*-",
        "hidden_size": 256,
        "num_attention_heads": 4,
        "vocab_size": 512,
        "seq_length": 256,
        "full_attention": {"rope": True, "rope_theta": 500000},
        "swa": {"window": 32, "rope": True, "rope_theta": 10000},
    },
    "parallel": {"tensor": 1, "pipeline": 1},
}


def _set(data: dict, dotted: str, value) -> None:
    node = data
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def make_cfg(changes: dict | None = None, world_size: int | None = None) -> RunConfig:
    """Build BASE with `{"a.b.c": value}` changes through from_dict, then validate it."""
    data = copy.deepcopy(BASE)
    for key, value in (changes or {}).items():
        _set(data, key, value)
    cfg = from_dict(RunConfig, data)
    cfg.validate(world_size=world_size)
    return cfg


def compiled(pattern: str, **changes):
    cfg = make_cfg({"model.pattern": pattern, **changes})
    return cfg, compile_pattern(cfg.model, cfg.parallel)


def layer_symbols(pattern: str) -> str:
    return "".join(ch for ch in pattern if ch not in "| \t\n")


# --------------------------------------------------------------------------- pattern compiling


@pytest.mark.parametrize(
    "pattern, changes, megatron, swa_freq, nope_freq, stages, decoders",
    [
        pytest.param(
            "M-S-*-",
            {},
            "M-*-*-",
            [0, 0, 1, 0, 0, 0],
            [0, 0, 0, 0, 0, 0],
            [(0, 6)],
            None,
            id="no-pipeline",
        ),
        pytest.param(
            "M-S-*-",
            {"parallel.pipeline": 2},
            "M-*-*-",
            [0, 0, 1, 0, 0, 0],
            [0, 0, 0, 0, 0, 0],
            [(0, 3), (3, 6)],
            [3, 3],
            id="even-split-pp2",
        ),
        pytest.param(
            "S*S*|*S-M",
            {"parallel.pipeline": 2, "model.full_attention.rope": False},
            "******-M",
            [1, 0, 1, 0, 0, 1, 0, 0],
            [0, 1, 0, 1, 1, 0, 0, 0],  # layer 5 (NoPE full attention) right after '|'
            [(0, 4), (4, 8)],
            [4, 4],
            id="nope-after-boundary",
        ),
        pytest.param(
            "M-M-|S-*-",
            {"parallel.pipeline": 2},
            "M-M-*-*-",
            [0, 0, 0, 0, 1, 0, 0, 0],  # layer 5 (SWA) right after '|'
            [0, 0, 0, 0, 0, 0, 0, 0],
            [(0, 4), (4, 8)],
            [4, 4],
            id="swa-after-boundary",
        ),
        pytest.param(
            "*-*-|*-*-|S-S-|M-M-",
            {"parallel.pipeline": 2, "parallel.virtual_pipeline": 2},
            "*-*-*-*-*-*-M-M-",
            [0] * 8 + [1, 0, 1, 0] + [0] * 4,
            [0] * 16,
            [(0, 4), (4, 8), (8, 12), (12, 16)],
            [4, 4, 4, 4],
            id="pp2-vp2-explicit",
        ),
        pytest.param(
            "M-*-M-S-",
            {"parallel.pipeline": 2, "parallel.virtual_pipeline": 2},
            "M-*-M-*-",
            [0, 0, 0, 0, 0, 0, 1, 0],
            [0] * 8,
            [(0, 2), (2, 4), (4, 6), (6, 8)],
            [2, 2, 2, 2],
            id="pp2-vp2-even-split",
        ),
        pytest.param(
            "M-|S*-|M-M*-|S",
            {"parallel.pipeline": 4, "model.swa.rope": False},
            "M-**-M-M*-*",
            [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1],
            [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1],  # SWA layers are NoPE, full attention has RoPE
            [(0, 2), (2, 5), (5, 10), (10, 11)],
            [2, 3, 5, 1],
            id="uneven-explicit-pp4",
        ),
        pytest.param(
            " M - M - S - * -  |  M - M - S - * - ",
            {"parallel.pipeline": 2},
            "M-M-*-*-M-M-*-*-",
            [0, 0, 0, 0, 1, 0, 0, 0] * 2,
            [0] * 16,
            [(0, 8), (8, 16)],
            [8, 8],
            id="spaces",
        ),
        pytest.param(
            "M-S-*E",
            {"model.num_moe_experts": 4},
            "M-*-*E",
            [0, 0, 1, 0, 0, 0],
            [0] * 6,
            [(0, 6)],
            None,
            id="moe",
        ),
        pytest.param(
            "*-*-",
            {"model.full_attention.rope": False},
            "*-*-",
            [0, 0, 0, 0],
            [1, 0, 1, 0],
            [(0, 4)],
            None,
            id="full-only-nope",
        ),
    ],
)
def test_compile_pattern(pattern, changes, megatron, swa_freq, nope_freq, stages, decoders):
    cfg, cp = compiled(pattern, **changes)
    m = cfg.model
    symbols = layer_symbols(pattern)

    # S compiles to *, '|' and spaces disappear
    assert cp.megatron_pattern == megatron
    assert "S" not in cp.megatron_pattern and "|" not in cp.megatron_pattern
    assert cp.megatron_pattern == symbols.replace("S", "*")

    # one entry per layer (every position), 1 exactly at SWA / NoPE attention positions
    assert cp.num_layers == len(symbols) == len(cp.megatron_pattern)
    assert cp.window_attn_skip_freq == swa_freq
    assert cp.no_rope_freq == nope_freq
    assert len(cp.window_attn_skip_freq) == len(cp.no_rope_freq) == cp.num_layers
    assert cp.window_attn_skip_freq == [int(ch == "S") for ch in symbols]
    nope = {"S": not m.swa.rope, "*": not m.full_attention.rope}
    assert cp.no_rope_freq == [int(nope.get(ch, False)) for ch in symbols]

    # LayerPlans: 1-based global numbers, kinds in order
    assert [p.number for p in cp.layers] == list(range(1, len(symbols) + 1))
    assert [p.kind.value for p in cp.layers] == list(symbols)

    # stages and the Megatron pipeline layout
    assert [tuple(s) for s in cp.stages] == stages
    assert cp.stages[0][0] == 0 and cp.stages[-1][1] == cp.num_layers
    for (_, end), (start, _) in zip(cp.stages, cp.stages[1:]):
        assert end == start  # contiguous, no gaps or overlaps
    layout = cp.pipeline_layout()
    if decoders is None:
        assert layout is None
    else:
        assert len(layout) == len(stages)
        assert layout[0][0] == "embedding"
        assert layout[-1][-1] == "loss"
        assert [stage.count("decoder") for stage in layout] == decoders
        flat = [s for stage in layout for s in stage]
        assert flat.count("embedding") == 1 and flat.count("loss") == 1
        assert set(flat) == {"embedding", "decoder", "loss"}

    # SWA window as Megatron's (left, right)
    if "S" in symbols:
        assert cp.window_size == (m.swa.window - 1, 0)
    else:
        assert cp.window_size is None


def test_even_split_without_boundaries():
    for pp, vp, expected in [
        (1, None, [(0, 12)]),
        (2, None, [(0, 6), (6, 12)]),
        (3, None, [(0, 4), (4, 8), (8, 12)]),
        (2, 3, [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)]),
    ]:
        _, cp = compiled(
            "M-S-*-M-S-*-", **{"parallel.pipeline": pp, "parallel.virtual_pipeline": vp}
        )
        assert [tuple(s) for s in cp.stages] == expected
        # chunk of virtual stage v on pipeline rank r is entry v * pp + r
        for v in range(vp or 1):
            for r in range(pp):
                assert cp.stage_of(r, v, pp) == expected[v * pp + r]


def test_layer_plans_rope_theta_and_window():
    _, cp = compiled("M-S-*-", **{"model.swa.window": 48})
    by_kind = {p.kind: p for p in cp.layers}
    swa, full = by_kind[LayerKind.SLIDING_WINDOW], by_kind[LayerKind.FULL_ATTENTION]
    assert (swa.window, swa.rope, swa.rope_theta) == (48, True, 10000.0)
    assert (full.window, full.rope, full.rope_theta) == (None, True, 500000.0)
    assert isinstance(full.rope_theta, float)
    for kind in (LayerKind.MAMBA, LayerKind.MLP):
        p = by_kind[kind]
        assert (p.window, p.rope, p.rope_theta) == (None, None, None)
    assert cp.window_size == (47, 0)


@pytest.mark.parametrize(
    "swa_rope, full_rope", [(True, False), (False, True), (False, False), (True, True)]
)
def test_nope_types_have_no_theta(swa_rope, full_rope):
    _, cp = compiled(
        "S*-M|*S-M",
        **{
            "parallel.pipeline": 2,
            "model.swa.rope": swa_rope,
            "model.full_attention.rope": full_rope,
        },
    )
    rope = {LayerKind.SLIDING_WINDOW: swa_rope, LayerKind.FULL_ATTENTION: full_rope}
    theta = {LayerKind.SLIDING_WINDOW: 10000.0, LayerKind.FULL_ATTENTION: 500000.0}
    for p in cp.layers:
        if p.kind.is_attention:
            assert p.rope is rope[p.kind]
            assert p.rope_theta == (theta[p.kind] if rope[p.kind] else None)
            assert cp.no_rope_freq[p.number - 1] == int(not rope[p.kind])
        else:
            assert p.rope is None and p.rope_theta is None
            assert cp.no_rope_freq[p.number - 1] == 0


def test_rope_theta_string_from_yaml_is_coerced():
    # YAML 1.1 reads "5e5" (no dot) as a string; floats accept it.
    cfg = make_cfg({"model.full_attention.rope_theta": "5e5"})
    assert cfg.model.full_attention.rope_theta == 500000.0


def test_compile_pattern_default_parallel():
    cp = compile_pattern(ModelConfig(pattern="M-S-*-"))
    assert [tuple(s) for s in cp.stages] == [(0, 6)]
    assert cp.pipeline_layout() is None
    assert cp.window_size == (127, 0)  # default swa.window is 128


def test_parse_pattern_stages():
    stages = parse_pattern(" M- | S* ")
    assert [[k.value for k in s] for s in stages] == [["M", "-"], ["S", "*"]]


# --------------------------------------------------------------------------- invalid configs

# (changes, match, world_size)
INVALID = {
    "unknown-symbol": ({"model.pattern": "M-X-"}, r"Unknown symbol 'X' at position 2", None),
    "unknown-symbol-with-spaces": (
        {"model.pattern": "M- S X"},
        r"Unknown symbol 'X' at position 5 of model.pattern 'M- S X'",
        None,
    ),
    "unknown-symbol-lowercase": (
        {"model.pattern": "m-S-"},
        r"Unknown symbol 'm' at position 0",
        None,
    ),
    "gated-deltanet-G": ({"model.pattern": "M-G-"}, r"symbol 'G'.*not supported", None),
    "empty-pattern": ({"model.pattern": ""}, r"model\.pattern is empty", None),
    "blank-pattern": ({"model.pattern": "   "}, r"model\.pattern is empty", None),
    "only-boundaries": ({"model.pattern": "||"}, r"model\.pattern is empty", None),
    "num-layers-mismatch": (
        {"model.num_layers": 5},
        r"model\.num_layers=5 but model\.pattern has 6 layer symbols",
        None,
    ),
    "heads-not-divisible-by-tp": (
        {"parallel.tensor": 3},
        r"num_attention_heads=4 is not divisible by parallel\.tensor=3",
        None,
    ),
    "query-groups-not-divisible-by-tp": (
        {"model.num_attention_heads": 8, "model.num_query_groups": 2, "parallel.tensor": 4},
        r"num_query_groups=2 is not divisible by parallel\.tensor=4",
        None,
    ),
    "mamba-heads-not-divisible-by-tp": (
        {"model.mamba.num_heads": 6, "parallel.tensor": 4},
        r"Mamba heads \(6\) are not divisible by parallel\.tensor=4; tensor parallelism",
        None,
    ),
    "window-zero": ({"model.swa.window": 0}, r"model\.swa\.window must be a positive.*got 0", None),
    "window-negative": (
        {"model.swa.window": -5},
        r"model\.swa\.window must be a positive.*got -5",
        None,
    ),
    "window-unset-with-S": (
        {"model.swa.window": None},
        r"uses 'S' but model\.swa\.window is not set",
        None,
    ),
    "full-attention-window": (
        {"model.full_attention.window": 16},
        r"model\.full_attention\.window is set; full attention has no window",
        None,
    ),
    "stage-count-vs-pipeline": (
        {"model.pattern": "M-|S-|*-", "parallel.pipeline": 2},
        r"3 pipeline stages .*parallel\.pipeline \* parallel\.virtual_pipeline = 2",
        None,
    ),
    "stage-count-vs-virtual-pipeline": (
        {"model.pattern": "M-|S*", "parallel.pipeline": 2, "parallel.virtual_pipeline": 2},
        r"2 pipeline stages .*parallel\.pipeline \* parallel\.virtual_pipeline = 4",
        None,
    ),
    "boundary-without-pipeline": (
        {"model.pattern": "M-|S*"},
        r"2 pipeline stages .*= 1",
        None,
    ),
    "empty-stage-middle": (
        {"model.pattern": "M-||*-", "parallel.pipeline": 3},
        r"Pipeline stage 1 of model\.pattern gets no layers",
        None,
    ),
    "empty-stage-leading": (
        {"model.pattern": "|M-*-", "parallel.pipeline": 2},
        r"Pipeline stage 0 of model\.pattern gets no layers",
        None,
    ),
    "empty-stage-trailing": (
        {"model.pattern": "M-*-|", "parallel.pipeline": 2},
        r"Pipeline stage 1 of model\.pattern gets no layers",
        None,
    ),
    "uneven-split-without-boundaries": (
        {"model.pattern": "M-S-*-M", "parallel.pipeline": 2},
        r"7 layers cannot be split evenly over 2 pipeline stages",
        None,
    ),
    "uneven-split-with-virtual": (
        {"model.pattern": "M-S-*-", "parallel.pipeline": 2, "parallel.virtual_pipeline": 2},
        r"6 layers cannot be split evenly over 4 pipeline stages",
        None,
    ),
    "hidden-not-divisible-by-heads": (
        {"model.hidden_size": 250},
        r"hidden_size=250 is not divisible by model\.num_attention_heads=4",
        None,
    ),
    "heads-not-divisible-by-query-groups": (
        {"model.num_query_groups": 3},
        r"num_attention_heads=4 is not divisible by model\.num_query_groups=3",
        None,
    ),
    "sequence-parallel-without-tp": (
        {"parallel.sequence_parallel": True},
        r"sequence_parallel needs parallel\.tensor > 1",
        None,
    ),
    "unknown-key-suggestion": (
        {"model.hiden_size": 256},
        r"Unknown config key 'model\.hiden_size'\. Did you mean 'hidden_size'\?",
        None,
    ),
    "unknown-top-level-key": (
        {"paralel.tensor": 2},
        r"Unknown config key 'paralel'\. Did you mean 'parallel'\?",
        None,
    ),
    "unknown-nested-key": (
        {"model.swa.windw": 8},
        r"Unknown config key 'model\.swa\.windw'\. Did you mean 'window'\?",
        None,
    ),
    "string-hidden-size": (
        {"model.hidden_size": "256"},
        r"model\.hidden_size must be of type int, got '256'",
        None,
    ),
    "bool-hidden-size": (
        {"model.hidden_size": True},
        r"model\.hidden_size must be an integer",
        None,
    ),
    "float-window": ({"model.swa.window": 32.5}, r"model\.swa\.window must be of type int", None),
    "non-bool-rope": (
        {"model.full_attention.rope": "yes"},
        r"model\.full_attention\.rope must be true or false, got 'yes'",
        None,
    ),
    "int-rope": ({"model.swa.rope": 1}, r"model\.swa\.rope must be true or false", None),
    "bad-literal": (
        {"model.activation": "relu"},
        r"model\.activation must be one of \['swiglu', 'gelu'\], got 'relu'",
        None,
    ),
    "section-not-mapping": ({"model.swa": 32}, r"model\.swa must be a mapping", None),
    "moe-without-experts": (
        {"model.pattern": "M-S-*E"},
        r"uses 'E' but model\.num_moe_experts is not set",
        None,
    ),
    "moe-topk-exceeds-experts": (
        {"model.pattern": "M-S-*E", "model.num_moe_experts": 2, "model.moe_router_topk": 4},
        r"moe_router_topk=4 exceeds model\.num_moe_experts=2",
        None,
    ),
    "no-sequence-mixer": (
        {"model.pattern": "--E-", "model.num_moe_experts": 2},
        r"no sequence mixer",
        None,
    ),
    "mamba-groups-not-divisible-by-tp": (
        {"parallel.tensor": 2},  # Megatron's MambaMixer splits B/C groups over TP ranks
        r"model\.mamba\.num_groups=1 is not divisible by parallel\.tensor=2",
        None,
    ),
    "world-size-not-divisible": (
        {"parallel.tensor": 2, "model.mamba.num_groups": 2},
        r"world size 3 is not divisible by tensor\*pipeline\*context = 2",
        3,
    ),
    "world-size-not-divisible-pp-cp": (
        {"parallel.pipeline": 2, "parallel.context": 2},
        r"world size 6 is not divisible by tensor\*pipeline\*context = 4",
        6,
    ),
    "seq-not-divisible-by-2cp": (
        {"model.seq_length": 100, "parallel.context": 4, "model.mamba.num_heads": 4},
        r"seq_length=100 must be divisible by 2 \* parallel\.context = 8 .*model\.seq_length=96",
        None,
    ),
    "seq-shorter-than-2cp-chunks": (
        {"model.seq_length": 4, "parallel.context": 4},
        r"seq_length=4 must be divisible by 2 \* parallel\.context = 8 .*model\.seq_length=8",
        None,
    ),
    "sequence-parallel-seq-not-divisible-by-tp-cp": (
        {
            "model.seq_length": 100,
            "parallel.tensor": 4,
            "parallel.context": 2,
            "parallel.sequence_parallel": True,
            "model.mamba.num_groups": 4,
        },
        r"seq_length=100 must be divisible by tensor\*context=8 with sequence parallelism",
        None,
    ),
    "retrieval-monitor-under-cp": (
        {"train.retrieval_monitor_interval": 5, "parallel.context": 2},
        r"retrieval_monitor_interval does not support context parallelism",
        None,
    ),
    "world-size-smaller-than-cp": (
        {"parallel.context": 2},
        r"world size 1 is not divisible by tensor\*pipeline\*context = 2; launch a multiple of 2",
        1,
    ),
    "zero-tensor": ({"parallel.tensor": 0}, r"parallel\.tensor must be a positive number", None),
    "zero-virtual-pipeline": (
        {"parallel.virtual_pipeline": 0},
        r"parallel\.virtual_pipeline must be a positive number",
        None,
    ),
    "zero-heads": (
        {"model.num_attention_heads": 0},
        r"model\.num_attention_heads must be a positive number",
        None,
    ),
    # issue 14.8: these used to reach torch / numpy / Megatron unchecked
    "nan-lr": ({"optimizer.lr": float("nan")}, r"optimizer\.lr must be a finite number", None),
    "negative-lr": ({"optimizer.lr": -1e-3}, r"optimizer\.lr=-0\.001", None),
    "beta1-one": ({"optimizer.beta1": 1.0}, r"optimizer\.beta1=1\.0 .* must lie in \[0, 1\)", None),
    "beta2-negative": ({"optimizer.beta2": -0.1}, r"beta2=-0\.1 must lie in \[0, 1\)", None),
    "negative-weight-decay": (
        {"optimizer.weight_decay": -0.1},
        r"optimizer\.weight_decay must be >= 0",
        None,
    ),
    "vocab-divisible-by-zero": (
        {"model.make_vocab_size_divisible_by": 0},
        r"model\.make_vocab_size_divisible_by must be a positive number",
        None,
    ),
    "negative-seed": ({"train.seed": -1}, r"train\.seed must be in \[0, 2\*\*32\)", None),
    "zero-norm-epsilon": (
        {"model.norm_epsilon": 0.0},
        r"model\.norm_epsilon must be a positive number",
        None,
    ),
    # issue 14.7: after_training used to be checked only once training had finished
    "unknown-eval-task": (
        {"after_training.eval_tasks": ["nope"]},
        r"after_training\.eval_tasks: unknown task 'nope'",
        None,
    ),
    "eval-tasks-without-lengths": (
        {"after_training.eval_tasks": ["passkey"]},
        r"after_training\.eval_lengths is empty",
        None,
    ),
    "negative-eval-length": (
        {"after_training.eval_tasks": ["passkey"], "after_training.eval_lengths": [-5]},
        r"eval_lengths must be positive token counts, got -5",
        None,
    ),
    "zero-eval-samples": (
        {"after_training.eval_samples": 0},
        r"after_training\.eval_samples must be a positive number",
        None,
    ),
}


@pytest.mark.parametrize("changes, match, world_size", INVALID.values(), ids=INVALID.keys())
def test_invalid_config(changes, match, world_size):
    with pytest.raises(ConfigError, match=match):
        make_cfg(changes, world_size=world_size)


def test_valid_world_sizes():
    tp2 = {"parallel.tensor": 2, "model.mamba.num_groups": 2}
    make_cfg(tp2, world_size=2)
    make_cfg(tp2, world_size=8)
    make_cfg({**tp2, "parallel.pipeline": 2, "parallel.context": 2}, world_size=16)
    make_cfg({"parallel.pipeline": 3, "model.pattern": "M-S-*-"}, world_size=3)


def test_context_parallel_does_not_split_mamba_heads():
    """CP passes Mamba states between ranks: 8 heads serve TP=2 x CP=8 (Megatron-Core's
    all-to-all scheme would need heads divisible by 16)."""
    cfg = make_cfg(
        {"parallel.tensor": 2, "parallel.context": 8, "model.mamba.num_groups": 2}, world_size=16
    )
    assert cfg.model.mamba_num_heads == 8


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"Config file not found: .*nope\.yaml"):
        load_config(missing)


def test_config_path_is_directory(tmp_path):
    with pytest.raises(ConfigError, match=r"Config file not found"):
        load_config(tmp_path)


def test_invalid_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  pattern: [unclosed\n  hidden_size: 128\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml is not valid YAML"):
        load_config(bad)


def test_yaml_top_level_not_mapping(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- model\n- parallel\n")
    with pytest.raises(ConfigError, match=r"must hold a mapping at top level"):
        load_config(bad)


def test_yaml_unknown_key_in_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("model:\n  pattern: 'M-S-*-'\n  num_attention_head: 4\n")
    with pytest.raises(ConfigError, match=r"Did you mean 'num_attention_heads'"):
        load_config(path)


def test_errors_without_torch_distributed(tmp_path):
    torch_dist = pytest.importorskip("torch.distributed")
    assert not torch_dist.is_available() or not torch_dist.is_initialized()
    for changes, match, world_size in INVALID.values():
        with pytest.raises(ConfigError, match=match):
            make_cfg(changes, world_size=world_size)
    with pytest.raises(ConfigError):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError):
        load_config(REPO_ROOT / "configs" / "tiny.yaml", ["model.swa.window=0"])
    assert not torch_dist.is_available() or not torch_dist.is_initialized()


# --------------------------------------------------------------------------- shipped configs


def test_configs_present():
    assert REPO_ROOT / "configs" / "tiny.yaml" in CONFIG_FILES


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    cp = compile_pattern(cfg.model, cfg.parallel)
    assert cp.num_layers == len(layer_symbols(cfg.model.pattern))
    # the plain-dict form round-trips
    again = from_dict(RunConfig, to_dict(cfg))
    assert again == cfg


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_shipped_config_overrides(path):
    cfg = load_config(path, ["model.swa.window=64"])
    assert cfg.model.swa.window == 64
    if "S" in cfg.model.pattern:
        assert compile_pattern(cfg.model, cfg.parallel).window_size == (63, 0)
    with pytest.raises(ConfigError, match=r"model\.swa\.window must be a positive.*got 0"):
        load_config(path, ["model.swa.window=0"])


def test_tiny_config_contents_and_overrides():
    tiny = REPO_ROOT / "configs" / "tiny.yaml"
    cfg = load_config(tiny)
    assert cfg.model.pattern == "M-S-*-M-S-*-"
    assert cfg.model.full_attention.rope is False
    assert cfg.model.swa.window == 32
    cp = compile_pattern(cfg.model, cfg.parallel)
    assert cp.no_rope_freq == [0, 0, 0, 0, 1, 0] * 2
    assert cp.window_attn_skip_freq == [0, 0, 1, 0, 0, 0] * 2

    cfg = load_config(
        tiny,
        [
            "model.swa.window=64",
            "parallel.tensor=2",
            "model.mamba.num_groups=2",
            "parallel.pipeline=2",
            "model.full_attention.rope=true",
            "model.full_attention.rope_theta=500000",
            "model.mamba.chunk_size=32",
        ],
    )
    assert cfg.model.swa.window == 64
    assert (cfg.parallel.tensor, cfg.parallel.pipeline) == (2, 2)
    assert cfg.model.full_attention.rope is True
    assert cfg.model.full_attention.rope_theta == 500000.0
    assert cfg.model.mamba.chunk_size == 32
    cp = compile_pattern(cfg.model, cfg.parallel)
    assert cp.window_size == (63, 0)
    assert cp.no_rope_freq == [0] * 12
    assert [tuple(s) for s in cp.stages] == [(0, 6), (6, 12)]

    # A pattern starting with '*' is a YAML alias; the override takes it as plain text.
    assert load_config(tiny, ["model.pattern=*-S-*-S-"]).model.pattern == "*-S-*-S-"

    bad_overrides = {
        "model.swa.window=0": r"model\.swa\.window must be a positive.*got 0",
        "model.swa.window=-5": r"model\.swa\.window must be a positive.*got -5",
        "parallel.tensor=3": r"not divisible by parallel\.tensor=3",
        "model.hiden_size=64": r"Did you mean 'hidden_size'",
        "model.pattern=M-S-*-M-S-*X": r"Unknown symbol 'X' at position 11",
        "model.swa.window": r"must look like section\.key=value",
        "model.pattern.x=1": r"'pattern' is not a section",
    }
    for override, match in bad_overrides.items():
        with pytest.raises(ConfigError, match=match):
            load_config(tiny, [override])


def test_synthetic_mix_errors_name_the_key(tmp_path):
    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_base.yaml")
    with pytest.raises(ConfigError, match=r"data\.synthetic\.niah_fraction=0\.7.*sum <= 1"):
        load_config(tiny, ["data.synthetic.niah_fraction=0.7", "data.synthetic.copy_fraction=0.5"])
    with pytest.raises(ConfigError, match=r"copy_fraction=-0\.1.*>= 0"):
        load_config(tiny, ["data.synthetic.copy_fraction=-0.1"])
    with pytest.raises(ConfigError, match=r"fill_sequences .* only with the byte tokenizer"):
        load_config(tiny, ["data.synthetic.fill_sequences=true", f"data.tokenizer={tmp_path}"])
    cfg = load_config(
        tiny, ["data.synthetic.copy_fraction=0.5", "data.synthetic.fill_sequences=true"]
    )
    assert cfg.data.synthetic.copy_fraction == 0.5
    # fill_sequences promises one whole document per sequence: kinds that cannot fit are refused.
    fill = ["data.synthetic.fill_sequences=true"]
    from hybrid_megatron.data.synthetic import smallest_document

    need = smallest_document("niah", 16)  # its longest key depends on the word lists
    assert 255 < need < 512
    with pytest.raises(ConfigError, match=rf"niah_fraction=0\.3 .*at least {need} .*= 255"):
        load_config(tiny, [*fill, "data.synthetic.niah_fraction=0.3"])
    with pytest.raises(ConfigError, match=r"copy document needs at least 301 .*min_distance"):
        load_config(
            tiny, [*fill, "data.synthetic.copy_fraction=1", "data.synthetic.min_distance=150"]
        )
    load_config(tiny, [*fill, "data.synthetic.niah_fraction=0.3", "model.seq_length=512"])
    load_config(tiny, [*fill, "data.synthetic.passkey_fraction=0.3"])
    with pytest.raises(ConfigError, match=r"max_haystack=8 is below min_distance=16"):
        load_config(tiny, ["data.synthetic.max_haystack=8"])
    assert load_config(tiny, ["data.synthetic.max_haystack=700"]).data.synthetic.max_haystack == 700


# --------------------------------------------------------------------------- vocab padding


@pytest.mark.parametrize(
    "vocab, divisible_by, tp, expected",
    [
        (512, 128, 1, 512),
        (512, 128, 2, 512),
        (512, 128, 8, 1024),
        (500, 128, 1, 512),
        (1, 128, 1, 128),
        (50257, 128, 1, 50304),
        (50257, 128, 2, 50432),
        (50257, 128, 4, 50688),
        (32000, 64, 8, 32256),
        (100, 1, 1, 100),
        (100, 1, 3, 102),
    ],
)
def test_padded_vocab_size(vocab, divisible_by, tp, expected):
    m = ModelConfig(vocab_size=vocab, make_vocab_size_divisible_by=divisible_by)
    padded = m.padded_vocab_size(tp)
    assert padded == expected
    multiple = divisible_by * tp
    assert padded % multiple == 0
    assert vocab <= padded < vocab + multiple
    assert ParallelConfig(tensor=tp).tensor == tp


def test_base_config_is_merged_and_cycles_are_refused(tmp_path):
    from hybrid_megatron.config import load_config

    ext = load_config(REPO_ROOT / "configs" / "paper" / "s4_swa128_nope_extend16k.yaml")
    base = load_config(REPO_ROOT / "configs" / "paper" / "s4_swa128_nope.yaml")
    assert ext.model.seq_length == 16384 and base.model.seq_length == 4096
    assert ext.model.pattern == base.model.pattern and ext.model.swa == base.model.swa
    assert ext.train.init_from == "runs/s4_swa128_nope"
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "c.yaml")


def test_long_context_extension_configs_state_context_parallelism():
    from hybrid_megatron.config import load_config

    for name, seq, cp in (("extend16k", 16384, 2), ("extend32k", 32768, 4)):
        cfg = load_config(REPO_ROOT / "configs" / "paper" / f"s4_swa128_nope_{name}.yaml")
        assert (cfg.model.seq_length, cfg.parallel.context) == (seq, cp)
        assert cfg.train.init_from == "runs/s4_swa128_nope"
        cfg.validate(world_size=8)  # one 8-GPU node
        with pytest.raises(ConfigError, match="world size 1 is not divisible"):
            cfg.validate(world_size=1)


@pytest.mark.parametrize(
    "name",
    [
        "s1_full",
        "s4_swa128_nope",
        "1b_mamba2",
        "s4_swa128_nope_extend16k",
        "s4_swa128_nope_extend32k",
    ],
)
def test_paper_configs_ask_for_a_tokenizer_instead_of_falling_back_to_bytes(name):
    from hybrid_megatron.config import load_config, validate_data_source

    cfg = load_config(REPO_ROOT / "configs" / "paper" / f"{name}.yaml")
    cfg.validate()  # info / check need no data
    with pytest.raises(ConfigError, match="data.tokenizer is not set.*vocab_size 32000"):
        validate_data_source(cfg)
    validate_data_source(load_config(REPO_ROOT / "configs" / "paper" / f"{name}.yaml",
                                     ["data.tokenizer=/some/tokenizer"]))  # fmt: skip


def test_pattern_is_compiled_once_per_config(monkeypatch):
    """validate(), the model builders and the FLOP count share one compiled plan."""
    import dataclasses

    from hybrid_megatron.config import load_config
    from hybrid_megatron.config import schema as config_module
    from hybrid_megatron.training.flops import model_flops_per_sequence

    cfg = load_config(REPO_ROOT / "configs" / "tiny.yaml")
    calls = []
    real = config_module.compile_pattern
    monkeypatch.setattr(config_module, "compile_pattern", lambda *a: calls.append(a) or real(*a))
    cfg = dataclasses.replace(cfg)  # a fresh config object: nothing compiled yet
    cfg.validate()
    plan = cfg.compiled
    model_flops_per_sequence(cfg)
    assert cfg.compiled is plan and len(calls) == 1
    cfg.model = dataclasses.replace(cfg.model, pattern="M-*-")  # a changed config recompiles
    assert cfg.compiled.megatron_pattern == "M-*-" and len(calls) == 2

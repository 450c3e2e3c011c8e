"""The built model has exactly the intended kernel, window and RoPE on every layer (PP=1, PP=2),
and the tiny config runs forward + backward on CPU in seconds."""

from __future__ import annotations

import time

import pytest
import torch

from tests.dist_utils import run_distributed

WINDOW = 8
FULL_THETA, SWA_THETA = 500000.0, 10000.0

# (pattern, full-attention uses RoPE, SWA uses RoPE). Stage boundaries put SWA / NoPE layers
# right after a '|', where layer-numbering bugs hide.
CASES = [
    ("M-S*-|S-M*-", False, True),
    ("S*S*|*S-M", True, True),
    ("*-S-|*-S-", False, True),
    ("M-M-S-*-", True, False),
    ("S-*-S-*-", False, True),  # no '|': even split under PP=2
]


def _model_dict(pattern: str, full_rope: bool, swa_rope: bool) -> dict:
    return dict(
        pattern=pattern,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=64,
        seq_length=16,
        full_attention={"rope": full_rope, "rope_theta": FULL_THETA},
        swa={"window": WINDOW, "rope": swa_rope, "rope_theta": SWA_THETA},
        mamba={"state_dim": 4, "head_dim": 8, "num_groups": 1, "chunk_size": 8},
    )


def expected_layers(pattern: str, full_rope: bool, swa_rope: bool) -> list[tuple]:
    """Independent of the compiler: (number, symbol, window, rope, theta) from the string."""
    out = []
    for i, ch in enumerate(pattern.replace("|", "")):
        if ch == "S":
            out.append((i + 1, "S", WINDOW, swa_rope, SWA_THETA if swa_rope else None))
        elif ch == "*":
            out.append((i + 1, "*", None, full_rope, FULL_THETA if full_rope else None))
        else:
            out.append((i + 1, ch, None, None, None))
    return out


def describe_built_layers(model) -> list[tuple]:
    """Read back what each built layer will actually do."""
    from megatron.core.ssm.mamba_layer import MambaLayer

    from hybrid_megatron.model.attention import HybridCoreAttention, HybridSelfAttention
    from hybrid_megatron.model.mamba_mixer import HybridMambaMixer
    from hybrid_megatron.model.specs import HybridMLPLayer

    cfg = model.config
    model_theta = _theta_of(model.rotary_pos_emb) if hasattr(model, "rotary_pos_emb") else None
    rows = []
    for layer in model.decoder.layers:
        n = layer.layer_number
        if isinstance(layer, MambaLayer):
            assert isinstance(layer.mixer, HybridMambaMixer)
            rows.append((n, "M", None, None, None))
        elif isinstance(layer, HybridMLPLayer):
            rows.append((n, "-", None, None, None))
        else:
            attn = layer.self_attention
            assert isinstance(attn, HybridSelfAttention)
            assert isinstance(attn.core_attention, HybridCoreAttention)
            # Megatron's Attention.forward drops RoPE where no_rope_freq[layer_number-1] is 1.
            rope = model_theta is not None and not cfg.no_rope_freq[attn.layer_number - 1]
            theta = None
            if rope:  # the layer's own table if it has one, else the model's
                theta = _theta_of(attn.own_rotary) if attn.own_rotary else model_theta
            window = attn.core_attention.window
            rows.append((n, "S" if window else "*", window, rope, theta))
    return rows


def _theta_of(rotary) -> float:
    # inv_freq[1] = theta ** (-2 / dim)
    dim = 2 * rotary.inv_freq.numel()
    return round(float(rotary.inv_freq[1].double() ** (-dim / 2)))


def _build_and_describe(model_dict: dict, pp: int):
    from megatron.core import parallel_state as ps

    from hybrid_megatron import distributed
    from hybrid_megatron.config import RunConfig, from_dict
    from hybrid_megatron.model.build import build_model

    pattern = model_dict["pattern"] if pp > 1 else model_dict["pattern"].replace("|", "")
    cfg = from_dict(
        RunConfig, {"model": {**model_dict, "pattern": pattern}, "parallel": {"pipeline": pp}}
    )
    cfg.validate()
    distributed.initialize(cfg.parallel)
    model = build_model(
        cfg, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage()
    )
    return describe_built_layers(model)


@pytest.mark.parametrize("pattern,full_rope,swa_rope", CASES)
def test_built_layers_pp1_and_pp2(pattern, full_rope, swa_rope):
    md = _model_dict(pattern, full_rope, swa_rope)
    want = expected_layers(pattern, full_rope, swa_rope)
    (pp1,) = run_distributed(_build_and_describe, 1, md, 1)
    assert pp1 == want
    stage0, stage1 = run_distributed(_build_and_describe, 2, md, 2)
    assert stage0 + stage1 == want
    if "|" in pattern:
        assert len(stage0) == len(pattern.split("|")[0])
    else:
        assert len(stage0) == len(stage1)


def _tiny_fwd_bwd():
    from hybrid_megatron import distributed
    from hybrid_megatron.config import load_config
    from hybrid_megatron.model.build import build_model

    cfg = load_config("configs/tiny.yaml")
    distributed.initialize(cfg.parallel)
    model = build_model(cfg)
    s = cfg.model.seq_length
    ids = torch.randint(0, cfg.model.vocab_size, (2, s))
    start = time.perf_counter()
    loss = model(ids, torch.arange(s).expand(2, -1), None, labels=ids).mean()
    loss.backward()
    elapsed = time.perf_counter() - start
    grads = [p.grad for p in model.parameters()]
    return elapsed, float(loss), all(g is not None and torch.isfinite(g).all() for g in grads)


def test_tiny_forward_backward_runs_on_cpu_in_seconds():
    elapsed, loss, grads_ok = run_distributed(_tiny_fwd_bwd, 1)[0]
    assert grads_ok
    assert 0 < loss < 10
    assert elapsed < 20, f"tiny forward+backward took {elapsed:.1f}s"


def _count_built(config_path: str):
    from hybrid_megatron import distributed
    from hybrid_megatron.config import load_config
    from hybrid_megatron.model.build import build_model

    cfg = load_config(config_path)
    distributed.initialize(cfg.parallel)
    model = build_model(cfg)
    return sum(p.numel() for p in model.parameters()), cfg.model.padded_vocab_size(1)


def test_param_count_formula_matches_built_model():
    import dataclasses

    from hybrid_megatron.config import load_config
    from hybrid_megatron.model.params import count_params

    built, padded_vocab = run_distributed(_count_built, 1, "configs/tiny.yaml")[0]
    model_cfg = load_config("configs/tiny.yaml").model
    counted = count_params(dataclasses.replace(model_cfg, vocab_size=padded_vocab))["total"]
    assert counted == built

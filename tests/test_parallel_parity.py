"""TP=2 (with and without sequence parallel) and PP=2 give the loss and gradients of TP=1/PP=1.

All runs start from the same weights: the TP=1 run saves a dist checkpoint that the other
layouts load (Megatron re-shards it, including the Mamba in_proj z/x/B/C/dt split). Each run
writes its gradients as a dist checkpoint too, so they are compared in the TP=1 layout.
Tolerance (fp32 on CPU): loss 1e-5 relative, gradients 1e-5 relative to the largest entry.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.dist_utils import run_distributed

MODEL = dict(
    # SWA right after the '|' boundary; NoPE full attention; grouped Mamba heads split by TP.
    pattern="M-S*-|S-M*-",
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=200,
    seq_length=32,
    full_attention={"rope": False},
    swa={"window": 8, "rope": True, "rope_theta": 10000.0},
    mamba={"state_dim": 8, "head_dim": 16, "num_groups": 2, "expand": 2, "chunk_size": 8},
    tie_embeddings=True,
)
MICRO, NUM_MICRO = 2, 2


def _config(tp: int, pp: int, sp: bool = False):
    from hybrid_megatron.config import RunConfig, from_dict

    data = {"model": MODEL, "parallel": {"tensor": tp, "pipeline": pp, "sequence_parallel": sp}}
    cfg = from_dict(RunConfig, data)
    if pp == 1:  # same layers, no stage boundary
        cfg.model = dataclasses.replace(cfg.model, pattern=MODEL["pattern"].replace("|", ""))
    cfg.validate()
    return cfg


def _batches():
    g = torch.Generator().manual_seed(0)
    data = torch.randint(
        0, MODEL["vocab_size"], (MICRO * NUM_MICRO, MODEL["seq_length"] + 1), generator=g
    )
    out = []
    for i in range(NUM_MICRO):
        chunk = data[i * MICRO : (i + 1) * MICRO]
        out.append(
            dict(
                tokens=chunk[:, :-1],
                labels=chunk[:, 1:],
                loss_mask=torch.ones(MICRO, MODEL["seq_length"]),
                position_ids=torch.arange(MODEL["seq_length"]).expand(MICRO, -1),
            )
        )
    return out


def _train_step(tp: int, pp: int, sp: bool, init_dir: str, grads_dir: str, save_init: bool):
    from megatron.core import parallel_state as ps

    from hybrid_megatron import distributed
    from hybrid_megatron.checkpoint.model_state import load_model_state, save_model_state
    from hybrid_megatron.model.build import build_model
    from hybrid_megatron.training.schedule import forward_backward, wrap_ddp

    cfg = _config(tp, pp, sp)
    distributed.initialize(cfg.parallel, seed=1234)
    model = build_model(
        cfg,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    )
    if save_init:
        save_model_state([model], init_dir)
    else:
        load_model_state([model], init_dir)
    ddp = wrap_ddp([model], model.config)
    ddp[0].zero_grad_buffer()
    loss = forward_backward(ddp, iter(_batches()), NUM_MICRO, MODEL["seq_length"], MICRO)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.main_grad)
    save_model_state([model], grads_dir)
    return loss


def _load_flat(path: str) -> dict[str, torch.Tensor]:
    from hybrid_megatron import distributed
    from hybrid_megatron.checkpoint.model_state import load_model_state
    from hybrid_megatron.model.build import build_model

    cfg = _config(1, 1)
    distributed.initialize(cfg.parallel)
    model = build_model(cfg)
    load_model_state([model], path)
    return {
        k: v.clone()
        for k, v in model.state_dict().items()
        if v is not None and v.is_floating_point()
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    init, grads = str(root / "init"), str(root / "grads_tp1")
    (loss,) = run_distributed(_train_step, 1, 1, 1, False, init, grads, True)
    return root, init, loss, run_distributed(_load_flat, 1, grads)[0]


@pytest.mark.parametrize("tp,pp,sp", [(2, 1, False), (2, 1, True), (1, 2, False)])
def test_parallel_layout_matches_single_process(reference, tp, pp, sp):
    root, init, ref_loss, ref_grads = reference
    grads_dir = str(root / f"grads_tp{tp}_pp{pp}_sp{int(sp)}")
    losses = run_distributed(_train_step, 2, tp, pp, sp, init, grads_dir, False)
    loss = [x for x in losses if x is not None][0]
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    grads = run_distributed(_load_flat, 1, grads_dir)[0]
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        scale = ref.abs().max().clamp(min=1e-8)
        err = (grads[name] - ref).abs().max() / scale
        assert err < 1e-5, f"{name}: relative grad error {err:.2e} at tp={tp} pp={pp} sp={sp}"
        assert ref.abs().max() > 0 or name.endswith("_extra_state"), f"{name} has no gradient"

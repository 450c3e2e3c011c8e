"""CP=2 (alone, with TP=2 + sequence parallel, with PP=2 and with DP=2) gives the loss and
gradients of CP=1.

Two hybrids, each with Mamba-2 (2 groups), MLP, full attention and SWA:
- RoPE full attention, SWA window 8 < chunk (seq 64 at CP=2: 16-token chunks);
- NoPE full attention, SWA window 40 > chunk (the halo spans 3 chunks).
The loss mask hides an uneven number of tokens per chunk, so the loss must be averaged over
the whole sequence's count. All layouts start from the CP=1 run's weights (a dist
checkpoint); TP/PP gradients are saved as dist checkpoints and compared in the CP=1 layout.
Tolerance (fp32 on CPU): loss 1e-5 relative, gradients 1e-5 relative to the largest entry.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from tests.dist_utils import run_distributed

SEQ, MICRO, NUM_MICRO = 64, 2, 2
BASE = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=200,
    seq_length=SEQ,
    mamba={"state_dim": 8, "head_dim": 16, "num_groups": 2, "expand": 2, "chunk_size": 8},
    tie_embeddings=True,
)
MODELS = {
    "rope_small_window": dict(
        BASE,
        pattern="M-S*-|M*S-",
        full_attention={"rope": True, "rope_theta": 500000.0},
        swa={"window": 8, "rope": True, "rope_theta": 10000.0},
    ),
    "nope_large_window": dict(
        BASE,
        pattern="M-S*-|M*S-",
        full_attention={"rope": False},
        swa={"window": 40, "rope": True, "rope_theta": 10000.0},
    ),
}


def _config(model: str, tp: int = 1, pp: int = 1, cp: int = 1, world: int | None = None):
    from hybrid_megatron.config import RunConfig, from_dict

    spec = MODELS[model]
    # TP runs use sequence parallelism too: its gathers / scatters wrap the CP path.
    parallel = {"tensor": tp, "pipeline": pp, "context": cp, "sequence_parallel": tp > 1}
    cfg = from_dict(RunConfig, {"model": spec, "parallel": parallel})
    if pp == 1:
        cfg.model = dataclasses.replace(cfg.model, pattern=spec["pattern"].replace("|", ""))
    cfg.validate(world_size=world or tp * pp * cp)
    return cfg


def _batches():
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 200, (MICRO * NUM_MICRO, SEQ + 1), generator=g)
    mask = (torch.rand(MICRO * NUM_MICRO, SEQ, generator=g) > 0.3).float()
    mask[0, :20] = 0  # chunk 0 of sample 0 has no loss tokens at all
    return [
        dict(
            tokens=data[i : i + MICRO, :-1],
            labels=data[i : i + MICRO, 1:],
            loss_mask=mask[i : i + MICRO],
            position_ids=torch.arange(SEQ).expand(MICRO, -1),
        )
        for i in range(0, MICRO * NUM_MICRO, MICRO)
    ]


def _float_state(model) -> dict[str, torch.Tensor]:
    return {
        k: v.clone()
        for k, v in model.state_dict().items()
        if v is not None and v.is_floating_point()
    }


def _train_step(model_name: str, tp: int, pp: int, cp: int, init_dir: str, grads_dir: str | None):
    """Forward-backward of one global batch; returns (loss or None, grads if TP = PP = 1)."""
    from megatron.core import parallel_state as ps

    from hybrid_megatron import distributed
    from hybrid_megatron.checkpoint.model_state import load_model_state, save_model_state
    from hybrid_megatron.model.build import build_model
    from hybrid_megatron.training.schedule import forward_backward, wrap_ddp

    cfg = _config(model_name, tp, pp, cp, world=int(os.environ["WORLD_SIZE"]))
    distributed.initialize(cfg.parallel, seed=1234)
    model = build_model(
        cfg, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage()
    )
    if cp == 1 and tp == 1 and pp == 1:
        save_model_state([model], init_dir)
    else:
        load_model_state([model], init_dir)
    ddp = wrap_ddp([model], model.config)
    ddp[0].zero_grad_buffer()
    loss = forward_backward(ddp, iter(_batches()), NUM_MICRO, SEQ, MICRO)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.main_grad)
    if grads_dir is not None:
        save_model_state([model], grads_dir)
        return loss, None
    return loss, _float_state(model)


def _load_flat(model_name: str, paths: list[str]) -> list[dict[str, torch.Tensor]]:
    from hybrid_megatron import distributed
    from hybrid_megatron.checkpoint.model_state import load_model_state
    from hybrid_megatron.model.build import build_model

    cfg = _config(model_name)
    distributed.initialize(cfg.parallel)
    model = build_model(cfg)
    out = []
    for path in paths:
        load_model_state([model], path)
        out.append(_float_state(model))
    return out


def _compare(grads: dict, ref: dict, what: str) -> None:
    assert grads.keys() == ref.keys()
    for name, r in ref.items():
        scale = r.abs().max().clamp(min=1e-8)
        err = (grads[name] - r).abs().max() / scale
        assert err < 1e-5, f"{name}: relative grad error {err:.2e} ({what})"
        assert r.abs().max() > 0 or name.endswith("_extra_state"), f"{name} has no gradient"


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    root = tmp_path_factory.mktemp("cp_parity")
    refs = {}
    for name in MODELS:
        init = str(root / f"init_{name}")
        ((loss, grads),) = run_distributed(_train_step, 1, name, 1, 1, 1, init, None)
        refs[name] = (init, loss, grads)
    return root, refs


@pytest.mark.parametrize("model_name", list(MODELS))
def test_cp2_matches_cp1(references, model_name):
    _, refs = references
    init, ref_loss, ref_grads = refs[model_name]
    results = run_distributed(_train_step, 2, model_name, 1, 1, 2, init, None)
    for loss, grads in results:  # every CP rank reports the whole sequence's loss and grads
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        _compare(grads, ref_grads, f"{model_name} cp=2")


def test_tp2_cp2_and_pp2_cp2_match_cp1(references):
    root, refs = references
    name = "nope_large_window"
    init, ref_loss, ref_grads = refs[name]
    dirs = []
    for tp, pp in ((2, 1), (1, 2)):
        grads_dir = str(root / f"grads_tp{tp}_pp{pp}_cp2")
        results = run_distributed(_train_step, 4, name, tp, pp, 2, init, grads_dir)
        losses = [loss for loss, _ in results if loss is not None]
        assert losses and all(loss == pytest.approx(ref_loss, rel=1e-5) for loss in losses)
        dirs.append(grads_dir)
    for layout, grads in zip(
        ("tp=2 sp cp=2", "pp=2 cp=2"), run_distributed(_load_flat, 1, name, dirs)[0]
    ):
        _compare(grads, ref_grads, layout)


def test_dp2_cp2_averages_gradients_over_data_and_context_ranks(references):
    """4 processes, DP=2 x CP=2, both replicas on the same batches: Megatron's DDP averages
    over the data x context group; the CP loss scaling must make that the CP=1 gradient."""
    _, refs = references
    name = "rope_small_window"
    init, ref_loss, ref_grads = refs[name]
    for loss, grads in run_distributed(_train_step, 4, name, 1, 1, 2, init, None):
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        _compare(grads, ref_grads, "dp=2 cp=2")

"""Context-parallel building blocks against their single-process results (gloo, float64).

Every rank builds the same full-sequence inputs, runs the reference on the whole sequence,
then runs the CP path on its load-balanced shard; outputs and input gradients must equal
the reference's shards (float64: 1e-10 absolute). The SWA halo's traffic is counted.
"""

from __future__ import annotations

import pytest
import torch

from hybrid_megatron.context_parallel.layout import (
    chunk_owner,
    halo_plan,
    rank_chunks,
    shard_batch,
    shard_sequence,
    unshard_sequence,
)
from tests.dist_utils import run_distributed

B, HQ, HKV, D = 2, 4, 2, 8


def test_load_balanced_order_matches_megatron(monkeypatch):
    from megatron.core.utils import get_batch_on_this_cp_rank

    # Megatron reads the group's rank and size only when torch.distributed is initialised.
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)

    x = torch.arange(2 * 24).reshape(2, 24)
    for cp in (2, 3):
        parts = []
        for r in range(cp):
            mine = shard_sequence(x, 1, r, cp)
            expected = get_batch_on_this_cp_rank({"t": x.clone()}, _FakeGroup(r, cp))["t"]
            assert torch.equal(mine, expected)
            assert torch.equal(shard_batch({"t": x, "none": None}, r, cp)["t"], mine)
            parts.append(mine)
        assert torch.equal(unshard_sequence(parts, 1), x)
        for k in range(2 * cp):
            rank, local = chunk_owner(k, cp)
            assert rank_chunks(rank, cp)[local] == k


class _FakeGroup:
    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


@pytest.mark.parametrize("cp,c,halo", [(2, 8, 3), (2, 8, 8), (2, 8, 20), (4, 4, 13), (3, 5, 100)])
def test_halo_plan_covers_exactly_the_rows_before_each_chunk(cp, c, halo):
    plan = halo_plan(cp, c, halo)
    for k in range(2 * cp):
        rows = []
        for t in (t for t in plan if t.dst_chunk == k):
            assert t.dst_offset == len(rows)
            rows.extend(range(t.src_chunk * c + t.start, t.src_chunk * c + t.end))
        assert rows == list(range(max(0, k * c - halo), k * c))


def test_a_rank_sends_at_most_two_halos():
    """Whatever the chunk and window (also windows spanning many chunks), the busiest rank
    sends at most 2 x (W-1) rows per SWA layer: O(W), never O(sequence)."""
    from hybrid_megatron.context_parallel.plan import halo_rows_sent

    for cp in (2, 3, 4, 8):
        for c in (1, 2, 5, 16, 64):
            for halo in (1, 3, 7, 15, 31, 100, 127):
                sent = halo_rows_sent(cp, c, halo)
                assert max(sent) <= 2 * halo, (cp, c, halo)
                # ... and every row a chunk's halo needs is sent or copied exactly once
                total = sum(min(halo, k * c) for k in range(2 * cp))
                assert sum(t.rows for t in halo_plan(cp, c, halo)) == total


# --------------------------------------------------------------------------- distributed
def _world():
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.group.WORLD, dist.get_world_size(), dist.get_rank()


def _grads(fn, inputs, dout):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dout)
    return out.detach(), [g.detach() for g in grads]


def _attention_case(seq: int, window: int | None, backend: str) -> dict:
    from hybrid_megatron.context_parallel.attention import context_parallel_attention
    from hybrid_megatron.context_parallel.comm import record_volume
    from hybrid_megatron.kernels.attention import attention

    group, cp, rank = _world()
    g = torch.Generator().manual_seed(seq + (window or 0))
    q = torch.randn(B, HQ, seq, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, HKV, seq, D, generator=g, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(B, HQ, seq, D, generator=g, dtype=torch.float64)

    def local(q_, k_, v_, w):
        # flex uncompiled (float64; compiling would take longer than the whole test)
        return attention(q_, k_, v_, window=w, backend=backend, flex_eager=True)

    ref, ref_grads = _grads(lambda *t: local(*t, window), (q, k, v), dout)
    shards = [shard_sequence(t, 2, rank, cp) for t in (q, k, v, dout)]
    with record_volume() as sent:
        out, grads = _grads(
            lambda *t: context_parallel_attention(*t, window, group, local), shards[:3], shards[3]
        )
    pairs = [(out, ref), *zip(grads, ref_grads)]
    err = max((a - shard_sequence(b, 2, rank, cp)).abs().max().item() for a, b in pairs)
    return {"err": err, "sent": dict(sent)}


ATTENTION_CASES = [
    (48, None, "sdpa"),  # full causal, chunk 12
    (48, 5, "sdpa"),  # window < chunk
    (48, 30, "sdpa"),  # window > chunk: the halo spans 3 chunks
    (48, 100, "sdpa"),  # window > sequence
    (96, 5, "sdpa"),  # same window, twice the sequence: same traffic
    (48, 30, "flex"),
]


@pytest.fixture(scope="module")
def cp2():
    return run_distributed(_cases, 2, ATTENTION_CASES, MAMBA_CASES[2])


@pytest.fixture(scope="module")
def cp4():
    return run_distributed(_cases, 4, ATTENTION_CASES_CP4, MAMBA_CASES[4])


@pytest.mark.parametrize("index", range(len(ATTENTION_CASES)))
def test_attention_cp2_exact(cp2, index):
    for attention, _ in cp2:
        assert attention[index]["err"] < 1e-10, ATTENTION_CASES[index]


def test_swa_halo_sends_the_window_not_the_sequence(cp2):
    row = B * HKV * D * 2  # K and V rows of one token
    short, long_ = cp2[0][0][1]["sent"], cp2[0][0][4]["sent"]
    for rank, _ in cp2:
        # CP=2, W-1 < chunk: rank 0 sends chunk 0's last W-1 rows to rank 1 (for chunk 1), rank
        # 1 sends chunk 2's to rank 0 (for chunk 3); chunk 2's halo (chunk 1) is local.
        for case in (1, 4):
            assert rank[case]["sent"] == {"swa.forward": 4 * row, "swa.backward": 4 * row}
    assert short == long_
    full = cp2[0][0][0]["sent"]["attention.forward"]
    assert full == 48 // 2 * row  # all-gather: (cp-1) x local K/V


@pytest.mark.parametrize("world", [2, 4])
def test_measured_halo_traffic_equals_the_plan(world, request):
    """Every SWA case, every rank: sent rows = the plan's cross-rank rows (a window above the
    chunk included), the number `info` and the benchmark report."""
    from hybrid_megatron.context_parallel.plan import halo_rows_sent

    cases = ATTENTION_CASES if world == 2 else ATTENTION_CASES_CP4
    row = B * HKV * D * 2
    for rank, (attention, _) in enumerate(request.getfixturevalue(f"cp{world}")):
        for (seq, window, _), result in zip(cases, attention):
            if window is not None:
                rows = halo_rows_sent(world, seq // (2 * world), window - 1)[rank]
                assert result["sent"] == {"swa.forward": rows * row, "swa.backward": rows * row}


ATTENTION_CASES_CP4 = [(64, None, "sdpa"), (64, 3, "sdpa"), (64, 21, "sdpa")]  # halo 20: 3 chunks


def test_attention_cp4_exact(cp4):
    for attention, _ in cp4:
        for case, result in zip(ATTENTION_CASES_CP4, attention):
            assert result["err"] < 1e-10, case


def _mamba_case(seq: int, width: int) -> dict:
    from hybrid_megatron.context_parallel.comm import record_volume
    from hybrid_megatron.context_parallel.mamba import context_parallel_conv, context_parallel_ssd
    from hybrid_megatron.kernels.mamba_ops import causal_conv1d
    from hybrid_megatron.kernels.ssd import ssd_chunk_scan

    group, cp, rank = _world()
    h, p, gr, n, ch = 4, 3, 2, 5, 6
    g = torch.Generator().manual_seed(seq)
    f64 = dict(generator=g, dtype=torch.float64)
    x = torch.randn(B, seq, h, p, **f64)
    dt = torch.randn(B, seq, h, **f64)
    A = -torch.rand(h, **f64) * 2
    Bm, Cm = torch.randn(B, seq, gr, n, **f64), torch.randn(B, seq, gr, n, **f64)
    Dp, dt_bias = torch.randn(h, **f64), torch.randn(h, **f64)
    xBC = torch.randn(B, seq, ch, **f64)
    weight, bias = torch.randn(ch, width, **f64), torch.randn(ch, **f64)

    def ssd_ref(x_, dt_, B_, C_):
        return ssd_chunk_scan(x_, dt_, A, B_, C_, 4, D=Dp, dt_bias=dt_bias, dt_softplus=True)

    def ssd_cp(x_, dt_, B_, C_):
        return context_parallel_ssd(ssd_chunk_scan, x_, dt_, A, B_, C_, 4, Dp, dt_bias, group)

    def conv(x_, initial=None):
        return causal_conv1d(x_, weight, bias, "silu", initial_state=initial)

    errs = []
    with record_volume() as sent:
        for ref_fn, cp_fn, inputs, dout in (
            (ssd_ref, ssd_cp, (x, dt, Bm, Cm), torch.randn(B, seq, h, p, **f64)),
            (
                lambda t: conv(t.transpose(1, 2)).transpose(1, 2),
                lambda t: context_parallel_conv(t, conv, width, group),
                (xBC,),
                torch.randn(B, seq, ch, **f64),
            ),
        ):
            ref, ref_grads = _grads(ref_fn, inputs, dout)
            shards = [shard_sequence(t, 1, rank, cp) for t in (*inputs, dout)]
            out, grads = _grads(cp_fn, shards[:-1], shards[-1])
            errs.append((out - shard_sequence(ref, 1, rank, cp)).abs().max().item())
            for a, b in zip(grads, ref_grads):
                errs.append((a - shard_sequence(b, 1, rank, cp)).abs().max().item())
    return {"err": max(errs), "sent": dict(sent)}


def _cases(attention_cases, mamba_cases) -> tuple[list, list]:
    """One process group per world size for all cases (spawning costs more than the cases)."""
    return [_attention_case(*c) for c in attention_cases], [_mamba_case(*c) for c in mamba_cases]


# (seq, conv width): seq 16 at CP=4 gives 2-token chunks, so the 3-row conv halo spans 2.
MAMBA_CASES = {cp: [(8 * cp, 4), (16 * cp, 4)] for cp in (2, 4)}


@pytest.mark.parametrize("cp", [2, 4])
def test_mamba_state_passing_and_conv_halo_exact(cp, request):
    results = [mamba for _, mamba in request.getfixturevalue(f"cp{cp}")]
    cases = MAMBA_CASES[cp]
    state = B * 4 * (3 * 5 + 1)  # b x heads x (head_dim x state + log decay)
    for rank in results:
        for case, result in zip(cases, rank):
            assert result["err"] < 1e-10, case
            sent = result["sent"]
            # Each rank contributes its 2 chunk states to the other cp-1 ranks.
            assert sent["mamba_state.forward"] == 2 * (cp - 1) * state
        assert rank[0]["sent"] == rank[1]["sent"]  # twice the sequence, same traffic

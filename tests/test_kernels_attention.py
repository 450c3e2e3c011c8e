"""Tests for hybrid_megatron.kernels.attention (CPU; flex compiled for only two shapes)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hybrid_megatron.kernels import attention as attn_mod
from hybrid_megatron.kernels.attention import (
    BACKENDS,
    attention,
    available_backends,
    resolve_backend,
    to_left_right_window,
)

ATOL = 1e-5
CPU = torch.device("cpu")


def swa_mask(sq: int, sk: int, window: int | None) -> torch.Tensor:
    """Explicit [sq, sk] mask, written independently of the module: query row r is at sk-sq+r."""
    mask = torch.zeros(sq, sk, dtype=torch.bool)
    for r in range(sq):
        i = sk - sq + r
        lo = 0 if window is None else max(0, i - window + 1)
        mask[r, lo : i + 1] = True
    return mask


def reference(q, k, v, window, scale=None):
    """Explicit scores + boolean mask + softmax, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~swa_mask(q.shape[-2], k.shape[-2], window), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def make_qkv(b, hq, hkv, sq, sk, d, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g)
    k = torch.randn(b, hkv, sk, d, generator=g)
    v = torch.randn(b, hkv, sk, d, generator=g)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def fwd_and_grads(fn, q, k, v, seed=1):
    out = fn(q, k, v)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), cot)
    return out, grads


def assert_matches(fn, ref_fn, q, k, v, atol=ATOL):
    out, grads = fwd_and_grads(fn, q, k, v)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_grads = fwd_and_grads(ref_fn, q64, k64, v64)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0)
    for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
        assert g.shape == rg.shape, name
        torch.testing.assert_close(g.double(), rg, atol=atol, rtol=0, msg=f"grad {name}")


# ------------------------------------------------------------------ numerics vs reference
@pytest.mark.parametrize("backend", ["sdpa", "flex_eager"])
@pytest.mark.parametrize("heads", [(4, 2), (2, 2)], ids=["gqa", "mha"])
@pytest.mark.parametrize("window", [None, 5, 130])
@pytest.mark.parametrize(
    "sq,sk", [(24, 24), (7, 24), (1, 24), (300, 300), (200, 300)], ids=lambda x: str(x)
)
def test_matches_reference(backend, heads, window, sq, sk):
    hq, hkv = heads
    q, k, v = make_qkv(2, hq, hkv, sq, sk, 16)
    kwargs = {"backend": "flex", "flex_eager": True} if backend == "flex_eager" else {}
    kwargs.setdefault("backend", backend)
    assert_matches(
        lambda q, k, v: attention(q, k, v, window=window, **kwargs),
        lambda q, k, v: reference(q, k, v, window),
        q,
        k,
        v,
    )


@pytest.mark.parametrize("backend", ["sdpa", "flex_eager"])
def test_softmax_scale(backend):
    q, k, v = make_qkv(1, 4, 2, 20, 20, 16)
    kwargs = {"backend": "flex", "flex_eager": True} if backend == "flex_eager" else {}
    kwargs.setdefault("backend", backend)
    assert_matches(
        lambda q, k, v: attention(q, k, v, window=6, softmax_scale=0.3, **kwargs),
        lambda q, k, v: reference(q, k, v, 6, scale=0.3),
        q,
        k,
        v,
    )


# The acceptance criterion: flex SWA equals a masked-SDPA reference (fwd and grads, fp32, 1e-5).
# Compiled flex: only these two shapes are compiled in the whole test file.
@pytest.mark.parametrize("sq,sk", [(300, 300), (45, 300)], ids=["prefill", "sq<sk"])
def test_compiled_flex_swa_equals_masked_sdpa(sq, sk):
    window = 64
    q, k, v = make_qkv(2, 4, 2, sq, sk, 32, seed=3)
    mask = swa_mask(sq, sk, window)

    def masked_sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    out, grads = fwd_and_grads(
        lambda q, k, v: attention(q, k, v, window=window, backend="flex", flex_eager=False),
        q,
        k,
        v,
    )
    ref_q, ref_k, ref_v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref, ref_grads = fwd_and_grads(masked_sdpa, ref_q, ref_k, ref_v)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, atol=ATOL, rtol=0, msg=f"grad {name}")
    # Inference (no autograd) through the same compiled graph gives the same output.
    with torch.no_grad():
        torch.testing.assert_close(
            attention(q, k, v, window=window, backend="flex", flex_eager=False),
            ref,
            atol=ATOL,
            rtol=0,
        )


# ------------------------------------------------------------------------- window semantics
WINDOW_BACKENDS = [{"backend": "sdpa"}, {"backend": "flex", "flex_eager": True}]


@pytest.mark.parametrize("kwargs", WINDOW_BACKENDS, ids=["sdpa", "flex_eager"])
@pytest.mark.parametrize("sq", [12, 5])
def test_window_one_attends_only_self(kwargs, sq):
    q, k, v = make_qkv(1, 4, 2, sq, 12, 8, requires_grad=False)
    out = attention(q, k, v, window=1, **kwargs)
    expected = v.repeat_interleave(2, dim=1)[:, :, -sq:]
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs", WINDOW_BACKENDS, ids=["sdpa", "flex_eager"])
@pytest.mark.parametrize("sq", [12, 4])
def test_window_at_least_seq_len_is_full_causal(kwargs, sq):
    q, k, v = make_qkv(1, 4, 2, sq, 12, 8, requires_grad=False)
    full = attention(q, k, v, window=None, **kwargs)
    for window in (12, 13, 1000):
        torch.testing.assert_close(attention(q, k, v, window=window, **kwargs), full)
    torch.testing.assert_close(full.double(), reference(q, k, v, None), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kwargs", WINDOW_BACKENDS, ids=["sdpa", "flex_eager"])
@pytest.mark.parametrize("sq", [16, 6, 1])
def test_window_three_sees_self_and_two_previous(kwargs, sq):
    sk = 16
    q, k, _ = make_qkv(1, 2, 1, sq, sk, sk, requires_grad=False)
    v = torch.eye(sk).expand(1, 1, sk, sk)  # value of key j is the one-hot e_j
    weights = attention(q, k, v, window=3, **kwargs)[0]  # [h, sq, sk]: the attention rows
    for r in range(sq):
        i = sk - sq + r
        seen = {j for j in range(sk) if (weights[:, r, j] > 0).all()}
        unseen = {j for j in range(sk) if (weights[:, r, j] == 0).all()}
        assert seen == {j for j in (i - 2, i - 1, i) if j >= 0}, (r, i)
        assert seen | unseen == set(range(sk))
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, sq))


def test_to_left_right_window():
    assert to_left_right_window(128) == (127, 0)
    assert to_left_right_window(1) == (0, 0)
    assert to_left_right_window(None) == (-1, 0)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4"])
def test_invalid_window_raises(bad):
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, requires_grad=False)
    with pytest.raises(ValueError, match=repr(bad).replace(".", r"\.")):
        attention(q, k, v, window=bad, backend="sdpa")
    with pytest.raises(ValueError, match="window"):
        to_left_right_window(bad)


def test_invalid_shapes_raise():
    q, k, v = make_qkv(1, 3, 2, 4, 4, 8, requires_grad=False)
    with pytest.raises(ValueError, match="multiple"):
        attention(q, k, v)
    q, k, v = make_qkv(1, 2, 2, 5, 4, 8, requires_grad=False)
    with pytest.raises(ValueError, match="must not exceed"):
        attention(q, k, v)


# --------------------------------------------------------------------------------- backends
def test_available_backends_keys():
    avail = available_backends()
    assert tuple(avail) == BACKENDS
    assert avail["auto"] and avail["sdpa"] and avail["flex"]


@pytest.mark.skipif(available_backends()["flash_attn"], reason="flash-attn is installed")
def test_unavailable_flash_attn_raises_with_hint():
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, requires_grad=False)
    with pytest.raises(RuntimeError, match="flash_attn") as err:
        attention(q, k, v, backend="flash_attn")
    assert "pip install flash-attn" in str(err.value)
    assert "attention_backend: sdpa" in str(err.value)


def test_te_backend_raises():
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, requires_grad=False)
    match = "model-spec" if available_backends()["te"] else "transformer_engine"
    with pytest.raises(RuntimeError, match=match):
        attention(q, k, v, backend="te")


def test_unknown_backend_raises():
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, requires_grad=False)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, backend="xformers")


@pytest.fixture
def all_available(monkeypatch):
    monkeypatch.setattr(attn_mod, "available_backends", lambda: dict.fromkeys(BACKENDS, True))


def test_flash_attn_on_cpu_raises(all_available):
    with pytest.raises(RuntimeError, match="CUDA fp16/bf16"):
        resolve_backend("flash_attn", device=CPU, window=None, seq_len=8, dtype=torch.float32)


def test_auto_resolution(all_available):
    cuda = torch.device("cuda")
    n = attn_mod.FLEX_MIN_SEQ_LEN

    def auto(**kw):
        args = {"device": CPU, "window": 128, "seq_len": n, "dtype": torch.float32} | kw
        return resolve_backend("auto", **args)

    assert auto(device=cuda, dtype=torch.bfloat16) == "flash_attn"
    assert auto(device=cuda, dtype=torch.float32) == "flex"
    assert auto() == "flex"
    assert auto(seq_len=n - 1) == "sdpa"  # short sequence
    assert auto(window=None) == "sdpa"  # full causal
    assert auto(window=n) == "sdpa"  # window too close to the sequence length to pay off
    assert auto(q_len=1) == "sdpa"  # KV-cached decoding: avoid a flex compile per step


def test_float64_never_reaches_compiled_flex(monkeypatch):
    """Inductor's CPU flex refuses float64: auto picks SDPA, an explicit flex says why."""
    n = attn_mod.FLEX_MIN_SEQ_LEN
    args = {"device": CPU, "window": 128, "seq_len": n}
    assert resolve_backend("auto", dtype=torch.float32, **args) == "flex"
    assert resolve_backend("auto", dtype=torch.float64, **args) == "sdpa"

    def no_compile():
        raise AssertionError("compiled flex must not see float64")

    monkeypatch.setattr(attn_mod, "_compiled_flex", no_compile)
    q, k, v = make_qkv(1, 2, 2, n, n, 8, requires_grad=False)
    q, k, v = q.double(), k.double(), v.double()
    out = attention(q, k, v, window=128)  # auto at a length where fp32 would use flex
    torch.testing.assert_close(out, attention(q, k, v, window=128, backend="sdpa"))
    with pytest.raises(ValueError, match="does not support torch.float64.*sdpa"):
        attention(q, k, v, window=128, backend="flex", flex_eager=False)


def test_auto_without_optional_packages(monkeypatch):
    avail = dict.fromkeys(BACKENDS, True) | {"flash_attn": False, "flex": False}
    monkeypatch.setattr(attn_mod, "available_backends", lambda: avail)
    args = {"window": 128, "seq_len": 8192, "dtype": torch.bfloat16}
    assert resolve_backend("auto", device=torch.device("cuda"), **args) == "sdpa"
    with pytest.raises(RuntimeError, match="flex"):
        resolve_backend("flex", device=CPU, **args)


def test_flex_eager_env(monkeypatch):
    def no_compile():
        raise AssertionError("compiled flex used although eager mode was requested")

    monkeypatch.setattr(attn_mod, "_compiled_flex", no_compile)
    monkeypatch.setenv(attn_mod.FLEX_EAGER_ENV, "1")
    q, k, v = make_qkv(1, 2, 2, 10, 10, 8, requires_grad=False)
    out = attention(q, k, v, window=4, backend="flex")
    torch.testing.assert_close(out.double(), reference(q, k, v, 4), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- mask caching
def test_sdpa_mask_is_cached():
    a = attn_mod.sdpa_mask(5, 9, 3, CPU)
    assert attn_mod.sdpa_mask(5, 9, 3, CPU) is a
    assert torch.equal(a, swa_mask(5, 9, 3))


@pytest.mark.parametrize(
    "sq,sk,window", [(300, 300, None), (300, 300, 100), (1, 1000, 200), (130, 260, 7)]
)
def test_flex_block_mask_matches_dense(sq, sk, window):
    block_mask = attn_mod.flex_block_mask(sq, sk, window, CPU)
    assert torch.equal(block_mask.to_dense()[0, 0], dense_block_map(sq, sk, window))
    assert attn_mod.flex_block_mask(sq, sk, window, CPU) is block_mask


def dense_block_map(sq, sk, window, bs=attn_mod.FLEX_BLOCK_SIZE):
    """Which bs x bs tiles of the dense mask contain any visible pair."""
    mask = swa_mask(sq, sk, window)
    padded = torch.zeros(-(-sq // bs) * bs, -(-sk // bs) * bs, dtype=torch.bool)
    padded[:sq, :sk] = mask
    return padded.unflatten(0, (-1, bs)).unflatten(2, (-1, bs)).any(dim=(1, 3)).int()


def test_flex_block_mask_is_sparse_for_swa():
    block_mask = attn_mod.flex_block_mask(16384, 16384, 128, CPU)
    visited = block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum()
    assert visited == 2 * 128 - 1  # diagonal tile plus the one before it, per query tile


@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("sq,sk", [(600, 600), (1, 600), (300, 610)])
def test_left_padded_attention_equals_each_row_alone(window, sq, sk):
    """Batched generation: a left-padded row gives what the row gives alone, without pads.

    600 queries run in chunks of `_PADDED_CHUNK` (256), each over only its band of keys.
    """
    torch.manual_seed(0)
    pads = [0, 7, 300]
    q = torch.randn(len(pads), 4, sq, 16, dtype=torch.float64)
    k = torch.randn(len(pads), 2, sk, 16, dtype=torch.float64)
    v = torch.randn(len(pads), 2, sk, 16, dtype=torch.float64)
    keys = torch.ones(len(pads), sk, dtype=torch.bool)
    for b, p in enumerate(pads):
        keys[b, :p] = False
    out = attention(q, k, v, window=window, backend="sdpa", key_padding_mask=keys)
    for b, p in enumerate(pads):
        real_q = max(0, sq - (sk - p))  # queries that are pads (they exist when sq > sk - p)
        alone = reference(
            q[b : b + 1, :, real_q:], k[b : b + 1, :, p:], v[b : b + 1, :, p:], window
        )
        torch.testing.assert_close(out[b : b + 1, :, real_q:], alone, rtol=1e-10, atol=1e-10)
    assert torch.isfinite(out).all()  # pad queries see themselves: no empty softmax rows

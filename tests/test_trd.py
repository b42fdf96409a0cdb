"""Integration tests of `sara.trd`: chunked vs reference (values and gradients), edge cases, dtypes,
input validation, and the memory bound of the chunked version at N = 16,384."""
import os
from pathlib import Path
import sys

import pytest
import torch
import torch.nn.functional as F

from sara.routing import ROUTING_OPS
from sara.trd import (TRD_IMPLS, check_trd_inputs, trd_auto_impl, trd_block_rows, trd_chunked,
                      trd_compute_dtype, trd_loss, trd_reference)

F64 = torch.float64


def _inputs(B, N, Dp, Dy, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(B, N, Dp, generator=g, dtype=dtype)
    y = torch.randn(B, N, Dy, generator=g, dtype=dtype)
    w = torch.rand(B, N, generator=g, dtype=dtype)
    return p, y, w


def _loss_and_grads(fn, p, y, **kw):
    p, y = p.clone().requires_grad_(), y.clone().requires_grad_()
    loss = fn(p, y, **kw)
    loss.backward()
    return loss.detach(), p.grad, y.grad


@pytest.mark.parametrize("op", ROUTING_OPS)
@pytest.mark.parametrize("B,N,Dp,Dy,block", [
    (1, 1, 4, 4, None), (3, 1, 2, 5, 1),
    (1, 7, 8, 8, 3), (3, 7, 6, 4, 2),
    (1, 33, 16, 8, 5), (3, 33, 8, 8, None),
    (1, 100, 8, 12, 7), (3, 100, 12, 8, 64),
])
def test_chunked_matches_reference(op, B, N, Dp, Dy, block):
    p, y, w = _inputs(B, N, Dp, Dy, seed=B * 1000 + N)
    # small D makes |S_p - S_y| spread across the margin, so the hinge is active and inactive
    ref = _loss_and_grads(trd_reference, p, y, w=w, op=op, margin=0.1)
    chk = _loss_and_grads(trd_chunked, p, y, w=w, op=op, margin=0.1, block=block)
    assert ref[0].dtype == chk[0].dtype == F64 and chk[0].ndim == 0
    torch.testing.assert_close(chk[0], ref[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(chk[1], ref[1], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(chk[2], ref[2], rtol=1e-10, atol=1e-13)
    if N > 1: assert ref[0] > 0 and ref[1].abs().sum() > 0


@pytest.mark.parametrize("op", ROUTING_OPS)
def test_gradcheck_chunked(op):
    p, y, w = _inputs(2, 5, 3, 4, seed=7)
    p.requires_grad_(); y.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: trd_chunked(a, b, w, op, 0.05, block=2), (p, y))
    assert torch.autograd.gradcheck(lambda a, b: trd_reference(a, b, w, op, 0.05), (p, y))


def test_only_p_requires_grad():
    p, y, w = _inputs(2, 9, 4, 4)
    p1 = p.clone().requires_grad_()
    trd_chunked(p1, y, w, "or", block=4).backward()
    p2 = p.clone().requires_grad_()
    trd_reference(p2, y, w, "or").backward()
    torch.testing.assert_close(p1.grad, p2.grad)


def test_uniform_is_plain_mean_and_ignores_w():
    p, y, w = _inputs(3, 11, 5, 7)
    ph, yh = F.normalize(p, dim=-1), F.normalize(y, dim=-1)
    plain = torch.relu((ph @ ph.mT - yh @ yh.mT).abs() - 0.2).mean()
    for impl in ("reference", "chunked", "auto"):
        torch.testing.assert_close(trd_loss(p, y, margin=0.2, impl=impl), plain, rtol=1e-13, atol=0)
        # w is ignored under uniform, even a malformed one
        torch.testing.assert_close(trd_loss(p, y, w=torch.full((1, 2), 5.0), margin=0.2, impl=impl), plain)


def test_weighted_formula_by_hand():
    p, y, w = _inputs(2, 6, 3, 3)
    ph, yh = F.normalize(p, dim=-1), F.normalize(y, dim=-1)
    d = torch.relu((ph @ ph.mT - yh @ yh.mT).abs() - 0.1)
    W = w[:, :, None] + w[:, None, :] - w[:, :, None] * w[:, None, :]
    torch.testing.assert_close(trd_loss(p, y, w, "or"), (W * d).sum() / W.sum(), rtol=1e-13, atol=0)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_large_margin_gives_zero(impl):
    p, y, w = _inputs(2, 8, 4, 4)
    loss, gp, gy = _loss_and_grads(lambda a, b, **k: trd_loss(a, b, impl=impl, **k), p, y, w=w, op="or", margin=2.5)
    assert loss.item() == 0.0
    assert torch.equal(gp, torch.zeros_like(gp)) and torch.equal(gy, torch.zeros_like(gy))


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("op,wval", [("and", 0.0), ("or", 0.0), ("xor", 1.0), ("xor", 0.0)])
def test_zero_total_weight(impl, op, wval):
    p, y, _ = _inputs(2, 8, 4, 4)
    w = torch.full((2, 8), wval, dtype=F64)
    loss, gp, gy = _loss_and_grads(lambda a, b, **k: trd_loss(a, b, impl=impl, **k), p, y, w=w, op=op)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert torch.equal(gp, torch.zeros_like(gp)) and torch.equal(gy, torch.zeros_like(gy))


def test_w_gets_no_gradient():
    p, y, w = _inputs(1, 6, 4, 4)
    w = w.clone().requires_grad_()
    for impl in ("reference", "chunked"):
        loss = trd_loss(p.clone().requires_grad_(), y, w, "or", impl=impl)
        assert not loss.grad_fn is None
        loss.backward()
        assert w.grad is None


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_inputs(half):
    p, y, w = _inputs(2, 40, 16, 8, dtype=torch.float32)
    ph_, yh_ = p.to(half), y.to(half)
    for impl in ("reference", "chunked"):
        pb = ph_.clone().requires_grad_()
        lb = trd_loss(pb, yh_, w, "or", impl=impl)
        lb.backward()
        assert lb.dtype == torch.float32 and lb.ndim == 0
        assert pb.grad.dtype == half and torch.isfinite(pb.grad.float()).all()
        # exactly the float32 computation on the rounded inputs, close to the unrounded float32 one
        torch.testing.assert_close(lb, trd_loss(ph_.float(), yh_.float(), w, "or", impl=impl), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lb, trd_loss(p, y, w, "or", impl=impl), rtol=3e-2, atol=1e-3)
    assert trd_compute_dtype(p.bfloat16(), y.double()) == F64


def test_float32_chunked_vs_reference():
    p, y, w = _inputs(2, 300, 32, 16, dtype=torch.float32)
    for op in ROUTING_OPS:
        a = _loss_and_grads(trd_reference, p, y, w=w, op=op)
        b = _loss_and_grads(trd_chunked, p, y, w=w, op=op, block=37)
        assert b[0].dtype == torch.float32
        torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b[1], a[1], rtol=1e-4, atol=1e-7)


def test_block_rows():
    assert trd_block_rows(1, 16384) == 512  # 512 x 16384 x 4 B = 32 MiB
    assert trd_block_rows(1, 16384, itemsize=8) == 256
    assert trd_block_rows(8, 10**7) == 1
    assert trd_block_rows(1, 5) == 5


def test_dispatch():
    assert TRD_IMPLS == ("auto", "reference", "chunked", "triton")
    assert trd_auto_impl(torch.zeros(1, 1, 1)) == "chunked"
    p, y, w = _inputs(2, 5, 3, 3)
    torch.testing.assert_close(trd_loss(p, y, w, "xor"), trd_loss(p, y, w, "xor", impl="reference"))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(y=torch.randn(2, 6, 3)), ValueError, r"p has shape \(2, 5, 3\), y has shape \(2, 6, 3\)"),
    (dict(y=torch.randn(3, 5, 3)), ValueError, r"\(3, 5, 3\)"),
    (dict(p=torch.randn(5, 3)), ValueError, r"p must have shape \(B, N, D\).*\(5, 3\)"),
    (dict(y=torch.randn(2, 5, 3, 1)), ValueError, r"y must have shape.*\(2, 5, 3, 1\)"),
    (dict(p=torch.ones(2, 5, 3, dtype=torch.long)), TypeError, "p must have a floating dtype"),
    (dict(p=torch.randn(2, 0, 3), y=torch.randn(2, 0, 3)), ValueError, "N >= 1"),
    (dict(op="or", w=None), ValueError, r"w \(saliency.*required.*'or'"),
    (dict(op="or", w=torch.full((2, 5), 1.5)), ValueError, "w.*max=1.5"),
    (dict(op="or", w=torch.full((2, 5), float("nan"))), ValueError, "w.*NaN"),
    (dict(op="or", w=torch.rand(2, 4)), ValueError, r"w has shape \(2, 4\).*N=5"),
    (dict(op="or", w=torch.rand(3, 5)), ValueError, r"w has shape \(3, 5\).*batch"),
    (dict(op="or", w=torch.rand(2, 5, 1)), ValueError, r"w must have shape \(B, N\)"),
    (dict(op="nand", w=torch.rand(2, 5)), ValueError, "'nand'.*uniform, or, and, xor"),
    (dict(impl="fused"), ValueError, "'fused'.*auto, reference, chunked, triton"),
    (dict(margin=-0.1), ValueError, "margin.*-0.1"),
    (dict(margin=float("inf")), ValueError, "margin"),
])
def test_bad_inputs(kwargs, exc, match):
    args = dict(p=torch.randn(2, 5, 3), y=torch.randn(2, 5, 3), w=None, op="uniform", margin=0.1, impl="auto")
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        trd_loss(**args)
    if "impl" not in kwargs:
        args.pop("impl")
        for fn in (trd_reference, trd_chunked):
            with pytest.raises(exc, match=match):
                fn(**args)


def test_bad_block():
    p, y, _ = _inputs(1, 4, 2, 2)
    for b in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="block"):
            trd_chunked(p, y, block=b)


# ---------------------------------------------------------------- memory, in a fresh process
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_trd_cpu import run_fresh  # the same measurement the CPU benchmark prints


def _measure(impl, N, D=64):
    res = run_fresh(impl, N, D)
    print(f"\n{impl} TRD fwd+bwd N={N} D={D} B=1 float32: peak extra RSS {res['extra_mib']:.1f} MiB "
          f"({res['method']}), {res['seconds']:.2f} s")
    return res


def test_chunked_memory_n16384():
    N = 16_384
    nxn_mib = N * N * 4 / 2**20
    assert nxn_mib == 1024  # one N x N float32 matrix is 1 GiB
    res = _measure("chunked", N)
    assert res["extra_mib"] < 300, res


def test_reference_memory_grows_quadratically():
    # at N = 4096 one N x N float32 matrix is 64 MiB; the reference holds several of them at once
    res = _measure("reference", 4096)
    assert res["extra_mib"] >= 3 * 64, res


@pytest.mark.skipif(os.environ.get("SARA_SLOW") != "1", reason="slow (several GiB, ~1 min); set SARA_SLOW=1")
def test_reference_memory_n16384_slow():
    res = _measure("reference", 16_384)
    assert res["extra_mib"] >= 1024, res

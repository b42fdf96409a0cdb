"""Integration tests of `sara.routing`: operator formulas, closed forms vs dense, budget shares, bad input."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sara.routing import (ROUTING_OPS, block_pair_sum, budget_shares, check_op, check_saliency,
                          pair_weight_total, pair_weights, route)

F64 = torch.float64


def test_ops_tuple():
    assert ROUTING_OPS == ("uniform", "or", "and", "xor")


# hand-computed for w = (0, 0.5, 1)
HAND = {
    "uniform": [[1, 1, 1], [1, 1, 1], [1, 1, 1]],
    "or": [[0, .5, 1], [.5, .75, 1], [1, 1, 1]],
    "and": [[0, 0, 0], [0, .25, .5], [0, .5, 1]],
    "xor": [[0, .5, 1], [.5, .5, .5], [1, .5, 0]],
}


@pytest.mark.parametrize("op", ROUTING_OPS)
def test_hand_example(op):
    w = torch.tensor([[0.0, 0.5, 1.0]], dtype=F64)
    expect = torch.tensor(HAND[op], dtype=F64)
    assert torch.equal(pair_weights(w, op)[0], expect)
    assert torch.equal(route(w[0, :, None], w[0, None, :], op), expect)
    assert pair_weight_total(w, op).item() == pytest.approx(expect.sum().item(), abs=1e-15)


@pytest.mark.parametrize("op", ROUTING_OPS)
def test_route_broadcasts_and_symmetric(op):
    w = torch.rand(2, 5, dtype=F64)
    W = route(w[:, :, None], w[:, None, :], op)
    assert W.shape == (2, 5, 5)
    assert torch.equal(W, W.transpose(1, 2))
    assert (W >= 0).all()


def _dense_shares(w, op, thr=0.5):
    W, fg = pair_weights(w, op), w >= thr
    tot = W.sum()
    ff = W[fg[:, :, None] & fg[:, None, :]].sum()
    bb = W[~fg[:, :, None] & ~fg[:, None, :]].sum()
    return {"fg_fg": float(ff / tot), "fg_bg": float((tot - ff - bb) / tot), "bg_bg": float(bb / tot)}


@pytest.mark.parametrize("op", ROUTING_OPS)
def test_closed_forms_match_dense(op):
    g = torch.Generator().manual_seed(3)
    for B, N in [(1, 1), (2, 7), (3, 64)]:
        w = torch.rand(B, N, generator=g, dtype=F64)
        w[:, 0] = 1.0  # include the endpoints of [0, 1]
        if N > 1: w[:, 1] = 0.0
        torch.testing.assert_close(pair_weight_total(w, op), pair_weights(w, op).sum((1, 2)), rtol=1e-12, atol=1e-12)
        sh = budget_shares(w, op, threshold=0.4)
        if float(pair_weights(w, op).sum()) > 0:
            dense = _dense_shares(w, op, 0.4)
            for k in dense: assert sh[k] == pytest.approx(dense[k], abs=1e-12)
        else:  # e.g. xor with the single token w = 1
            assert sh == {"fg_fg": 0.0, "fg_bg": 0.0, "bg_bg": 0.0}
        ma, mb = w > 0.25, w < 0.8
        blk = (pair_weights(w, op) * ma[:, :, None] * mb[:, None, :]).sum((1, 2))
        torch.testing.assert_close(block_pair_sum(w, w, op, ma, mb), blk, rtol=1e-12, atol=1e-12)


def test_total_closed_form_formulas():
    w = torch.rand(4, 11, dtype=F64)
    s, N = w.sum(1), 11
    torch.testing.assert_close(pair_weight_total(w, "uniform"), torch.full((4,), 121.0, dtype=F64))
    torch.testing.assert_close(pair_weight_total(w, "or"), 2 * N * s - s**2)
    torch.testing.assert_close(pair_weight_total(w, "and"), s**2)
    torch.testing.assert_close(pair_weight_total(w, "xor"), 2 * N * s - 2 * s**2)
    assert pair_weight_total(w.float(), "or").dtype == torch.float32


def test_block_pair_sum_disjoint_sets():
    w = torch.rand(2, 10, dtype=F64)
    for op in ROUTING_OPS:
        torch.testing.assert_close(block_pair_sum(w[:, :3], w[:, 3:], op), pair_weights(w, op)[:, :3, 3:].sum((1, 2)))
    with pytest.raises(ValueError, match=r"\(2, 10\)"):
        block_pair_sum(w, w[:1], "or")
    with pytest.raises(ValueError, match="mask shape"):
        block_pair_sum(w, w, "or", mask_a=torch.ones(2, 3, dtype=torch.bool))


def test_paper_budget_048():
    N = 10_000
    w = torch.zeros(1, N)
    w[0, :4800] = 1.0
    sh = budget_shares(w)  # uniform
    assert sh["fg_fg"] == pytest.approx(0.48**2, abs=1e-9)
    assert sh["fg_bg"] == pytest.approx(2 * 0.48 * 0.52, abs=1e-9)
    assert sh["bg_bg"] == pytest.approx(0.52**2, abs=1e-9)
    assert [round(100 * sh[k]) for k in ("fg_fg", "fg_bg", "bg_bg")] == [23, 50, 27]
    # binary map under OR: no weight on background-background pairs
    assert budget_shares(w, "or")["bg_bg"] == 0.0


def test_uniform_binary_fraction():
    for f in (0.0, 0.25, 1.0):
        n = 8
        w = torch.zeros(2, n)
        w[:, : int(f * n)] = 1.0
        sh = budget_shares(w)
        assert sh["fg_fg"] == pytest.approx(f * f) and sh["bg_bg"] == pytest.approx((1 - f) ** 2)


def test_zero_total_gives_zero_shares():
    sh = budget_shares(torch.zeros(2, 5), "and")
    assert sh == {"fg_fg": 0.0, "fg_bg": 0.0, "bg_bg": 0.0}
    sh = budget_shares(torch.ones(1, 4), "xor")
    assert sh == {"fg_fg": 0.0, "fg_bg": 0.0, "bg_bg": 0.0}
    assert pair_weight_total(torch.zeros(2, 5), "and").eq(0).all()


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([[0.1, 1.2]]), "max=1.2"),
    (torch.tensor([[-0.5, 0.3]]), "min=-0.5"),
    (torch.tensor([[float("nan"), 0.3]]), "NaN"),
    (torch.tensor([[float("inf"), 0.3]]), "non-finite"),
    (torch.rand(3), r"\(3,\)"),
    (torch.rand(1, 2, 3), r"\(1, 2, 3\)"),
])
def test_bad_saliency_values(bad, match):
    with pytest.raises(ValueError, match=match):
        check_saliency(bad, name="saliency")
    with pytest.raises(ValueError, match=match):
        budget_shares(bad)


def test_bad_saliency_names_field_and_types():
    with pytest.raises(ValueError, match="sal_map"):
        check_saliency(torch.tensor([[2.0]]), name="sal_map")
    with pytest.raises(TypeError, match="floating.*int64"):
        check_saliency(torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        check_saliency([[0.5]])
    with pytest.raises(ValueError, match=r"\(2, 3\).*N=5"):
        check_saliency(torch.rand(2, 3), n=5)
    w = torch.rand(2, 3)
    assert check_saliency(w, n=3) is w


def test_unknown_op():
    w = torch.rand(1, 3)
    for fn in (lambda: check_op("nand"), lambda: route(w, w, "nand"), lambda: pair_weights(w, "nand"),
               lambda: pair_weight_total(w, "nand"), lambda: budget_shares(w, "nand")):
        with pytest.raises(ValueError, match="'nand'.*uniform, or, and, xor"):
            fn()
    with pytest.raises(ValueError, match="threshold"):
        budget_shares(w, threshold=float("nan"))


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 3), N=st.integers(0, 24), op=st.sampled_from(ROUTING_OPS),
       seed=st.integers(0, 2**31 - 1), binary=st.booleans(), thr=st.floats(0.0, 1.0))
def test_property_dense_vs_closed_form(B, N, op, seed, binary, thr):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(B, N, generator=g, dtype=F64)
    if binary: w = (w > 0.5).to(F64)
    dense_tot = pair_weights(w, op).sum((1, 2))
    tot = pair_weight_total(w, op)
    torch.testing.assert_close(tot, dense_tot, rtol=1e-12, atol=1e-12)
    assert (tot >= 0).all()
    sh = budget_shares(w, op, threshold=thr)
    vals = list(sh.values())
    assert all(math.isfinite(v) and v >= 0 for v in vals)
    if float(dense_tot.sum()) > 0:
        assert sum(vals) == pytest.approx(1.0, abs=1e-12)
        dense = _dense_shares(w, op, thr)
        for k in dense: assert sh[k] == pytest.approx(dense[k], abs=1e-10)
    else:
        assert vals == [0.0, 0.0, 0.0]

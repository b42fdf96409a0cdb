"""Property-based tests (hypothesis) of the public routing and TRD functions: every shape, dtype and
saliency pattern gives the right value, or a clear TypeError/ValueError naming the input at fault;
never a silent NaN.

Rules checked here (documented in `sara.routing` / `sara.trd`):
* routing: empty batches (B = 0) and empty sequences (N = 0) are valid; their total pair weight is 0,
  so every budget share is 0.0. Shares otherwise sum to 1.
* TRD: B = 0, N = 0 and D = 0 are errors (a mean over no pairs); N = 1 gives 0 (up to rounding).
  NaN/Inf in p or y is refused naming the tensor and the count (`check_finite=True`, the default);
  with `check_finite=False` the loss is non-finite (never a finite wrong number) for the caller
  (the Stage 2 loop) to skip.
"""
import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

from sara.routing import (ROUTING_OPS, block_pair_sum, budget_shares, check_saliency, pair_weight_total,
                          pair_weights, route)
from sara.trd import trd_chunked, trd_compute_dtype, trd_loss, trd_reference

F64 = torch.float64
FLOATS = (torch.float32, torch.float64, torch.bfloat16)
W_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SALIENCY = ("random", "binary", "all_fg", "all_bg", "endpoints")
PROPS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------- helpers


def make_w(B, N, kind, seed, dtype=F64) -> torch.Tensor:
    "A (B, N) saliency map of the given pattern."
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(B, N, generator=g, dtype=F64)
    if kind == "binary": w = (w > 0.5).to(F64)
    elif kind == "all_fg": w = torch.ones(B, N, dtype=F64)
    elif kind == "all_bg": w = torch.zeros(B, N, dtype=F64)
    elif kind == "endpoints" and N: w[:, 0] = 1.0; w[:, -1] = 0.0
    return w.to(dtype)


def dense_weights(w: torch.Tensor, op: str) -> torch.Tensor:
    "Pair weights written out independently of `sara.routing` (float64)."
    w = w.to(F64)
    a, b = w[:, :, None], w[:, None, :]
    return {"uniform": torch.ones_like(a * b), "or": 1 - (1 - a) * (1 - b), "and": a * b,
            "xor": a * (1 - b) + b * (1 - a)}[op]


def dense_trd(p, y, w, op, margin) -> torch.Tensor:
    "The TRD loss by its definition, in float64, on the inputs as given (already rounded to their dtype)."
    ph, yh = F.normalize(p.to(F64), dim=-1), F.normalize(y.to(F64), dim=-1)
    d = torch.relu((ph @ ph.mT - yh @ yh.mT).abs() - margin)
    W = torch.ones_like(d) if op == "uniform" else dense_weights(w, op)
    z = W.sum()
    return (W * d).sum() / z if z > 0 else torch.zeros((), dtype=F64)


def tol(dtype) -> dict:
    return dict(rtol=1e-9, atol=1e-12) if dtype == F64 else dict(rtol=2e-4, atol=2e-5)


def poison(t: torch.Tensor, k: int, what: str, seed: int) -> torch.Tensor:
    "A copy of `t` with `k` distinct entries set to NaN, +Inf or -Inf (or a mix)."
    g = torch.Generator().manual_seed(seed)
    t = t.clone()
    flat = t.view(-1)
    idx = torch.randperm(flat.numel(), generator=g)[:k]
    vals = {"nan": [math.nan], "inf": [math.inf, -math.inf], "mix": [math.nan, math.inf, -math.inf]}[what]
    for n, i in enumerate(idx.tolist()): flat[i] = vals[n % len(vals)]
    return t


IMPLS = {"loss/reference": lambda *a, **k: trd_loss(*a, impl="reference", **k),
         "loss/chunked": lambda *a, **k: trd_loss(*a, impl="chunked", **k),
         "reference": trd_reference, "chunked": trd_chunked}

# ---------------------------------------------------------------- TRD: values


@PROPS
@given(B=st.integers(1, 3), N=st.integers(1, 10), Dp=st.integers(1, 5), Dy=st.integers(1, 5),
       pdt=st.sampled_from(FLOATS), ydt=st.sampled_from(FLOATS), wdt=st.sampled_from(W_DTYPES),
       op=st.sampled_from(ROUTING_OPS), kind=st.sampled_from(SALIENCY), margin=st.floats(0.0, 1.5),
       block=st.one_of(st.none(), st.integers(1, 12)), seed=st.integers(0, 2**31 - 1))
def test_trd_value_dtype_and_chunked_equal_reference(B, N, Dp, Dy, pdt, ydt, wdt, op, kind, margin, block, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(B, N, Dp, generator=g, dtype=F64).to(pdt)
    y = torch.randn(B, N, Dy, generator=g, dtype=F64).to(ydt)
    w = make_w(B, N, kind, seed, wdt)
    cdt = trd_compute_dtype(p, y)
    want = dense_trd(p, y, w, op, margin)
    out = {}
    for name, fn in IMPLS.items():
        kw = dict(block=block) if name == "chunked" else {}
        pg = p.clone().requires_grad_()
        loss = fn(pg, y, w, op=op, margin=margin, **kw)
        assert loss.ndim == 0 and loss.dtype == cdt, (name, loss.dtype)
        assert torch.isfinite(loss) and loss >= 0 and loss <= 2 + 1e-6, (name, loss)
        torch.testing.assert_close(loss.to(F64), want, **tol(cdt), msg=lambda m: f"{name}: {m}")
        loss.backward()
        assert pg.grad.dtype == pdt and torch.isfinite(pg.grad.float()).all(), name
        out[name] = pg.grad
    if cdt == F64:  # the hinge is discontinuous in the gradient: compare gradients where rounding agrees
        torch.testing.assert_close(out["chunked"], out["reference"], rtol=1e-9, atol=1e-12)


@PROPS
@given(B=st.integers(1, 3), N=st.integers(1, 9), D=st.integers(1, 4), dt=st.sampled_from(FLOATS),
       margin=st.floats(0.0, 0.5), seed=st.integers(0, 2**31 - 1))
def test_trd_all_foreground_and_all_background(B, N, D, dt, margin, seed):
    "w = 1 everywhere: OR and AND equal uniform TRD, XOR has no pairs (0). w = 0: OR, AND, XOR are 0."
    g = torch.Generator().manual_seed(seed)
    p, y = torch.randn(B, N, D, generator=g).to(dt), torch.randn(B, N, D, generator=g).to(dt)
    ones, zeros = torch.ones(B, N), torch.zeros(B, N)
    for impl in ("reference", "chunked"):
        uni = trd_loss(p, y, op="uniform", margin=margin, impl=impl)
        for op in ("or", "and"):
            assert torch.equal(trd_loss(p, y, ones, op, margin, impl=impl), uni) or \
                torch.allclose(trd_loss(p, y, ones, op, margin, impl=impl), uni, rtol=1e-6, atol=1e-7), (impl, op)
        for w, ops in ((ones, ("xor",)), (zeros, ("or", "and", "xor"))):
            for op in ops:
                q = p.clone().requires_grad_()
                loss = trd_loss(q, y, w, op, margin, impl=impl)
                loss.backward()
                assert loss.item() == 0.0 and not q.grad.abs().any(), (impl, op, w[0, 0].item())


@PROPS
@given(B=st.integers(1, 4), D=st.integers(1, 6), dt=st.sampled_from(FLOATS), op=st.sampled_from(ROUTING_OPS),
       kind=st.sampled_from(SALIENCY), margin=st.floats(1e-3, 1.0), seed=st.integers(0, 2**31 - 1))
def test_trd_single_token_is_zero(B, D, dt, op, kind, margin, seed):
    "N = 1: the only pair is (i, i), whose relations are both 1: the loss is 0 for every op."
    g = torch.Generator().manual_seed(seed)
    p, y = torch.randn(B, 1, D, generator=g).to(dt), torch.randn(B, 1, D, generator=g).to(dt)
    w = make_w(B, 1, kind, seed)
    for name, fn in IMPLS.items():
        loss = fn(p, y, w, op=op, margin=margin)
        assert loss.item() == 0.0, (name, loss)


# ---------------------------------------------------------------- TRD: bad input


@PROPS
@given(B=st.integers(1, 3), N=st.integers(1, 8), D=st.integers(1, 4), dt=st.sampled_from(FLOATS),
       where=st.sampled_from(("p", "y")), what=st.sampled_from(("nan", "inf", "mix")), k=st.integers(1, 4),
       op=st.sampled_from(ROUTING_OPS), kind=st.sampled_from(SALIENCY), seed=st.integers(0, 2**31 - 1))
def test_trd_non_finite_features_are_named_or_propagate(B, N, D, dt, where, what, k, op, kind, seed):
    g = torch.Generator().manual_seed(seed)
    t = dict(p=torch.randn(B, N, D, generator=g).to(dt), y=torch.randn(B, N, D, generator=g).to(dt))
    k = min(k, B * N * D)
    t[where] = poison(t[where], k, what, seed)
    w = make_w(B, N, kind, seed)
    for name, fn in IMPLS.items():
        with pytest.raises(ValueError, match=rf"^{where} \(shape {re.escape(str(tuple(t[where].shape)))}\) has {k} non-finite"):
            fn(t["p"], t["y"], w, op=op)
        # opted out: the caller sees a non-finite loss, never a finite wrong number
        loss = fn(t["p"], t["y"], w, op=op, check_finite=False)
        assert not torch.isfinite(loss), (name, loss)


@PROPS
@given(B=st.integers(1, 3), N=st.integers(1, 8), what=st.sampled_from(("nan", "inf", "mix", "above", "below")),
       k=st.integers(1, 3), op=st.sampled_from(("or", "and", "xor")), seed=st.integers(0, 2**31 - 1))
def test_trd_bad_saliency_is_named(B, N, what, k, op, seed):
    g = torch.Generator().manual_seed(seed)
    p, y = torch.randn(B, N, 3, generator=g), torch.randn(B, N, 3, generator=g)
    w = make_w(B, N, "random", seed, torch.float32)
    k = min(k, B * N)
    if what in ("above", "below"):
        w.view(-1)[torch.randperm(B * N, generator=g)[:k]] = 1.5 if what == "above" else -0.5
        match = r"^w \(shape .*\) must lie in \[0, 1\]"
    else:
        w = poison(w, k, what, seed)
        match = rf"^w \(shape \({B}, {N}\)\) has {k} non-finite"
    for name, fn in IMPLS.items():
        with pytest.raises(ValueError, match=match):
            fn(p, y, w, op=op)
    # uniform ignores w entirely
    assert torch.isfinite(trd_loss(p, y, w, "uniform"))


@PROPS
@given(empty=st.sampled_from(("B", "N", "Dp", "Dy")), B=st.integers(1, 3), N=st.integers(1, 5),
       dt=st.sampled_from(FLOATS), op=st.sampled_from(ROUTING_OPS))
def test_trd_empty_inputs_are_errors(empty, B, N, dt, op):
    "A mean over no pairs is undefined: B = 0, N = 0 or D = 0 raise in every implementation."
    shape = dict(B=B, N=N, Dp=3, Dy=2)
    shape[empty] = 0
    p = torch.randn(shape["B"], shape["N"], shape["Dp"]).to(dt)
    y = torch.randn(shape["B"], shape["N"], shape["Dy"]).to(dt)
    w = torch.rand(shape["B"], shape["N"])
    match = {"B": "B >= 1", "N": "N >= 1", "Dp": "p needs D >= 1", "Dy": "y needs D >= 1"}[empty]
    for name, fn in IMPLS.items():
        with pytest.raises(ValueError, match=match):
            fn(p, y, w, op=op)


@PROPS
@given(case=st.sampled_from(("p_ndim", "y_ndim", "bn_mismatch", "int_p", "list_p", "device", "w_ndim",
                             "w_batch", "w_tokens", "w_int", "margin_nan", "margin_neg", "op")),
       dt=st.sampled_from(FLOATS))
def test_trd_malformed_inputs_raise_clear_errors(case, dt):
    p, y, w = torch.randn(2, 5, 3).to(dt), torch.randn(2, 5, 4).to(dt), torch.rand(2, 5)
    kw = dict(op="or", margin=0.1)
    exc, match = ValueError, None
    if case == "p_ndim": p, match = p[0], r"p must have shape \(B, N, D\)"
    elif case == "y_ndim": y, match = y[..., None], r"y must have shape \(B, N, D\)"
    elif case == "bn_mismatch": y, match = y[:, :4], r"p and y must agree on \(B, N\)"
    elif case == "int_p": p, exc, match = torch.ones(2, 5, 3, dtype=torch.long), TypeError, "p must have a floating dtype"
    elif case == "list_p": p, exc, match = p.tolist(), TypeError, "p must be a torch.Tensor"
    elif case == "device": y, match = torch.empty(2, 5, 4, device="meta", dtype=dt), "one device"
    elif case == "w_ndim": w, match = w[0], r"w must have shape \(B, N\)"
    elif case == "w_batch": w, match = torch.rand(3, 5), "batch sizes differ"
    elif case == "w_tokens": w, match = torch.rand(2, 4), "N=5"
    elif case == "w_int": w, exc, match = torch.ones(2, 5, dtype=torch.long), TypeError, "w must have a floating dtype"
    elif case == "margin_nan": kw["margin"], match = math.nan, "margin"
    elif case == "margin_neg": kw["margin"], match = -0.2, "margin"
    elif case == "op": kw["op"], match = "nand", "'nand'"
    for name, fn in IMPLS.items():
        with pytest.raises(exc, match=match):
            fn(p, y, w, **kw)


# ---------------------------------------------------------------- routing


@PROPS
@given(B=st.integers(0, 3), N=st.integers(0, 12), dt=st.sampled_from(W_DTYPES), op=st.sampled_from(ROUTING_OPS),
       kind=st.sampled_from(SALIENCY), thr=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_routing_values_every_op(B, N, dt, op, kind, thr, seed):
    w = make_w(B, N, kind, seed, dt)
    want = dense_weights(w, op)                                     # B, N, N float64 on the rounded w
    W = pair_weights(w, op)
    assert W.shape == (B, N, N) and W.dtype == dt
    loose = dict(rtol=1e-2, atol=1e-2) if dt in (torch.float16, torch.bfloat16) else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(W.to(F64), want, **loose)
    assert torch.equal(W, W.transpose(1, 2)) and bool(((W >= 0) & (W <= 1)).all())
    torch.testing.assert_close(route(w[:, :, None], w[:, None, :], op), W, rtol=0, atol=0)
    tot = pair_weight_total(w, op)
    assert tot.shape == (B,) and tot.dtype == dt and bool((tot >= 0).all())
    torch.testing.assert_close(tot.to(F64), want.sum((1, 2)), rtol=1e-2 if dt in (torch.float16, torch.bfloat16) else 1e-6,
                               atol=1e-6)
    g = torch.Generator().manual_seed(seed + 1)
    ma, mb = torch.rand(B, N, generator=g) > 0.5, torch.rand(B, N, generator=g) > 0.3
    blk = block_pair_sum(w, w, op, ma, mb)
    torch.testing.assert_close(blk.to(F64), (want * ma[:, :, None] * mb[:, None, :]).sum((1, 2)),
                               rtol=1e-2 if dt in (torch.float16, torch.bfloat16) else 1e-6, atol=1e-6)
    sh = budget_shares(w, op, threshold=thr)
    vals = [sh["fg_fg"], sh["fg_bg"], sh["bg_bg"]]
    assert all(math.isfinite(v) and v >= 0 for v in vals)
    dense_total = float(want.sum())
    if dense_total > 0:
        assert sum(vals) == pytest.approx(1.0, abs=1e-12)
        fg = w.to(F64) >= thr
        ff = float(want[fg[:, :, None] & fg[:, None, :]].sum()) / dense_total
        bb = float(want[~fg[:, :, None] & ~fg[:, None, :]].sum()) / dense_total
        assert sh["fg_fg"] == pytest.approx(ff, abs=1e-9) and sh["bg_bg"] == pytest.approx(bb, abs=1e-9)
    else:  # empty batch, empty sequence, or an op that routes no pair: all shares are 0
        assert vals == [0.0, 0.0, 0.0]


@PROPS
@given(B=st.integers(1, 3), N=st.integers(1, 10), op=st.sampled_from(ROUTING_OPS), thr=st.floats(1e-6, 1.0))
def test_routing_all_foreground_and_all_background(B, N, op, thr):
    fg = budget_shares(torch.ones(B, N), op, threshold=thr)
    bg = budget_shares(torch.zeros(B, N), op, threshold=thr)
    assert fg == ({"fg_fg": 0.0, "fg_bg": 0.0, "bg_bg": 0.0} if op == "xor" else {"fg_fg": 1.0, "fg_bg": 0.0, "bg_bg": 0.0})
    assert bg == ({"fg_fg": 0.0, "fg_bg": 0.0, "bg_bg": 1.0} if op == "uniform" else {"fg_fg": 0.0, "fg_bg": 0.0, "bg_bg": 0.0})
    assert pair_weight_total(torch.ones(B, N), op).tolist() == [0.0 if op == "xor" else float(N * N)] * B


ROUTING_FNS = {
    "route_i": lambda w, op: route(w[:, :, None], torch.rand(1, 1, w.shape[1]), op),
    "route_j": lambda w, op: route(torch.rand(w.shape[0], w.shape[1], 1), w[:, None, :], op),
    "pair_weights": pair_weights,
    "pair_weight_total": pair_weight_total,
    "block_pair_sum_a": lambda w, op: block_pair_sum(w, torch.rand(w.shape[0], 3), op),
    "block_pair_sum_b": lambda w, op: block_pair_sum(torch.rand(w.shape[0], 3), w, op),
    "budget_shares": budget_shares,
    "check_saliency": lambda w, op: check_saliency(w),
}
NAME_OF = dict(route_i="wi", route_j="wj", block_pair_sum_a="wa", block_pair_sum_b="wb")


@PROPS
@given(B=st.integers(1, 3), N=st.integers(1, 8), dt=st.sampled_from(W_DTYPES), op=st.sampled_from(ROUTING_OPS),
       what=st.sampled_from(("nan", "inf", "mix", "above", "below")), k=st.integers(1, 3),
       fn=st.sampled_from(sorted(ROUTING_FNS)), seed=st.integers(0, 2**31 - 1))
def test_routing_bad_saliency_is_named(B, N, dt, op, what, k, fn, seed):
    "Every public routing function refuses NaN/Inf or out-of-range saliency, naming the tensor."
    w = make_w(B, N, "random", seed, dt)
    k = min(k, B * N)
    if what in ("above", "below"):
        g = torch.Generator().manual_seed(seed)
        w.view(-1)[torch.randperm(B * N, generator=g)[:k]] = 2.0 if what == "above" else -1.0
        match = r"must lie in \[0, 1\]; got min=.*max="
    else:
        w = poison(w, k, what, seed)
        match = rf"has {k} non-finite value"
    name = NAME_OF.get(fn, "w")
    with pytest.raises(ValueError, match=rf"^{name} \(shape .*{match}"):
        ROUTING_FNS[fn](w, op)


@PROPS
@given(dt=st.sampled_from((torch.int64, torch.int32, torch.uint8, torch.bool)), fn=st.sampled_from(sorted(ROUTING_FNS)),
       op=st.sampled_from(ROUTING_OPS))
def test_routing_non_float_saliency_is_a_type_error(dt, fn, op):
    w = torch.ones(2, 4, dtype=dt)
    with pytest.raises(TypeError, match="floating dtype"):
        ROUTING_FNS[fn](w, op)


# ---------------------------------------------------------------- the Triton kernel, in Triton's interpreter (CPU)

TRITON_CHILD = r"""
import json, math, torch
from sara.trd import trd_loss
from sara.trd_triton import trd_triton, _interpreting
assert _interpreting(), "kernels were not built for the interpreter"
g = torch.Generator().manual_seed(0)
p, y, w = torch.randn(1, 17, 64, generator=g), torch.randn(1, 17, 40, generator=g), torch.rand(1, 17, generator=g)
out = dict(clean=math.isfinite(trd_triton(p, y, w, "or", 0.1).item()), refused=[], propagated=[])
for where in ("p", "y"):
    for val in (math.nan, math.inf):
        t = dict(p=p.clone(), y=y.clone()); t[where][0, 3, 1] = val
        try: trd_loss(t["p"], t["y"], w, "or", impl="triton"); out["refused"].append(None)
        except ValueError as e: out["refused"].append(str(e))
        out["propagated"].append(not math.isfinite(trd_loss(t["p"], t["y"], w, "or", impl="triton", check_finite=False).item()))
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def triton_interpreted(triton_interpreter):
    import json, subprocess, sys
    env = triton_interpreter
    r = subprocess.run([sys.executable, "-c", TRITON_CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(next(l for l in r.stdout.splitlines() if l.startswith("RESULT"))[len("RESULT"):])


def test_triton_path_refuses_non_finite_features(triton_interpreted):
    "trd_loss checks p and y before dispatching to the Triton kernel."
    assert triton_interpreted["clean"]
    msgs = triton_interpreted["refused"]
    assert all(m is not None for m in msgs), msgs
    assert [m.split(" ")[0] for m in msgs] == ["p", "p", "y", "y"] and all("has 1 non-finite" in m for m in msgs)


def test_triton_path_propagates_non_finite_when_unchecked(triton_interpreted):
    assert triton_interpreted["propagated"] == [True] * 4, triton_interpreted["propagated"]

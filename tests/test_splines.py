import io
import math
import warnings

import numpy as np
import pytest
import torch
from _reference import assert_float32_accurate

from flowsk.nn.splines import (
    CLAMP,
    ROBUST_N_PARAMS,
    min_slope,
    n_params,
    rational_quadratic,
    robust_rational_quadratic,
)

BOUND = 3.0
SPLINES = [
    pytest.param(rational_quadratic, 2, id="rq-K2"),
    pytest.param(rational_quadratic, 5, id="rq-K5"),
    pytest.param(rational_quadratic, 12, id="rq-K12"),
    pytest.param(robust_rational_quadratic, None, id="robust"),
]


def _n(K):
    return ROBUST_N_PARAMS if K is None else n_params(K)


def _inputs(K, shape=(400,), scale=2.0, dtype=torch.float64, seed=0, spread=2.0):
    """Random params ``(*shape, P)`` and inputs covering the box and both tails."""
    g = torch.Generator().manual_seed(seed)
    params = scale * torch.randn(*shape, _n(K), generator=g, dtype=dtype)
    x = spread * BOUND * (2.0 * torch.rand(*shape, generator=g, dtype=dtype) - 1.0)
    return x, params


def _covers_both_regions(x):
    inside = (x.abs() < BOUND).float().mean()
    assert 0.2 < inside < 0.8


@pytest.mark.parametrize("inverse", [False, True])
def test_single_bin_is_identity(inverse):
    # K = 1: one bin spanning the box with unit end derivatives
    x, params = _inputs(1, seed=11)
    y, lad = rational_quadratic(x, params, inverse=inverse)
    torch.testing.assert_close(y, x, atol=1e-14, rtol=0)
    torch.testing.assert_close(lad, torch.zeros_like(x), atol=1e-14, rtol=0)


def test_n_params():
    assert [n_params(K) for K in (1, 2, 8)] == [2, 5, 23]
    assert ROBUST_N_PARAMS == n_params(2) + 1


# The round-trip error is about ulp(y) / c'(x).  With scale-2 parameters c' gets
# down to ~1e-6 in places, which float64 absorbs but float32 cannot (errors of
# 1e-2 are the map's conditioning, not the implementation), so float32 is
# checked on moderately curved splines.
@pytest.mark.parametrize("fn,K", SPLINES)
@pytest.mark.parametrize(
    "dtype,scale,tol", [(torch.float64, 2.0, 1e-10), (torch.float32, 0.5, 1e-5)],
    ids=["float64", "float32"],
)
def test_round_trip(fn, K, dtype, scale, tol):
    x, params = _inputs(K, shape=(20, 30), scale=scale, dtype=dtype)
    _covers_both_regions(x)
    y, _ = fn(x, params)
    x_back, _ = fn(y, params, inverse=True)
    torch.testing.assert_close(x_back, x, atol=tol, rtol=0)
    # inverse first, then forward
    x_inv, _ = fn(x, params, inverse=True)
    y_back, _ = fn(x_inv, params)
    torch.testing.assert_close(y_back, x, atol=tol, rtol=0)
    assert y.shape == x.shape and y.dtype == dtype


@pytest.mark.parametrize("fn,K", SPLINES)
@pytest.mark.parametrize("inverse", [False, True])
def test_logabsdet_matches_autograd(fn, K, inverse):
    x, params = _inputs(K, seed=1)
    x.requires_grad_(True)
    y, lad = fn(x, params, inverse=inverse)
    (dydx,) = torch.autograd.grad(y.sum(), x)
    assert (dydx > 0).all()
    torch.testing.assert_close(lad, dydx.log(), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("fn,K", SPLINES)
def test_forward_and_inverse_logabsdet_cancel(fn, K):
    x, params = _inputs(K, seed=2)
    y, lad_f = fn(x, params)
    x_back, lad_i = fn(y, params, inverse=True)
    torch.testing.assert_close(lad_i, -lad_f, atol=1e-10, rtol=0)
    assert lad_f.abs().max() > 0.1  # the test is not vacuous


@pytest.mark.parametrize("fn,K", SPLINES)
@pytest.mark.parametrize("inverse", [False, True])
def test_zero_params_identity(fn, K, inverse):
    x = torch.linspace(-2 * BOUND, 2 * BOUND, 1001, dtype=torch.float64)
    params = torch.zeros(*x.shape, _n(K), dtype=torch.float64)
    y, lad = fn(x, params, inverse=inverse)
    torch.testing.assert_close(y, x, atol=1e-14, rtol=0)
    torch.testing.assert_close(lad, torch.zeros_like(x), atol=1e-14, rtol=0)


@pytest.mark.parametrize("fn,K", SPLINES)
@pytest.mark.parametrize("inverse", [False, True])
def test_monotone_increasing(fn, K, inverse):
    g = torch.Generator().manual_seed(3)
    x = torch.linspace(-1.5 * BOUND, 1.5 * BOUND, 5001, dtype=torch.float64)
    # the same spline for every element
    params = (2.0 * torch.randn(_n(K), generator=g, dtype=torch.float64)).expand(*x.shape, -1)
    y, _ = fn(x, params, inverse=inverse)
    assert (y[1:] - y[:-1] > 0).all()


@pytest.mark.parametrize("K", [2, 3, 8])
@pytest.mark.parametrize("inverse", [False, True])
def test_rq_identity_outside_box(K, inverse):
    x, params = _inputs(K, seed=4, spread=3.0)
    outside = x.abs() > BOUND
    assert outside.any() and not outside.all()
    y, lad = rational_quadratic(x, params, inverse=inverse)
    assert torch.equal(y[outside], x[outside])
    assert torch.equal(lad[outside], torch.zeros_like(lad[outside]))
    # inside, the spline is not the identity and stays in the box
    assert (y[~outside] - x[~outside]).abs().max() > 1e-2
    assert (y[~outside].abs() <= BOUND).all()


@pytest.mark.parametrize("inverse", [False, True])
def test_robust_shift_outside_box(inverse):
    x, params = _inputs(None, seed=5, spread=3.0)
    t = params[..., -1]
    src = x - t if inverse else x  # what the spline part sees
    outside = src.abs() > BOUND
    assert outside.any() and not outside.all()
    y, lad = robust_rational_quadratic(x, params, inverse=inverse)
    expected = x - t if inverse else x + t
    torch.testing.assert_close(y[outside], expected[outside], atol=1e-14, rtol=0)
    assert torch.equal(lad[outside], torch.zeros_like(lad[outside]))


def test_robust_is_two_bin_rq_plus_shift():
    x, params = _inputs(None, seed=6)
    y, lad = robust_rational_quadratic(x, params)
    y2, lad2 = rational_quadratic(x, params[..., :5])
    torch.testing.assert_close(y, y2 + params[..., 5], atol=0, rtol=0)
    torch.testing.assert_close(lad, lad2, atol=0, rtol=0)
    x_inv, lad_inv = robust_rational_quadratic(x, params, inverse=True)
    x_inv2, lad_inv2 = rational_quadratic(x - params[..., 5], params[..., :5], inverse=True)
    torch.testing.assert_close(x_inv, x_inv2, atol=0, rtol=0)
    torch.testing.assert_close(lad_inv, lad_inv2, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("param_scale", [1.0, 50.0, 1e3])
def test_robust_inverse_is_bounded(dtype, param_scale):
    g = torch.Generator().manual_seed(7)
    params = param_scale * torch.randn(2000, ROBUST_N_PARAMS, generator=g, dtype=dtype)
    t = params[..., -1]
    y = torch.cat(
        [
            torch.tensor([-1e6, 1e6, -1e3, 1e3, 0.0], dtype=dtype),
            1e6 * torch.randn(995, generator=g, dtype=dtype),
            # inside the box
            t[1000:] + BOUND * (2 * torch.rand(1000, generator=g, dtype=dtype) - 1),
        ]
    )
    x, lad = robust_rational_quadratic(y, params, inverse=True)
    assert torch.isfinite(x).all() and torch.isfinite(lad).all()
    # |c^{-1}(y) - (y - t)| <= 2 * bound, hence |x - y| <= 2 * bound + |t|
    slack = 1e-6 * (1.0 + y.abs())
    assert ((x - (y - t)).abs() <= 2 * BOUND + slack).all()
    assert ((x - y).abs() <= 2 * BOUND + t.abs() + slack).all()
    # in the box the inverse lands in the box
    assert (x[1000:].abs() <= BOUND * (1 + 1e-6)).all()
    # the inverse's log-slope stays below the documented bound
    assert lad.max() <= -math.log(min_slope(2)) + 1e-9


# ---------------------------------------------------------------------------
# the slope bound: min_slope is the infimum of c' over parameters and inputs


def _extreme_params(K, n, seed, dtype=torch.float64):
    """``(n, P)`` parameters at every scale, down to saturated soft clamps (about a third of
    them at +-1e3, where ``clamp * tanh(p / clamp)`` is exactly +-clamp)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.5, 2.0, 5.0, 1e3], dtype=dtype)[torch.randint(4, (n, 1), generator=g)]
    return scale * torch.randn(n, _n(K), generator=g, dtype=dtype)


def _worst_params(K, k, left, right, big=1e3):
    """Bin ``k`` as flat as the clamps allow (smallest height, largest width), with the
    derivatives at its interior knots at ``left * big`` and ``right * big`` (a knot at an end
    of the box has derivative 1)."""
    widths, heights, derivs = torch.full((K,), -big), torch.full((K,), big), torch.zeros(K - 1)
    widths[k], heights[k] = big, -big
    if k > 0:
        derivs[k - 1] = left * big
    if k < K - 1:
        derivs[k] = right * big
    params = torch.cat([widths, heights, derivs]).double()
    return torch.cat([params, torch.zeros(1, dtype=torch.float64)]) if K == 2 else params


@pytest.mark.parametrize("fn,K", SPLINES)
def test_slope_never_below_min_slope(fn, K):
    # a forward log-slope below log(min_slope) by 1e-9 fails the test
    n = 4000
    params = _extreme_params(K, n, seed=20)
    t = params[:, -1] if K is None else 0.0
    g = torch.Generator().manual_seed(21)
    x = t + BOUND * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1)
    _, lad = fn(x, params)
    floor = math.log(min_slope(2 if K is None else K))
    assert lad.min() >= floor - 1e-9
    # and the inverse's log-slope stays below -floor
    _, lad_inv = fn(x, params, inverse=True)
    assert lad_inv.max() <= -floor + 1e-9


@pytest.mark.parametrize("K", [2, 3, 8])
def test_min_slope_is_attained(K):
    # the bound is tight: the flattest admissible bin reaches it within 1e-6 (in log)
    grid = torch.linspace(-BOUND, BOUND, 100001, dtype=torch.float64)
    fn = robust_rational_quadratic if K == 2 else rational_quadratic
    lowest = min(
        fn(grid, _worst_params(K, k, left, right).expand(len(grid), -1))[1].min().item()
        for k in range(min(K, 2)) for left in (-1.0, 1.0) for right in (-1.0, 1.0))
    floor = math.log(min_slope(K))
    assert floor - 1e-9 <= lowest <= floor + 1e-6


def test_min_slope_needs_the_clamp():
    # without the clamp an interior derivative grows without limit and flattens its bins
    # below any floor: the bound is 0, and large parameters go far below the clamped bound
    assert min_slope(2, clamp=None) == 0.0
    grid = torch.linspace(-BOUND, BOUND, 20001, dtype=torch.float64)
    params = torch.tensor([30.0, -30.0, -30.0, 30.0, 1e3], dtype=torch.float64)
    _, lad = rational_quadratic(grid, params.expand(len(grid), -1), clamp=None)
    assert lad.min() < math.log(min_slope(2)) - 5.0


def test_min_slope_of_one_bin_and_monotone_in_clamp():
    assert min_slope(1) == 1.0
    slopes = [min_slope(8, clamp=c) for c in (1.0, 3.0, 5.0, 10.0)]
    assert all(a > b > 0 for a, b in zip(slopes, slopes[1:]))


def test_params_are_soft_clamped():
    x, params = _inputs(5, seed=22, scale=20.0)
    y, lad = rational_quadratic(x, params)
    y_ref, lad_ref = rational_quadratic(x, CLAMP * torch.tanh(params / CLAMP), clamp=None)
    torch.testing.assert_close(y, y_ref, atol=1e-14, rtol=0)
    torch.testing.assert_close(lad, lad_ref, atol=1e-14, rtol=0)
    assert (params.abs() > 2 * CLAMP).float().mean() > 0.5  # the clamp was active


@pytest.mark.parametrize("fn,K", SPLINES)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("dtype,huge", [(torch.float64, 1e200), (torch.float32, 1e30)])
def test_gradients_finite_outside_box(fn, K, inverse, dtype, huge):
    # far-out inputs would overflow the (unused) spline branch if it were fed unclamped
    x = torch.tensor([-huge, -1e6, -50.0, -BOUND - 1e-3, BOUND + 1e-3, 7.0, 1e6, huge], dtype=dtype)
    g = torch.Generator().manual_seed(8)
    params = 50.0 * torch.randn(*x.shape, _n(K), generator=g, dtype=dtype)
    if K is None:
        params[..., -1] = 0.0  # keep x - t outside the box
    x.requires_grad_(True)
    params.requires_grad_(True)
    y, lad = fn(x, params, inverse=inverse)
    gx, gp = torch.autograd.grad((y + lad).sum(), (x, params))
    assert torch.isfinite(gx).all() and torch.isfinite(gp).all()
    torch.testing.assert_close(gx, torch.ones_like(gx), atol=0, rtol=0)
    if K is not None:
        torch.testing.assert_close(gp, torch.zeros_like(gp), atol=0, rtol=0)


@pytest.mark.parametrize("fn,K", SPLINES)
def test_gradients_finite_everywhere(fn, K):
    x, params = _inputs(K, seed=9, scale=20.0)
    x.requires_grad_(True)
    params.requires_grad_(True)
    for inverse in (False, True):
        y, lad = fn(x, params, inverse=inverse)
        gx, gp = torch.autograd.grad((y + lad).sum(), (x, params))
        assert torch.isfinite(gx).all() and torch.isfinite(gp).all()


def test_shapes_and_errors():
    x = torch.randn(2, 3, 4, 5)
    y, lad = rational_quadratic(x, torch.randn(2, 3, 4, 5, n_params(4)))
    assert y.shape == lad.shape == x.shape
    with pytest.raises(ValueError):
        rational_quadratic(x, torch.randn(2, 3, 4, 5, 7))  # not 3K - 1
    with pytest.raises(ValueError):
        rational_quadratic(x, torch.randn(3, 4, 5, n_params(4)))  # batch shape mismatch
    with pytest.raises(ValueError):
        robust_rational_quadratic(x, torch.randn(2, 3, 4, 5, 5))


# ---------------------------------------------------------------------------
# independent NumPy reference (element by element, np.searchsorted)


def _np_knots(u, bound, min_size):
    p = np.exp(u - u.max())
    p = p / p.sum()
    p = min_size + (1 - min_size * len(u)) * p
    knots = np.concatenate([[0.0], np.cumsum(p)])
    knots = -bound + 2 * bound * knots
    knots[0], knots[-1] = -bound, bound
    return knots


def _np_rq_forward(x, params, bound=BOUND, mw=1e-3, mh=1e-3, md=1e-3, clamp=CLAMP):
    K = (params.shape[-1] + 1) // 3
    y = np.empty_like(x)
    lad = np.empty_like(x)
    for i in range(x.size):
        xi, p = x.flat[i], params.reshape(-1, params.shape[-1])[i]
        p = clamp * np.tanh(p / clamp)
        if not -bound <= xi <= bound:
            y.flat[i], lad.flat[i] = xi, 0.0
            continue
        xs = _np_knots(p[:K], bound, mw)
        ys = _np_knots(p[K : 2 * K], bound, mh)
        c = math.log(math.expm1(1 - md))
        d = np.concatenate([[1.0], md + np.log1p(np.exp(p[2 * K :] + c)), [1.0]])
        k = min(max(np.searchsorted(xs, xi, side="right") - 1, 0), K - 1)
        w, h = xs[k + 1] - xs[k], ys[k + 1] - ys[k]
        s = h / w
        th = (xi - xs[k]) / w
        den = s + (d[k + 1] + d[k] - 2 * s) * th * (1 - th)
        y.flat[i] = ys[k] + h * (s * th**2 + d[k] * th * (1 - th)) / den
        dnum = s**2 * (d[k + 1] * th**2 + 2 * s * th * (1 - th) + d[k] * (1 - th) ** 2)
        lad.flat[i] = np.log(dnum / den**2)
    return y, lad


@pytest.mark.parametrize("K", [2, 4, 9])
def test_rq_matches_numpy_reference(K):
    x, params = _inputs(K, shape=(8, 50), seed=10, spread=1.5)
    x[0, :4] = torch.tensor([-BOUND, BOUND, 0.0, -0.0], dtype=x.dtype)
    y, lad = rational_quadratic(x, params)
    y_ref, lad_ref = _np_rq_forward(x.numpy(), params.numpy())
    np.testing.assert_allclose(y.numpy(), y_ref, atol=1e-12, rtol=0)
    np.testing.assert_allclose(lad.numpy(), lad_ref, atol=1e-12, rtol=0)
    assert np.abs(y_ref - x.numpy()).max() > 0.1


# ---------------------------------------------------------------------------
# ONNX export


class _AllSplines(torch.nn.Module):
    def forward(self, x, p_rq, p_robust):
        outs = []
        for inverse in (False, True):
            outs += rational_quadratic(x, p_rq, inverse=inverse)
            outs += robust_rational_quadratic(x, p_robust, inverse=inverse)
        return tuple(outs)


def test_onnx_export_matches_torch():
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    K = 6
    model = _AllSplines()

    # moderate parameters: see test_round_trip on float32 conditioning
    def make(batch, seed):
        g = torch.Generator().manual_seed(seed)
        x = 2 * BOUND * torch.randn(batch, 4, generator=g)
        return (x, 0.5 * torch.randn(batch, 4, n_params(K), generator=g),
                0.5 * torch.randn(batch, 4, 6, generator=g))

    names = ["x", "p_rq", "p_robust"]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            make(3, 0),
            buf,
            dynamo=False,
            input_names=names,
            output_names=[f"out{i}" for i in range(8)],
            dynamic_axes={n: {0: "batch"} for n in names},
            opset_version=17,
        )
    graph_ops = {n.op_type for n in onnx.load_from_string(buf.getvalue()).graph.node}
    assert "GatherElements" in graph_ops
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    inputs = make(257, 1)  # a different batch size from the one exported with
    got = sess.run(None, {n: t.numpy() for n, t in zip(names, inputs)})
    assert len(got) == 8 and all(np.isfinite(g).all() for g in got)
    assert_float32_accurate(got, model, inputs, atol=1e-5)

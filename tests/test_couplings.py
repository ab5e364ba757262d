"""Coupling transforms and their FlowPrior settings: the affine soft clamp, the spline's bins,
box and conditional shift/scale, and the per-coupling defaults."""
import math

import numpy as np
import pytest
import torch
from sklearn.base import clone
from test_nn import gaussian, jacobian_logdet, prepare

import flowsk.prior
from flowsk import FlowPrior
from flowsk.nn.coupling import Affine, Coupling, RobustSpline, Spline, make_transform
from flowsk.nn.networks import MLP
from flowsk.nn.splines import n_params

GLOW_OFFSET = math.log(1 / (1 + math.exp(-2.0)))  # log(sigmoid(2))


# -- affine: a soft-clamped log-scale ----------------------------------------------------------
def test_affine_log_scale_is_bounded_glow_near_zero():
    s = torch.linspace(-1e4, 1e4, 20001, dtype=torch.float64)
    params = torch.stack([s, torch.zeros_like(s)], -1)
    _, log_scale = Affine()(torch.zeros_like(s), params)
    glow = torch.nn.functional.logsigmoid(s + 2) - GLOW_OFFSET
    assert (log_scale >= -3.0).all() and (log_scale < -GLOW_OFFSET).all()
    assert log_scale.min() < -3.0 + 1e-6  # the clamp is reached
    assert (log_scale[1:] >= log_scale[:-1]).all()
    # near zero parameters it is Glow's scale: identity at 0, slope 1
    near = s.abs() <= 0.5
    torch.testing.assert_close(log_scale[near], glow[near], rtol=0, atol=2e-3)
    assert log_scale[s == 0].abs().max() < 1e-15


def _extreme_affine_coupling(weight_scale, seed=0):
    """A float64 affine coupling on 6 features whose conditioner outputs reach +-1e3 (the
    log-scale far below -3 where the clamp acts)."""
    torch.manual_seed(seed)
    layer = Coupling(3, MLP(3, 3 * Affine.n_params, 16), Affine()).double()
    with torch.no_grad():
        last = layer.conditioner.net[-1]
        last.weight.normal_(0.0, weight_scale)
        last.bias.normal_(0.0, weight_scale)
    return layer


def test_extreme_affine_coupling_is_finite_and_expands_at_most_exp_clamp():
    layer = _extreme_affine_coupling(weight_scale=300.0)
    z = gaussian((6,), scale=1.0, seed=1, n=2000)  # latents at temperature 1
    with torch.no_grad():
        params = layer._params(z[:, :3], z[:, 3:], None)
        raw = torch.nn.functional.logsigmoid(params[..., 0] + 2) - GLOW_OFFSET
        x, ld = layer.inverse(z)
    assert (raw < -50).float().mean() > 0.3  # unclamped, exp(-raw) would overflow float32
    assert torch.isfinite(x).all() and torch.isfinite(ld).all()
    t = params[..., 1]
    # x_b = z_b * exp(-log_scale) - t with log_scale > -3
    assert ((x[:, 3:] + t).abs() <= math.exp(3.0) * z[:, 3:].abs() * (1 + 1e-12)).all()
    assert ld.max() <= 3.0 * 3 + 1e-12
    with torch.no_grad():
        z32 = layer.float().inverse(z.float())[0]
    assert torch.isfinite(z32).all()


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_extreme_affine_coupling_logdet_matches_jacobian(direction):
    layer = _extreme_affine_coupling(weight_scale=30.0, seed=2)
    x = gaussian((6,), scale=1.0, seed=3, n=4)
    fn = layer if direction == "forward" else layer.inverse
    with torch.no_grad():
        params = layer._params(x[:, :3], x[:, 3:], None)
        _, ld = fn(x)
    raw = torch.nn.functional.logsigmoid(params[..., 0] + 2) - GLOW_OFFSET
    assert (raw < -4).any()  # the clamp is active on some entries
    torch.testing.assert_close(ld, jacobian_logdet(fn, x), rtol=1e-9, atol=1e-9)


def test_prior_with_extreme_affine_couplings_samples_finite_values():
    """Blown-up conditioners (an unstable training run, say) still give finite samples at
    temperature 1; without the clamp the same weights overflow."""
    X = np.random.RandomState(0).beta(2.0, 3.0, (100, 8))
    prior = FlowPrior(data_range=(0, 1), n_steps=4, hidden_features=16, max_epochs=1,
                      random_state=0, device="cpu").fit(X)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in prior.flow_.modules():
            if isinstance(m, Coupling):
                last = m.conditioner.net[-1]
                last.weight.copy_(100.0 * torch.randn(last.weight.shape, generator=g))
    S = prior.sample(500, temperature=1.0, random_state=0)
    assert np.isfinite(S).all()
    for m in prior.flow_.modules():
        if isinstance(m, Affine):
            m.clamp = 1e4  # effectively unclamped
    with pytest.raises(FloatingPointError):
        prior.sample(500, temperature=1.0, random_state=0)


# -- spline options ----------------------------------------------------------------------------
SPLINE_CASES = {
    "bins5-bound2": lambda: Spline(n_bins=5, bound=2.0),
    "bins5-bound2-affine": lambda: Spline(n_bins=5, bound=2.0, affine=True),
    "robust-bound2": lambda: RobustSpline(bound=2.0),
}


def _spline_coupling(name):
    t = SPLINE_CASES[name]()
    return Coupling(3, MLP(3, 3 * t.n_params, 16), t)


@pytest.mark.parametrize("name", SPLINE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_spline_options_round_trip(name, dtype):
    # float32 on milder splines: see tests/test_splines.py on float32 conditioning
    std = 0.3 if dtype == torch.float64 else 0.1
    layer = prepare(_spline_coupling(name), gaussian((6,), n=32, seed=100), dtype=dtype,
                    std=std)
    x = gaussian((6,), scale=2.0, seed=4, n=64).to(dtype)
    with torch.no_grad():
        z, ld = layer(x)
        x_back, ld_inv = layer.inverse(z)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(x_back, x, rtol=tol, atol=tol)
    torch.testing.assert_close(ld + ld_inv, torch.zeros_like(ld), rtol=0, atol=tol * 10)
    assert (z - x).abs().max() > 1e-2 and ld.abs().max() > 1e-2


@pytest.mark.parametrize("name", SPLINE_CASES)
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_spline_options_logdet_matches_jacobian(name, direction):
    layer = prepare(_spline_coupling(name), gaussian((6,), n=32, seed=100), std=0.3)
    x = gaussian((6,), scale=2.0, seed=5, n=4)
    fn = layer if direction == "forward" else layer.inverse
    with torch.no_grad():
        _, ld = fn(x)
    torch.testing.assert_close(ld, jacobian_logdet(fn, x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", SPLINE_CASES)
def test_spline_options_start_as_identity(name):
    layer = _spline_coupling(name).double()
    x = gaussian((6,), scale=3.0, seed=6)
    with torch.no_grad():
        z, ld = layer(x)
    torch.testing.assert_close(z, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(ld, torch.zeros_like(ld), rtol=0, atol=1e-12)


def test_spline_box_and_bins():
    assert Spline(n_bins=5).n_params == n_params(5) == 14
    assert Spline(n_bins=5, affine=True).n_params == 16
    g = torch.Generator().manual_seed(7)
    x = torch.linspace(-4.0, 4.0, 801, dtype=torch.float64)
    params = torch.randn(len(x), n_params(5), generator=g, dtype=torch.float64)
    y, _ = Spline(n_bins=5, bound=2.0)(x, params)
    outside = x.abs() > 2.0
    assert torch.equal(y[outside], x[outside])
    assert (y[~outside] - x[~outside]).abs().max() > 1e-2
    assert (y[~outside].abs() <= 2.0).all()


def test_affine_in_front_of_the_spline_moves_values_into_its_box():
    # a shift of -5 brings x = 5 into the box [-1, 1] of the spline, which then acts on it
    t = Spline(n_bins=4, bound=1.0, affine=True)
    x = torch.full((1,), 5.0, dtype=torch.float64)
    spline = torch.randn(1, n_params(4), generator=torch.Generator().manual_seed(8),
                         dtype=torch.float64)
    params = torch.cat([torch.tensor([[0.0, -5.0]], dtype=torch.float64), spline], -1)
    y, lad = t(x, params)
    y0, lad0 = Spline(n_bins=4, bound=1.0)(torch.zeros(1, dtype=torch.float64), spline)
    torch.testing.assert_close(y, y0, rtol=0, atol=1e-14)
    torch.testing.assert_close(lad, lad0, rtol=0, atol=1e-14)
    assert lad.abs().item() > 1e-3


def test_make_transform_passes_only_the_options_a_transform_takes():
    options = {"n_bins": 6, "bound": 4.0, "affine": True}
    spline = make_transform("spline", **options)
    assert (spline.n_bins, spline.bound, spline.affine is not None) == (6, 4.0, True)
    assert make_transform("robust-spline", **options).bound == 4.0
    assert isinstance(make_transform("affine", **options), Affine)
    assert make_transform("spline", n_bins=None, bound=None).n_bins == 8


# -- FlowPrior settings -----------------------------------------------------------------------
def _digits_like(n=80, d=8, seed=0):
    return np.random.RandomState(seed).beta(2.0, 3.0, (n, d))


def test_prior_passes_spline_options_to_its_couplings():
    prior = FlowPrior(coupling="spline", n_bins=5, bound=4.0, spline_affine=True, n_steps=2,
                      hidden_features=8, max_epochs=1, random_state=0,
                      device="cpu").fit(_digits_like())
    splines = [m for m in prior.flow_.modules() if isinstance(m, Spline)]
    assert len(splines) == 2
    assert all((s.n_bins, s.bound, s.affine is not None) == (5, 4.0, True) for s in splines)
    params = clone(prior).get_params()
    assert (params["n_bins"], params["bound"], params["spline_affine"]) == (5, 4.0, True)


def test_prior_spline_defaults_come_from_the_coupling():
    prior = FlowPrior(coupling="spline", max_epochs=1, random_state=0, device="cpu")
    prior.fit(_digits_like())
    auto = flowsk.prior._AUTO["mlp"]["spline"]
    spline = next(m for m in prior.flow_.modules() if isinstance(m, Spline))
    assert (spline.n_bins, spline.bound) == (auto["n_bins"], auto["bound"])
    assert (spline.affine is not None) == auto["spline_affine"]
    conditioner = next(m for m in prior.flow_.modules() if isinstance(m, Coupling)).conditioner
    assert conditioner.net[0].out_features == auto["hidden_features"]
    assert sum(isinstance(m, Coupling) for m in prior.flow_.modules()) == auto["n_steps"]


def test_every_family_and_coupling_has_its_defaults():
    keys = {"n_steps", "hidden_features", "learning_rate", "weight_decay"}
    for family, couplings in flowsk.prior._AUTO.items():
        assert set(couplings) == {"affine", "additive", "spline", "robust-spline"}, family
        for coupling, settings in couplings.items():
            expected = keys | ({"n_bins", "bound", "spline_affine"} if coupling == "spline"
                               else set()) | (
                {"bound"} if coupling == "robust-spline" else set())
            assert set(settings) == expected, (family, coupling)


@pytest.mark.parametrize("params, error, match", [
    ({"n_bins": 0}, ValueError, "n_bins"),
    ({"n_bins": 2.5}, ValueError, "n_bins"),
    ({"n_bins": True}, ValueError, "n_bins"),
    ({"n_bins": 101}, ValueError, "n_bins must be at most"),
    ({"bound": 0.0}, ValueError, "bound"),
    ({"bound": -1.0}, ValueError, "bound"),
    ({"bound": float("nan")}, ValueError, "bound"),
    ({"bound": "3"}, ValueError, "bound"),
    ({"spline_affine": "yes"}, TypeError, "spline_affine"),
    ({"spline_affine": 1}, TypeError, "spline_affine"),
])
def test_prior_rejects_bad_spline_settings(params, error, match):
    prior = FlowPrior(coupling="spline", max_epochs=1, **params)
    assert prior.get_params()[next(iter(params))] is params[next(iter(params))]  # unchanged
    with pytest.raises(error, match=match):
        prior.fit(_digits_like())

"""Masked autoregressive flows (``architecture="maf"``): the autoregressive property, the layer
contract (round trip, brute-force log-dets in float64) and ONNX parity of a FlowPrior."""
import numpy as np
import pytest
import torch
from test_nn import TOL, B, gaussian, jacobian_logdet, prepare

from exporters import check_onnx, to_onnx
from flowsk import FlowPrior
from flowsk.nn.autoregressive import MADE, MaskedAutoregressive
from flowsk.nn.builders import build_flow
from flowsk.nn.coupling import TRANSFORMS, make_transform

COUPLINGS = sorted(TRANSFORMS)
D = 5


def test_made_output_depends_only_on_earlier_inputs():
    made = MADE(D, n_params=3, hidden_features=16).double()
    with torch.no_grad():
        for p in made.parameters():
            p.normal_()
    x = gaussian((D,), n=1)[0]
    jac = torch.autograd.functional.jacobian(lambda v: made(v[None])[0], x)  # (D, 3, D)
    dependence = jac.abs().amax(1)  # (D out, D in)
    upper = torch.triu(torch.ones(D, D, dtype=torch.bool))
    assert (dependence[upper] == 0).all()  # entry i sees no input j >= i
    assert (dependence[~upper] > 1e-6).all()  # and every input j < i


def test_new_layer_is_identity():
    layer = MaskedAutoregressive(D, make_transform("spline"), 16).double()
    x = gaussian((D,))
    with torch.no_grad():
        z, ld = layer(x)
        x_back, ld_inv = layer.inverse(x)
    for out, ref in ((z, x), (x_back, x), (ld, torch.zeros_like(ld)),
                     (ld_inv, torch.zeros_like(ld))):
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def _case(kind, coupling, dtype):
    if kind == "layer":
        module = MaskedAutoregressive(D, make_transform(coupling), 16)
    else:
        module = build_flow(D, architecture="maf", coupling=coupling, n_steps=2,
                            hidden_features=16, data_range=(0.0, 1.0) if kind == "bounded"
                            else None)
    if kind == "bounded":
        g = torch.Generator().manual_seed(0)
        draw = lambda n: torch.rand(n, D, generator=g, dtype=torch.float64)  # noqa: E731
    else:
        draw = lambda n: gaussian((D,), n=n, seed=n)  # noqa: E731
    prepare(module, draw(32), dtype=dtype, std=0.3 if dtype == torch.float64 else 0.1)
    return module, draw(B).to(dtype)


CASES = [pytest.param(kind, c, id=f"{kind}-{c}") for kind in ("layer", "flow", "bounded")
         for c in COUPLINGS]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind, coupling", CASES)
def test_round_trip(kind, coupling, dtype):
    module, x = _case(kind, coupling, dtype)
    with torch.no_grad():
        z, ld = module(x)
        x_back, ld_inv = module.inverse(z)
    assert z.dtype == x_back.dtype == dtype
    assert (z - x).abs().max() > 1e-2  # not the identity
    torch.testing.assert_close(x_back, x, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(ld + ld_inv, torch.zeros_like(ld), rtol=0,
                               atol=TOL[dtype] * max(1.0, ld.abs().max().item()))


@pytest.mark.parametrize("direction", ["forward", "inverse"])
@pytest.mark.parametrize("kind, coupling", CASES)
def test_logdet_matches_jacobian(kind, coupling, direction):
    module, x = _case(kind, coupling, torch.float64)
    if direction == "inverse":
        with torch.no_grad():
            x = module(x)[0]
    fn = module if direction == "forward" else module.inverse
    with torch.no_grad():
        _, ld = fn(x)
    if coupling != "additive" or kind == "bounded":
        assert ld.abs().max() > 1e-3
    torch.testing.assert_close(ld, jacobian_logdet(fn, x), rtol=1e-9, atol=1e-9)


def test_conditional_maf_is_refused():
    with pytest.raises(ValueError, match="conditional flows need architecture='mlp'"):
        build_flow(4, architecture="maf", context_features=2)


@pytest.fixture(scope="module")
def maf_prior():
    """A FlowPrior(architecture='maf') whose every parameter is moved off its fitted value,
    so the exported graphs are checked on a flow far from the identity."""
    X = np.random.RandomState(0).beta(2.0, 3.0, (60, 6))
    prior = FlowPrior(architecture="maf", coupling="spline", n_steps=2, hidden_features=16,
                      data_range=(0, 1), max_epochs=2, random_state=0, device="cpu").fit(X)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in prior.flow_.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    prior.flow_.train(False)  # refresh the cached inverses after the change
    return prior, X


def test_prior_scores_samples_and_round_trips(maf_prior):
    prior, X = maf_prior
    assert np.isfinite(prior.score_samples(X)).all()
    S = prior.sample(20, random_state=0)
    assert S.shape == (20, 6) and 0 <= S.min() and S.max() <= 1
    np.testing.assert_allclose(prior.inverse_transform(prior.transform(X)), X, atol=1e-5)


@pytest.mark.parametrize("part", ["decoder", "encoder", "log_prob"])
def test_onnx_parity(maf_prior, part, tmp_path):
    prior, _ = maf_prior
    path = to_onnx(prior, tmp_path / f"{part}.onnx", part=part)
    assert check_onnx(path, prior) < 1e-4

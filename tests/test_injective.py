"""Injective layers, TRUMPET flows and InjectiveFlowPrior."""
import copy
import math
import pickle

import joblib
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import parametrize_with_checks

from flowsk import InjectiveFlowPrior
from flowsk.nn.injective import (
    InjectiveFlow,
    InjectiveLinear,
    InjectiveReLULinear,
    build_injective_flow,
    injective_layer,
    jacobian,
    stochastic_half_logdet,
)

F64 = torch.float64
LAYERS = [pytest.param(InjectiveLinear, 3, 5, id="linear"),
          pytest.param(InjectiveReLULinear, 3, 8, id="relu")]


def _perturb(module, scale, seed=0):
    """Move every parameter off its (identity-like) initialisation, deterministically."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def _layer(cls, n_in, n_out, regularization=0.0, seed=0):
    layer = cls(n_in, n_out, regularization=regularization,
                generator=torch.Generator().manual_seed(seed)).double()
    return _perturb(layer, 0.4, seed).eval()


def _autograd_half_logdet(fn, z):
    """0.5 slogdet(J^T J) per sample from torch.autograd's Jacobian of ``fn`` on one sample."""
    out = []
    for zi in z:
        jac = torch.autograd.functional.jacobian(lambda t: fn(t[None]).reshape(-1), zi)
        jac = jac.reshape(jac.shape[0], -1)
        out.append(0.5 * torch.linalg.slogdet(jac.T @ jac)[1])
    return torch.stack(out)


def _flow(image_shape=None, n_features=8, latent_dim=3, activation="linear", data_range=None,
          regularization=0.0, scale=0.15, **kwargs):
    """A small float64 TRUMPET with every weight perturbed (non-trivial couplings)."""
    kwargs = {"n_steps": 1, "n_latent_steps": 2, "hidden_features": 8, **kwargs}
    flow = build_injective_flow(n_features, latent_dim, image_shape=image_shape,
                                activation=activation, data_range=data_range,
                                regularization=regularization, random_state=0, **kwargs)
    return _perturb(flow.double(), scale).eval()


FLOWS = [
    pytest.param({"n_features": 8, "latent_dim": 3}, id="vector"),
    pytest.param({"n_features": 8, "latent_dim": 3, "activation": "relu"}, id="vector-relu"),
    pytest.param({"image_shape": (1, 4, 4), "n_features": 16, "latent_dim": 4}, id="image"),
    pytest.param({"image_shape": (1, 4, 4), "n_features": 16, "latent_dim": 4, "activation": "relu",
                      "data_range": (0, 1)}, id="image-relu-logit"),
    pytest.param({"image_shape": (2, 4, 2), "n_features": 16, "latent_dim": 5}, id="image-dense"),
]


# -- injective layers ------------------------------------------------------------------------
@pytest.mark.parametrize("cls,n_in,n_out", LAYERS)
@pytest.mark.parametrize("image", [False, True], ids=["vector", "image"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_layer_left_inverts_on_range(cls, n_in, n_out, image, training):
    layer = _layer(cls, n_in, n_out).train(training)
    z = torch.randn(6, n_in, 3, 2, dtype=F64) if image else torch.randn(6, n_in, dtype=F64)
    x, ld_gen = layer.inverse(z)
    assert x.shape == ((6, n_out, 3, 2) if image else (6, n_out))
    z_back, ld_pinv = layer(x)
    torch.testing.assert_close(z_back, z, atol=1e-10, rtol=0)
    torch.testing.assert_close(ld_pinv, -ld_gen, atol=1e-12, rtol=0)


@pytest.mark.parametrize("cls,n_in,n_out", LAYERS)
def test_layer_tikhonov_bias_is_the_closed_form(cls, n_in, n_out):
    lam = 1e-6
    layer = _layer(cls, n_in, n_out, regularization=lam)
    z = torch.randn(4, n_in, dtype=F64)
    z_back = layer(layer.inverse(z)[0])[0]
    w = layer.weight.detach()
    gram = w.T @ w
    expected = z - lam * torch.linalg.solve(gram + lam * torch.eye(n_in, dtype=F64), z.T).T
    torch.testing.assert_close(z_back, expected, atol=1e-13, rtol=0)
    s_min = torch.linalg.svdvals(w).min()
    assert (z_back - z).norm(dim=1).max() <= lam / s_min**2 * z.norm(dim=1).max()


@pytest.mark.parametrize("cls,n_in,n_out", LAYERS)
@pytest.mark.parametrize("image", [False, True], ids=["vector", "image"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_layer_logdet_is_half_logdet_jtj(cls, n_in, n_out, image, training):
    layer = _layer(cls, n_in, n_out, regularization=1e-6).train(training)
    shape = (n_in, 2, 3) if image else (n_in,)
    z = torch.randn(3, *shape, dtype=F64)
    expected = _autograd_half_logdet(lambda t: layer.inverse(t.reshape(-1, *shape))[0], z)
    torch.testing.assert_close(layer.inverse(z)[1], expected, atol=1e-10, rtol=0)
    # the paper's form: sum of log singular values, once per pixel
    s = torch.linalg.svdvals(layer.weight.detach())
    pixels = 6 if image else 1
    torch.testing.assert_close(layer.inverse(z)[1][0], pixels * torch.log(s).sum(), atol=1e-10,
                               rtol=0)


@pytest.mark.parametrize("cls,n_in,n_out", LAYERS)
def test_layer_eval_cache_is_the_training_pseudo_inverse(cls, n_in, n_out):
    layer = _layer(cls, n_in, n_out, regularization=1e-6)
    layer.float().eval()  # the cache is computed in float64 whatever the weight's dtype
    w = layer.weight.detach().double()
    expected = torch.linalg.solve(w.T @ w + 1e-6 * torch.eye(n_in, dtype=F64), w.T)
    torch.testing.assert_close(layer.weight_pinv.double(), expected.float().double())
    z = torch.randn(5, n_in)
    x = layer.inverse(z)[0]
    torch.testing.assert_close(layer(x)[0], layer.train()(x)[0], atol=1e-5, rtol=1e-5)


def test_layer_shape_errors():
    with pytest.raises(ValueError, match="in_features <= out_features"):
        InjectiveLinear(5, 3)
    with pytest.raises(ValueError, match="even out_features >= 2"):
        InjectiveReLULinear(3, 5)
    with pytest.raises(ValueError, match="regularization"):
        InjectiveLinear(2, 3, regularization=-1.0)
    with pytest.raises(ValueError, match="activation"):
        injective_layer(2, 4, activation="tanh")
    # where the ReLU layer does not fit, the linear layer takes over
    assert type(injective_layer(3, 5, activation="relu")) is InjectiveLinear
    assert type(injective_layer(3, 6, activation="relu")) is InjectiveReLULinear


# -- the whole network ------------------------------------------------------------------------
@pytest.mark.parametrize("config", FLOWS)
def test_flow_left_inverts_on_range(config):
    flow = _flow(**config)
    assert isinstance(flow, InjectiveFlow)
    z = 0.5 * torch.randn(7, flow.latent_dim, dtype=F64)
    x, ld_gen = flow.inverse(z)
    assert x.shape == (7, flow.n_features)
    z_back, ld_pinv = flow(x)
    torch.testing.assert_close(z_back, z, atol=1e-10, rtol=0)
    torch.testing.assert_close(ld_pinv, -ld_gen, atol=1e-9, rtol=0)
    # generate's log-density is log_prob's on the range (same layer-wise terms)
    x_gen, log_p = flow.generate(z)
    torch.testing.assert_close(x_gen, x)
    torch.testing.assert_close(flow.log_prob(x), log_p, atol=1e-9, rtol=0)


def test_flow_default_regularization_bias_is_small():
    flow = _flow(image_shape=(1, 4, 4), n_features=16, latent_dim=4, regularization=1e-6)
    z = 0.5 * torch.randn(7, 4, dtype=F64)
    err = (flow(flow.inverse(z)[0])[0] - z).abs().max()
    assert 0 < err < 1e-4


@pytest.mark.parametrize("config", FLOWS)
def test_project_is_idempotent_and_fixes_the_range(config):
    flow = _flow(**config)
    z = 0.5 * torch.randn(7, flow.latent_dim, dtype=F64)
    on_range = flow.inverse(z)[0]
    torch.testing.assert_close(flow.project(on_range), on_range, atol=1e-10, rtol=0)
    if "data_range" in config:
        # project clips to data_range, which moves points near its edges off the manifold
        x = on_range + 0.01 * torch.randn_like(on_range)
        x = x.clamp(0.2, 0.8)
    else:
        x = torch.randn(7, flow.n_features, dtype=F64)
    p = flow.project(x)
    assert (p - x).norm() > 1e-3  # an off-range point moves ...
    torch.testing.assert_close(flow.project(p), p, atol=1e-10, rtol=0)  # ... once


@pytest.mark.parametrize("config", FLOWS)
def test_exact_logdet_matches_autograd(config):
    flow = _flow(**config)
    z = 0.5 * torch.randn(3, flow.latent_dim, dtype=F64)
    g = flow.manifold_map()
    torch.testing.assert_close(flow.exact_half_logdet(z), _autograd_half_logdet(g, z),
                               atol=1e-10, rtol=0)
    x = g(z)
    jac = jacobian(g, z)
    assert jac.shape == (3, flow.n_features, flow.latent_dim)
    # log p(x) with the exact log-det: log N(z) - log|det J_h| - 0.5 log det(J_g^T J_g) for
    # the full generator G = g o h, checked against autograd's Jacobian of G itself
    z_latent = flow(x)[0]
    full = _autograd_half_logdet(lambda t: flow.manifold_map()(flow.bijective.inverse(t)[0]),
                                 z_latent)
    log_n = -0.5 * (z_latent**2).sum(1) - 0.5 * flow.latent_dim * math.log(2 * math.pi)
    torch.testing.assert_close(flow.log_prob(x, logdet="exact"), log_n - full, atol=1e-9,
                               rtol=0)


def test_bound_is_exact_for_one_injective_layer_at_the_data_end():
    """Eq. (12) of the paper: with all bijective layers on the latent side of a single injective
    layer, the layer-wise sum is exactly 0.5 log det(J^T J)."""
    flow = _flow(n_features=8, latent_dim=4, n_steps=0, n_latent_steps=3, scale=0.3)
    assert sum(isinstance(m, InjectiveLinear) for m in flow.modules()) == 1
    z = torch.randn(5, 4, dtype=F64)
    x = flow.inverse(z)[0]
    torch.testing.assert_close(flow.log_prob(x), flow.log_prob(x, logdet="exact"), atol=1e-10,
                               rtol=0)


def _latent_most_injective(flow):
    return [m for m in flow.injective.layers if isinstance(m, InjectiveLinear)][-1]


@pytest.mark.parametrize("config", [
    pytest.param({"n_features": 8, "latent_dim": 3}, id="vector"),
    pytest.param({"image_shape": (1, 4, 4), "n_features": 16, "latent_dim": 4}, id="image"),
])
def test_bound_is_exact_for_isometric_layers(config):
    """Layers on the data side of every injective layer are isometries (random rotations,
    orthonormal injective weights, identity couplings and ActNorms, all drawn in float64); the
    latent-most injective layer and ``h`` are perturbed, so the log-density is not trivial."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        flow = build_injective_flow(**config, n_steps=1, n_latent_steps=2, hidden_features=8,
                                    regularization=0.0, random_state=0).eval()
    finally:
        torch.set_default_dtype(default)
    assert sum(isinstance(m, InjectiveLinear) for m in flow.modules()) == 2
    _perturb(_latent_most_injective(flow), 0.4)
    _perturb(flow.bijective, 0.15)
    flow.eval()  # the layers' cached pseudo-inverses and log-dets follow the new weights
    z = 0.5 * torch.randn(5, flow.latent_dim, dtype=F64)
    bound = flow.decode_manifold(z)[1]
    torch.testing.assert_close(bound, _autograd_half_logdet(flow.manifold_map(), z),
                               atol=1e-10, rtol=0)
    assert bound.abs().min() > 0.1
    x = flow.inverse(z)[0]
    torch.testing.assert_close(flow.log_prob(x), flow.log_prob(x, logdet="exact"), atol=1e-10,
                               rtol=0)


def _without_logit(flow):
    """``g`` without its data-end logit: the layers whose Jacobian ``M`` the logit's ``D``
    multiplies."""
    return lambda t: flow.injective.inverse(t)[0].reshape(len(t), -1)


@pytest.mark.parametrize("config", [
    pytest.param({"n_features": 8, "latent_dim": 3}, id="vector"),
    pytest.param({"n_features": 8, "latent_dim": 3, "activation": "relu"}, id="vector-relu"),
    pytest.param({"image_shape": (1, 4, 4), "n_features": 16, "latent_dim": 4}, id="image"),
    pytest.param({"image_shape": (2, 4, 2), "n_features": 16, "latent_dim": 5}, id="image-dense"),
])
def test_logit_term_bounds_its_tangent_term(config):
    """The logit contributes 0.5 log det(Q^T D^2 Q) (Q the tangent space): brute force, from
    autograd Jacobians with and without the logit. The bound's term lies above it and the sum
    of the d smallest log-slopes below (Poincare's separation theorem)."""
    flow = _flow(data_range=(0, 1), scale=0.3, **config)
    z = torch.randn(6, flow.latent_dim, dtype=F64)
    tangent = (_autograd_half_logdet(flow.manifold_map(), z)
               - _autograd_half_logdet(_without_logit(flow), z))
    pre_logit = _without_logit(flow)(z)
    bound = flow.logit_tangent_bound(pre_logit)
    smallest = flow.logit.inverse_log_slope(pre_logit).topk(flow.latent_dim, 1, largest=False)
    assert torch.all(smallest.values.sum(1) <= tangent) and torch.all(tangent <= bound)
    # the bound's generator log-det is the layer-wise sum of g's layers plus this term
    torch.testing.assert_close(flow.decode_manifold(z)[1],
                               flow.injective.inverse(z)[1] + bound, atol=1e-12, rtol=0)


def test_bound_gap_at_the_data_end_is_the_logit_gap():
    """Eq. (12) with a logit: the layer-wise terms are exact, so the bound's gap in log p is
    the logit's alone, top-d log-slopes minus the brute-force tangent term, and log p is
    bounded from below."""
    flow = _flow(n_features=8, latent_dim=4, n_steps=0, n_latent_steps=3, data_range=(0, 1),
                 scale=0.3)
    z = 0.5 * torch.randn(5, 4, dtype=F64)  # away from the logit's tails, where x -> z loses
    x = flow.inverse(z)[0]                   # digits to saturation
    z_manifold = flow.bijective.inverse(z)[0]
    tangent = (_autograd_half_logdet(flow.manifold_map(), z_manifold)
               - _autograd_half_logdet(_without_logit(flow), z_manifold))
    gap = flow.logit_tangent_bound(_without_logit(flow)(z_manifold)) - tangent
    exact = flow.log_prob(x, logdet="exact")
    torch.testing.assert_close(exact - flow.log_prob(x), gap, atol=1e-9, rtol=0)
    assert torch.all(gap >= 0) and gap.max() > 0.1


# -- the stochastic estimator ------------------------------------------------------------------
def test_stochastic_estimator_is_exact_for_a_scaled_isometry():
    """J = c Q: (I - beta J^T J) = 0.1 I, so Rademacher probes give the trace exactly and only
    the 0.1^n truncation remains."""
    q = torch.linalg.qr(torch.randn(9, 4, dtype=F64))[0]
    z = torch.randn(3, 4, dtype=F64)
    for c in (0.5, 2.0, 7.0):
        est = stochastic_half_logdet(lambda t, c=c: c * (t @ q.T), z, n_probes=2, n_terms=15,
                                     generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(est, torch.full((3,), 4 * math.log(c), dtype=F64),
                                   atol=1e-10, rtol=0)


@pytest.mark.parametrize("config,scale,n_probes", [
    pytest.param({"n_features": 8, "latent_dim": 3}, 0.1, 1000, id="vector"),
    pytest.param({"image_shape": (1, 4, 4), "n_features": 16, "latent_dim": 4,
                  "data_range": (0, 1)},
                 0.05, 800, id="image-logit"),
])
def test_stochastic_estimator_matches_exact(config, scale, n_probes):
    """Algorithm 2 against slogdet(J^T J) on small problems (condition numbers of J^T J of 2 to
    4). Tolerance: 0.06 nats on 0.5 log det(J^T J) per sample. With 40 terms the truncation
    bias is below 0.01; the Hutchinson standard deviation with this many Rademacher probes is
    about 0.015, so the tolerance is about 4 standard deviations."""
    flow = _flow(scale=scale, **config)
    z = 0.5 * torch.randn(2, flow.latent_dim, dtype=F64)
    exact = flow.exact_half_logdet(z)
    est = flow.stochastic_half_logdet(z, n_probes=n_probes, n_terms=40,
                                      generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(est, exact, atol=0.06, rtol=0)
    x = flow.inverse(flow.bijective(z)[0])[0]
    torch.testing.assert_close(
        flow.log_prob(x, logdet="stochastic", n_probes=n_probes, n_terms=40,
                      generator=torch.Generator().manual_seed(0)),
        flow.log_prob(x, logdet="exact"), atol=0.06, rtol=0)


def test_stochastic_estimator_rejects_bad_settings():
    with pytest.raises(ValueError, match="n_probes"):
        stochastic_half_logdet(lambda z: z, torch.zeros(2, 2), n_probes=0)
    flow = _flow()
    with pytest.raises(ValueError, match="logdet must be one of"):
        flow.log_prob(torch.zeros(2, 8, dtype=F64), logdet="hutchinson")


def test_builder_errors():
    with pytest.raises(ValueError, match="latent_dim"):
        build_injective_flow(8, 8)
    with pytest.raises(ValueError, match="latent_dim"):
        build_injective_flow(8, 0)
    with pytest.raises(ValueError, match="does not match"):
        build_injective_flow(16, 4, image_shape=(1, 3, 3))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript-based exporter
def test_exports_to_onnx(tmp_path):
    """The generator path of an eval-mode flow holds no matrix inverse or factorisation."""
    ort = pytest.importorskip("onnxruntime")

    class Decoder(torch.nn.Module):
        def __init__(self, flow):
            super().__init__()
            self.flow = flow

        def forward(self, z):
            return self.flow.generate(z)

    flow = _flow(image_shape=(1, 4, 4), n_features=16, latent_dim=4, activation="relu",
                 data_range=(0, 1)).float().eval()
    z = 0.5 * torch.randn(3, 4)
    path = tmp_path / "g.onnx"
    torch.onnx.export(Decoder(flow), (z,), str(path), input_names=["z"],
                      output_names=["x", "log_p"], dynamic_axes={"z": {0: "batch"}},
                      dynamo=False)
    sess = ort.InferenceSession(str(path))
    z5 = 0.5 * torch.randn(5, 4)
    x, log_p = sess.run(None, {"z": z5.numpy()})
    ref_x, ref_lp = flow.generate(z5)
    np.testing.assert_allclose(x, ref_x.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(log_p, ref_lp.detach().numpy(), atol=1e-3)


# -- the estimator -----------------------------------------------------------------------------
TINY = {"n_steps": 1, "n_latent_steps": 1, "hidden_features": 8, "max_epochs": 2, "batch_size": 32,
            "random_state": 0, "device": "cpu"}


@pytest.fixture(scope="module")
def vector_data():
    rng = np.random.RandomState(0)
    z = rng.standard_normal((120, 2))
    a = rng.standard_normal((2, 6))
    return np.tanh(z @ a) + 0.01 * rng.standard_normal((120, 6))


@pytest.fixture(scope="module")
def fitted_vector(vector_data):
    return InjectiveFlowPrior(latent_dim=2, **{**TINY, "max_epochs": 5}).fit(vector_data)


@pytest.fixture(scope="module")
def digits():
    from flowsk.datasets import load_digit_images
    X, shape = load_digit_images()
    return X[:200], shape


def test_estimator_contract_vector(fitted_vector, vector_data):
    prior, X = fitted_vector, vector_data[:10]
    assert prior.latent_dim_ == 2 and prior.n_features_in_ == 6
    Z = prior.transform(X)
    assert Z.shape == (10, 2) and Z.dtype == np.float64
    assert prior.inverse_transform(Z).shape == (10, 6)
    np.testing.assert_allclose(prior.transform(prior.inverse_transform(Z)), Z, atol=1e-3)
    P = prior.project(X)
    assert P.shape == (10, 6)
    np.testing.assert_allclose(prior.inverse_transform(Z), P, atol=1e-5)
    np.testing.assert_allclose(prior.project(P), P, atol=1e-3)
    assert prior.score_samples(X).shape == (10,)
    assert np.isfinite(prior.score(X))
    assert prior.sample(4, random_state=0).shape == (4, 6)
    np.testing.assert_array_equal(prior.sample(3, random_state=1),
                                  prior.sample(3, random_state=1))
    assert prior.reconstruction_error(X).shape == (10,)
    assert set(prior.history_) == {"train_loss", "val_loss", "mse_train_loss", "mse_val_loss"}
    assert len(prior.history_["mse_val_loss"]) == 5


def test_estimator_logdet_options(fitted_vector, vector_data):
    """``logdet`` is read at scoring time, so it can be switched on a fitted prior; the
    default ``"auto"`` is the exact value here (latent_dim 2 <= n_probes * n_terms)."""
    X = vector_data[:5]
    prior = pickle.loads(pickle.dumps(fitted_vector))
    assert prior.logdet == "auto"
    s_auto = prior.score_samples(X)
    s_exact = prior.set_params(logdet="exact").score_samples(X)
    np.testing.assert_array_equal(s_auto, s_exact)
    prior.set_params(logdet="stochastic", n_probes=64, n_terms=40)
    s_stoch = prior.score_samples(X)
    np.testing.assert_array_equal(s_stoch, prior.score_samples(X))  # seeded: reproducible
    assert np.abs(s_stoch - s_exact).max() < 0.5
    # "auto" takes the stochastic estimate when the exact value needs more products
    prior.set_params(logdet="auto", n_probes=1, n_terms=1)
    np.testing.assert_array_equal(prior.score_samples(X),
                                  prior.set_params(logdet="stochastic").score_samples(X))
    s_bound = prior.set_params(logdet="bound").score_samples(X)
    flow = prior.flow_
    np.testing.assert_allclose(s_bound, flow.log_prob(torch.tensor(X, dtype=torch.float32))
                               .detach().numpy(), rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("data_range", [None, (0, 1)], ids=["unbounded", "logit"])
def test_trained_prior_scores_the_brute_force_density(digits, data_range):
    """After training (not an identity-like model): the default score is log N(z) - log|det
    J_h| - 0.5 log det(J_g^T J_g) with J_g from torch.autograd in float64, and the bound's
    logit term lies above its brute-force tangent term."""
    X, shape = digits
    prior = InjectiveFlowPrior(image_shape=shape, latent_dim=16, data_range=data_range,
                               **{**TINY, "max_epochs": 3}).fit(X)
    flow = copy.deepcopy(prior.flow_).double()
    x = torch.tensor(X[:4], dtype=F64)
    z_manifold = flow.encode_manifold(x)[0]
    z, ld_h = flow.bijective(z_manifold)
    g = flow.manifold_map()
    log_n = -0.5 * (z**2).sum(1) - 0.5 * flow.latent_dim * math.log(2 * math.pi)
    brute = (log_n + ld_h - _autograd_half_logdet(g, z_manifold)).detach().numpy()
    # the estimator runs in float32: its Jacobian carries float32 rounding
    np.testing.assert_allclose(prior.score_samples(X[:4]), brute, atol=1e-4, rtol=0)
    if data_range is not None:
        tangent = (_autograd_half_logdet(g, z_manifold)
                   - _autograd_half_logdet(_without_logit(flow), z_manifold))
        bound = flow.logit_tangent_bound(_without_logit(flow)(z_manifold))
        assert torch.all(tangent <= bound)


def test_estimator_images_and_data_range(digits):
    X, shape = digits
    prior = InjectiveFlowPrior(image_shape=shape, latent_dim=16, data_range=(0, 1),
                               **TINY).fit(X)
    assert prior.transform(X[:5]).shape == (5, 16)
    S = prior.sample(8, random_state=0)
    assert S.shape == (8, 64) and S.min() >= 0 and S.max() <= 1
    P = prior.project(X[:5])
    assert P.min() >= 0 and P.max() <= 1
    err = prior.reconstruction_error(X[:20])
    assert err.shape == (20,) and np.all(err < 1.0)
    assert np.isfinite(prior.score(X[:5]))
    relu = InjectiveFlowPrior(image_shape=shape, latent_dim=16, activation="relu",
                              **TINY).fit(X)
    assert any(isinstance(m, InjectiveReLULinear) for m in relu.flow_.modules())


def test_pickle_joblib_and_clone(fitted_vector, vector_data, tmp_path):
    X = vector_data[:8]
    path = tmp_path / "prior.joblib"
    joblib.dump(fitted_vector, path)
    loaded = joblib.load(path)
    np.testing.assert_array_equal(loaded.transform(X), fitted_vector.transform(X))
    np.testing.assert_array_equal(loaded.project(X), fitted_vector.project(X))
    np.testing.assert_array_equal(loaded.score_samples(X), fitted_vector.score_samples(X))
    again = pickle.loads(pickle.dumps(fitted_vector))
    np.testing.assert_array_equal(again.sample(3, random_state=0),
                                  fitted_vector.sample(3, random_state=0))
    fresh = clone(fitted_vector)
    assert fresh.get_params() == fitted_vector.get_params()
    assert not hasattr(fresh, "flow_")


def test_fit_is_reproducible(vector_data):
    a = InjectiveFlowPrior(latent_dim=2, **TINY).fit(vector_data)
    b = InjectiveFlowPrior(latent_dim=2, **TINY).fit(vector_data)
    np.testing.assert_array_equal(a.transform(vector_data), b.transform(vector_data))


@pytest.mark.parametrize("params,X_shape,match", [
    ({"latent_dim": 6}, (20, 6), "latent_dim must be smaller"),
    ({"latent_dim": 9}, (20, 6), "latent_dim must be smaller"),
    ({"latent_dim": 0}, (20, 6), "latent_dim must be a positive int"),
    ({"latent_dim": 2.5}, (20, 6), "latent_dim must be a positive int"),
    ({}, (20, 1), "n_features=1"),
    ({"image_shape": (1, 2, 2)}, (20, 6), "image_shape"),
    ({"image_shape": (1, 2)}, (20, 6), "image_shape"),
    ({"activation": "tanh"}, (20, 6), "activation"),
    ({"coupling": "cubic"}, (20, 6), "coupling"),
    ({"logdet": "hutchinson"}, (20, 6), "logdet"),
    ({"n_probes": 0}, (20, 6), "n_probes"),
    ({"n_steps": -1}, (20, 6), "n_steps"),
    ({"n_latent_steps": 0}, (20, 6), "n_latent_steps"),
    ({"regularization": -1e-6}, (20, 6), "regularization"),
    ({"max_epochs": 0}, (20, 6), "max_epochs"),
])
def test_bad_parameters(params, X_shape, match):
    X = np.random.RandomState(0).standard_normal(X_shape)
    with pytest.raises(ValueError, match=match):
        InjectiveFlowPrior(**{**TINY, **params}).fit(X)


def test_bad_inputs(fitted_vector, vector_data):
    with pytest.raises(NotFittedError):
        InjectiveFlowPrior().project(vector_data)
    with pytest.raises(ValueError, match="features"):
        fitted_vector.project(vector_data[:, :4])
    with pytest.raises(ValueError, match="latent dimension 2"):
        fitted_vector.inverse_transform(np.zeros((3, 6)))
    with pytest.raises(ValueError, match="NaN|infinity"):
        fitted_vector.transform(np.full((2, 6), np.nan))
    with pytest.raises(NotImplementedError, match="manifold"):
        fitted_vector.bits_per_dim(vector_data)
    bounded = InjectiveFlowPrior(latent_dim=2, data_range=(0, 1), **TINY)
    with pytest.raises(ValueError, match="outside data_range"):
        bounded.fit(vector_data)


# -- scikit-learn's own checks -----------------------------------------------------------------
@parametrize_with_checks([InjectiveFlowPrior(latent_dim=1, **TINY)])
def test_sklearn_compatible(estimator, check):
    check(estimator)

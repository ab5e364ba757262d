"""InverseSolver and the latent-optimisation methods, checked against closed forms."""
import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.special import expit, log_expit
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV

from flowsk import FlowPrior, InverseSolver
from flowsk.methods import METHODS
from flowsk.metrics import psnr
from flowsk.nn.base import Chain, Flow
from flowsk.nn.linear import ActNorm, InvertibleLinear
from flowsk.nn.multiscale import Logit
from flowsk.operators import (
    CompressedSensing,
    Denoising,
    FunctionOperator,
    Inpainting,
    SuperResolution,
)

N = 6


def gaussian_prior(seed=0):
    """A fitted FlowPrior whose flow is affine: x = mu + L z, so p(x) = N(mu, L L^T)."""
    gen = torch.Generator().manual_seed(seed)
    act = ActNorm(N)
    with torch.no_grad():
        act.bias.copy_(0.3 * torch.randn(N, generator=gen))
        act.log_scale.copy_(0.3 * torch.randn(N, generator=gen))
        act.initialized.fill_(True)
    flow = Flow(Chain(InvertibleLinear(N, gen), act), N).eval().requires_grad_(False)
    prior = FlowPrior(device="cpu")
    prior.flow_, prior.n_features_in_, prior.device_ = flow, N, torch.device("cpu")
    prior.training_range_ = (-3.0, 3.0)  # the PSNR peak of InverseSolver.score
    return prior


def affine_generator(prior):
    """``mu (n,)`` and ``L (n, n)`` of x = mu + L z, by autograd (float64)."""
    flow = prior.flow_
    g = lambda z: flow.inverse(z.float()[None])[0][0].double()  # noqa: E731
    mu = g(torch.zeros(N, dtype=torch.float64)).numpy()
    L = torch.autograd.functional.jacobian(g, torch.zeros(N, dtype=torch.float64)).numpy()
    return mu, L


def measurement(A, seed=1):
    rng = np.random.RandomState(seed)
    return rng.uniform(-1, 1, size=(4, A.shape[0]))


@pytest.fixture(scope="module")
def setup():
    prior = gaussian_prior()
    op = CompressedSensing(N, 4, random_state=0)
    A = op.matrix.numpy()
    return prior, op, A, measurement(A)


def test_map_matches_gaussian_posterior_mean(setup):
    prior, op, A, Y = setup
    mu, L = affine_generator(prior)
    sigma = 0.5
    prec = np.linalg.inv(L @ L.T) + A.T @ A / sigma**2
    expected = np.linalg.solve(prec,
                               (np.linalg.inv(L @ L.T) @ mu)[:, None] + A.T @ Y.T / sigma**2).T
    solver = InverseSolver(prior, op, method="map", sigma=sigma, beta=1.0, n_iter=1500,
                           learning_rate=0.02, random_state=0)
    np.testing.assert_allclose(solver.predict(Y), expected, atol=2e-3)


@pytest.mark.parametrize("method,gamma", [("glowip", 0.3), ("csgm", 0.3)])
def test_gamma_methods_match_ridge_solution(setup, method, gamma):
    prior, op, A, Y = setup
    mu, L = affine_generator(prior)
    M = A @ L
    z = np.linalg.solve(M.T @ M + gamma * np.eye(N), M.T @ (Y - A @ mu).T).T
    solver = InverseSolver(prior, op, method=method, gamma=gamma, n_iter=1500,
                           learning_rate=0.02, random_state=0)
    np.testing.assert_allclose(solver.predict(Y), mu + z @ L.T, atol=2e-3)


def test_likelihood_recovers_noiseless_signal_with_small_alpha(setup):
    prior = setup[0]
    X = prior.sample(5, random_state=3)
    op = Denoising(N)
    solver = InverseSolver(prior, op, method="likelihood", alpha=1e-4, n_iter=1500,
                           learning_rate=0.01, random_state=0)
    np.testing.assert_allclose(solver.predict(op.measure(X)), X, atol=5e-3)


def test_likelihood_weight_pulls_towards_the_mode(setup):
    prior, op, _, Y = setup
    mode = prior.inverse_transform(np.zeros((1, N)))
    dist = [np.abs(InverseSolver(prior, op, method="likelihood", alpha=a, n_iter=400,
                                 random_state=0).predict(Y) - mode).mean()
            for a in (0.0, 100.0)]
    assert dist[1] < 0.1 * dist[0]


def test_pinv_is_clipped_to_the_data_range():
    prior = gaussian_prior()
    prior.data_range = (0.0, 1.0)
    Y = np.array([[-2.0, 0.5, 3.0, 0.2, 0.9, 1.5]])
    X = InverseSolver(prior, Denoising(N), method="pinv").predict(Y)
    np.testing.assert_allclose(X, np.clip(Y, 0, 1), atol=1e-7)  # float32 compute


# -- a bounded prior: the affine flow behind a logit ------------------------------------------
LOGIT_ALPHA = 0.05  # Logit's default


def bounded_prior(seed=0):
    """``(prior, G)``: a fitted FlowPrior with ``data_range=(0, 1)`` whose flow is the affine
    map of :func:`gaussian_prior` behind a logit, and ``G(z) -> (x, log|det dx/dz|)`` written
    out in float64 NumPy: ``x = (sigmoid(mu + L z) - a) / (1 - 2 a)``."""
    prior = gaussian_prior(seed)
    mu, L = affine_generator(prior)
    prior.flow_ = Flow(Chain(Logit((0, 1), alpha=LOGIT_ALPHA), *prior.flow_.body.layers), N,
                       data_range=(0, 1)).eval().requires_grad_(False)
    prior.data_range = (0.0, 1.0)
    logdet_L = np.linalg.slogdet(L)[1]

    def G(z):
        t = mu + L @ z
        x = (expit(t) - LOGIT_ALPHA) / (1 - 2 * LOGIT_ALPHA)
        return x, logdet_L + np.sum(log_expit(t) + log_expit(-t) - np.log(1 - 2 * LOGIT_ALPHA))

    return prior, G


def log_p(G, z):
    """``log p(G(z)) = log N(z; 0, I) - log|det dG/dz|``."""
    return -0.5 * z @ z - 0.5 * N * np.log(2 * np.pi) - G(z)[1]


def bounded_problems():
    """``(operator, A, Y)``: compressed sensing of signals near the middle of the range, and
    denoising of values up to 0.2 beyond it."""
    cs = CompressedSensing(N, 4, random_state=0)
    A = cs.matrix.numpy()
    Y_cs = 0.5 * measurement(A) + A @ np.full(N, 0.5)
    Y_dn = np.random.RandomState(2).uniform(-0.2, 1.2, (4, N))
    return [(cs, A, Y_cs), (Denoising(N), np.eye(N), Y_dn)]


def test_bounded_prior_generates_the_reference():
    prior, G = bounded_prior()
    z = np.random.RandomState(0).standard_normal((5, N))
    x, log_px = prior.flow_.generate(torch.tensor(z, dtype=torch.float32))
    np.testing.assert_allclose(x.numpy(), [G(zi)[0] for zi in z], atol=1e-6)
    np.testing.assert_allclose(log_px.numpy(), [log_p(G, zi) for zi in z], atol=1e-4)


def _minimize(f, y):
    return minimize(f, np.zeros(N), args=(y,), method="BFGS", options={"gtol": 1e-10}).x


@pytest.mark.slow
@pytest.mark.parametrize("problem", [0, 1], ids=["cs", "denoise"])
def test_map_with_a_bounded_prior_matches_scipy(problem):
    """MAP's objective through the logit, minimised by BFGS in float64 from the solver's
    start: the solver returns the optimum's signal, clipped to the data range (denoising
    with sigma 0.05 puts some optima below 0)."""
    prior, G = bounded_prior()
    op, A, Y = bounded_problems()[problem]
    sigma, beta = (0.3, 0.05)[problem], 1.0

    def objective(z, y):
        return ((A @ G(z)[0] - y) ** 2).sum() / (2 * sigma**2) - beta * log_p(G, z)

    optima = np.array([G(_minimize(objective, y))[0] for y in Y])
    assert problem == 0 or optima.min() < 0
    expected = np.clip(optima, 0, 1)
    solver = InverseSolver(prior, op, method="map", sigma=sigma, beta=beta, init="zeros",
                           n_iter=1500, learning_rate=0.02, random_state=0)
    np.testing.assert_allclose(solver.predict(Y), expected, atol=2e-3)


@pytest.mark.parametrize("method", ["glowip", "csgm"])
@pytest.mark.parametrize("problem", [0, 1], ids=["cs", "denoise"])
def test_gamma_methods_with_a_bounded_prior_match_scipy(method, problem):
    prior, G = bounded_prior()
    op, A, Y = bounded_problems()[problem]
    gamma = 0.3

    def objective(z, y):
        return ((A @ G(z)[0] - y) ** 2).sum() + gamma * z @ z

    expected = np.clip([G(_minimize(objective, y))[0] for y in Y], 0, 1)
    solver = InverseSolver(prior, op, method=method, gamma=gamma, n_iter=1500,
                           learning_rate=0.02, random_state=0)
    np.testing.assert_allclose(solver.predict(Y), expected, atol=2e-3)


@pytest.mark.slow
def test_likelihood_with_a_bounded_prior_reaches_the_minimum():
    """Chavez's objective ``||A G(z) - y||_1 - alpha log p(G(z))`` is not smooth: its minimum
    comes from SLSQP on the smooth equivalent ``min sum(s) - alpha log p`` with
    ``-s <= A G(z) - y <= s``, and the solver's latent must reach it to 2e-3."""
    prior, G = bounded_prior()
    op, A, Y = bounded_problems()[0]
    alpha = 0.05

    def objective(z, y):
        return np.abs(A @ G(z)[0] - y).sum() - alpha * log_p(G, z)

    def minimum(y):
        residual = lambda v: A @ G(v[:N])[0] - y  # noqa: E731
        start = np.concatenate([np.zeros(N), np.abs(residual(np.zeros(2 * N))) + 0.1])
        result = minimize(lambda v: v[N:].sum() - alpha * log_p(G, v[:N]), start,
                          method="SLSQP", options={"ftol": 1e-14, "maxiter": 1000},
                          constraints=[{"type": "ineq", "fun": lambda v: v[N:] - residual(v)},
                                       {"type": "ineq", "fun": lambda v: v[N:] + residual(v)}])
        assert result.success
        return objective(result.x[:N], y)

    solver = InverseSolver(prior, op, method="likelihood", alpha=alpha, init="zeros",
                           n_iter=1500, learning_rate=0.01, random_state=0)
    X = solver.predict(Y)
    assert 0 < X.min() and X.max() < 1  # inside the range: transform recovers the latents
    gaps = [objective(z, y) - minimum(y) for z, y in zip(prior.transform(X), Y)]
    assert -1e-6 < min(gaps) and max(gaps) < 2e-3


class CountingBody(torch.nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body, self.calls = body, {"forward": 0, "inverse": 0}

    def forward(self, x, context=None):
        self.calls["forward"] += 1
        return self.body(x, context)

    def inverse(self, z, context=None):
        self.calls["inverse"] += 1
        return self.body.inverse(z, context)


@pytest.mark.parametrize("method", ["map", "likelihood"])
def test_log_prob_costs_one_generator_pass(setup, method):
    prior, op, _, Y = setup
    counter = CountingBody(prior.flow_.body)
    prior.flow_.body = counter
    try:
        InverseSolver(prior, op, method=method, n_iter=7, random_state=0).predict(Y)
    finally:
        prior.flow_.body = counter.body
    # one pass per iteration plus the final decode; never the data-to-latent direction
    assert counter.calls == {"forward": 0, "inverse": 8}


def test_csgm_restarts_keep_the_best_data_fit(setup):
    prior, op, A, Y = setup
    fits = []
    for restarts in (1, 4):
        X = InverseSolver(prior, op, method="csgm", n_restarts=restarts, n_iter=30,
                          random_state=0).predict(Y)
        fits.append(((X @ A.T - Y) ** 2).sum(1))
    assert np.all(fits[1] <= fits[0] + 1e-6)


def test_iterates_leaving_the_finite_range_keep_the_last_good_one(setup):
    """An operator that is infinite beyond |x| = 2 and data that pull x to 5: the objective
    turns infinite on the way, and each observation keeps its best finite iterate."""
    prior = setup[0]
    op = FunctionOperator(lambda x: torch.where(x.abs() < 2, x, torch.inf), N)
    Y = np.full((3, N), 5.0)
    X = InverseSolver(prior, op, method="glowip", n_iter=200, learning_rate=0.1).predict(Y)
    assert np.isfinite(X).all() and np.abs(X).max() < 2
    start = prior.inverse_transform(np.zeros((1, N)))
    assert np.all(((X - 5) ** 2).sum(1) < ((start - 5) ** 2).sum())  # it made progress


def test_restarts_that_never_leave_the_non_finite_range_do_not_win(setup):
    """Restarts starting where the objective is NaN (the operator is NaN beyond |x| = 2) keep
    a NaN data fit; the best restart per observation is still a finite one."""
    prior = setup[0]
    op = FunctionOperator(lambda x: torch.where(x.abs() < 2, x, torch.nan), N)
    Y = np.zeros((10, N))
    X = InverseSolver(prior, op, method="csgm", gamma=0.0, init_std=1.0, n_restarts=6,
                      n_iter=50, random_state=0).predict(Y)
    assert np.isfinite(X).all() and np.abs(X).max() < 2


def test_seeded_predictions_are_reproducible(setup):
    prior, op, _, Y = setup
    s = InverseSolver(prior, op, method="csgm", n_iter=20, random_state=5)
    np.testing.assert_array_equal(s.predict(Y), s.predict(Y))


@pytest.fixture(scope="module")
def digits_setup():
    from flowsk.datasets import load_digit_images
    X, shape = load_digit_images()
    prior = FlowPrior(data_range=(0, 1), dequantize=1 / 16, n_steps=2, hidden_features=16,
                      max_epochs=3, device="cpu", random_state=0).fit(X[:300])
    op = Inpainting(shape, box=(2, 2, 6, 6))
    Xv = X[300:340]
    return prior, op, op.measure(Xv, noise_std=0.01, random_state=0), Xv


def test_score_is_mean_psnr_and_reconstructions_stay_in_range(digits_setup):
    prior, op, Y, X = digits_setup
    solver = InverseSolver(prior, op, method="glowip", n_iter=20)
    X_hat = solver.predict(Y)
    assert X_hat.shape == X.shape and X_hat.min() >= 0 and X_hat.max() <= 1
    mse = ((X - X_hat) ** 2).mean(1)
    assert solver.score(Y, X) == pytest.approx(np.mean(10 * np.log10(1 / mse)))


@pytest.mark.parametrize("param,grid,method", [
    ("alpha", [0.005, 0.5], "likelihood"), ("gamma", [0.0, 1.0], "glowip"),
    ("beta", [0.1, 1.0], "map"), ("sigma", [0.05, 0.5], "map")])
def test_grid_search_without_a_scorer(digits_setup, param, grid, method):
    prior, op, Y, X = digits_setup
    search = GridSearchCV(InverseSolver(prior, op, method=method, n_iter=10, random_state=0),
                          {param: grid}, cv=2).fit(Y, X)
    scores = search.cv_results_["mean_test_score"]
    assert np.all(np.isfinite(scores))
    assert search.best_params_[param] == grid[int(np.argmax(scores))]
    assert search.best_estimator_.prior is prior  # shared, never refitted


def test_grid_search_in_parallel(digits_setup):
    prior, op, Y, X = digits_setup
    kw = dict(method="likelihood", n_iter=10, random_state=0)
    grid = {"alpha": [0.005, 0.5]}
    serial = GridSearchCV(InverseSolver(prior, op, **kw), grid, cv=2).fit(Y, X)
    parallel = GridSearchCV(InverseSolver(prior, op, **kw), grid, cv=2, n_jobs=2).fit(Y, X)
    np.testing.assert_allclose(parallel.cv_results_["mean_test_score"],
                               serial.cv_results_["mean_test_score"], rtol=1e-5)


def test_clone_shares_the_fitted_prior(setup):
    prior, op, _, _ = setup
    solver = clone(InverseSolver(prior, op, method="map", sigma=0.2))
    assert solver.prior is prior and solver.sigma == 0.2


def test_bad_input_errors(setup):
    prior, op, _, Y = setup
    solver = InverseSolver(prior, op, method="glowip")
    with pytest.raises(ValueError, match="columns|width|features"):
        solver.predict(Y[:, :3])
    with pytest.raises(ValueError, match="NaN|finite"):
        solver.predict(np.where(Y > 0, np.nan, Y))
    with pytest.raises(ValueError, match="operator acts on 5 features but the prior models 6"):
        InverseSolver(prior, Denoising(5)).predict(Y[:, :5])
    with pytest.raises(NotFittedError, match="prior is not fitted"):
        InverseSolver(FlowPrior(), op).predict(Y)
    with pytest.raises(ValueError, match="valid methods: .*glowip.*likelihood"):
        InverseSolver(prior, op, method="nope").predict(Y)
    with pytest.raises(ValueError, match="does not use alpha"):
        InverseSolver(prior, op, method="glowip", alpha=0.1).predict(Y)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        InverseSolver(prior, op, method="map", sigma=-1.0).predict(Y)
    with pytest.raises(ValueError, match="point estimate"):
        solver.predict(Y, return_std=True)


def test_every_registered_method_has_consistent_defaults():
    for name, method in METHODS.items():
        assert isinstance(method.defaults, dict), name
        if method.posterior:
            assert "n_samples" in method.defaults, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(setup):
    prior, op, _, Y = setup
    cpu = InverseSolver(prior, op, method="glowip", gamma=0.3, n_iter=200).predict(Y)
    gpu = InverseSolver(prior, op, method="glowip", gamma=0.3, n_iter=200,
                        device="cuda").predict(Y)
    np.testing.assert_allclose(gpu, cpu, atol=1e-3)


def test_likelihood_default_alpha_does_not_saturate_a_weak_operator(digits_setup):
    """With a logit at the data end, log p(G(z)) rises towards the bounds; 2x super-resolution
    pulls each pixel only a quarter as hard as denoising does, so too large an alpha drives the
    pixels into the bounds. The default must improve on the measurement's own upsampling."""
    prior, _, _, X = digits_setup
    op = SuperResolution((1, 8, 8), 2)
    Y = op.measure(X, noise_std=0.01, random_state=0)
    baseline = psnr(X, InverseSolver(prior, op, method="pinv").predict(Y)).mean()
    default = psnr(X, InverseSolver(prior, op, method="likelihood", random_state=0
                                    ).predict(Y)).mean()
    assert default > baseline + 1

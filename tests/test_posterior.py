"""Posterior methods (``vi``, ``ambient-vi``, ``amortized-vi``, ``langevin``, ``mala``, ``hmc``,
``pl-mcmc``) checked against the exact posterior of a linear-Gaussian model, and of a bounded
prior (a logit at the data end) measured through its logit."""
import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.model_selection import GridSearchCV

from flowsk import FlowPrior, InverseSolver
from flowsk.methods import METHODS
from flowsk.methods.variational import BatchedPreGenerator
from flowsk.nn.base import Chain, Flow
from flowsk.nn.linear import ActNorm, InvertibleLinear
from flowsk.nn.multiscale import Logit
from flowsk.operators import CompressedSensing, FunctionOperator, Inpainting

N = 6
POSTERIOR = ("vi", "ambient-vi", "amortized-vi", "langevin", "mala", "hmc", "pl-mcmc", "smc")
# settings that make each method accurate on the 6-dimensional Gaussian problem
ACCURATE = {
    "vi": dict(n_iter=300),
    # no Laplace start (exact here): the optimisation itself has to find the posterior
    "vi-from-prior": dict(method="vi", init="prior", learning_rate=2e-2, n_iter=400),
    "ambient-vi": dict(n_iter=400, method_params=dict(mc_samples=32)),
    "ambient-vi-from-prior": dict(method="ambient-vi", init="prior", n_iter=400,
                                  method_params=dict(mc_samples=32)),
    "amortized-vi": dict(method_params=dict(coupling="affine", n_simulations=4000, n_iter=30,
                                            n_steps=2, hidden_features=32)),
    # the Laplace preconditioner and the perturb-and-MAP start put the chains at the exact
    # posterior here; from prior draws they have to get there
    "langevin": dict(method_params=dict(burn_in=300, thin=2, n_chains=200,
                                        preconditioner="identity", start="prior")),
    # (MALA draws are correlated: thin so that 4000 draws have an effective size near 4000)
    "mala": dict(method_params=dict(burn_in=300, thin=20, n_chains=200,
                                    preconditioner="identity", start="prior")),
    "hmc": dict(method_params=dict(burn_in=100, thin=1, n_chains=200,
                                   preconditioner="identity", start="prior")),
    "pl-mcmc": dict(method_params=dict(burn_in=300, thin=4, n_chains=200,
                                       preconditioner="identity", start="prior")),
    # prior draws tempered to the posterior; the Laplace preconditioner is exact here
    "smc": dict(method_params=dict(n_particles=4000, preconditioner="identity")),
}
# tiny settings for API checks
QUICK = {
    "vi": dict(n_iter=5),
    "ambient-vi": dict(n_iter=5),
    "amortized-vi": dict(method_params=dict(coupling="affine", n_simulations=200, n_iter=1,
                                            n_steps=1, hidden_features=8)),
    "langevin": dict(method_params=dict(burn_in=5, thin=1)),
    "mala": dict(method_params=dict(burn_in=5, thin=1)),
    "hmc": dict(method_params=dict(burn_in=5, thin=1, n_leapfrog=2)),
    "pl-mcmc": dict(method_params=dict(burn_in=5, thin=1)),
    "smc": dict(method_params=dict(n_particles=16, n_moves=1, n_leapfrog=2)),
}


def gaussian_prior(n=N, seed=0):
    """A fitted FlowPrior whose flow is affine: x = mu + L z, so p(x) = N(mu, L L^T)."""
    gen = torch.Generator().manual_seed(seed)
    act = ActNorm(n)
    with torch.no_grad():
        act.bias.copy_(0.3 * torch.randn(n, generator=gen))
        act.log_scale.copy_(0.3 * torch.randn(n, generator=gen))
        act.initialized.fill_(True)
    flow = Flow(Chain(InvertibleLinear(n, gen), act), n).eval().requires_grad_(False)
    prior = FlowPrior(device="cpu")
    prior.flow_, prior.n_features_in_, prior.device_ = flow, n, torch.device("cpu")
    prior.training_range_ = (-3.0, 3.0)  # the PSNR peak of InverseSolver.score
    return prior


def bounded_prior(n=4, seed=0, spread=1.5):
    """A fitted FlowPrior with ``data_range=(0, 1)`` whose flow is affine after its logit layer:
    ``x = logit^-1(mu + L z)``, clipped to ``[0, 1]`` by ``decode``; ``spread`` scales ``L``."""
    gen = torch.Generator().manual_seed(seed)
    act = ActNorm(n)
    with torch.no_grad():
        act.bias.copy_(0.5 * torch.randn(n, generator=gen))
        act.log_scale.copy_(-math.log(spread) + 0.2 * torch.randn(n, generator=gen))
        act.initialized.fill_(True)
    flow = Flow(Chain(Logit((0, 1)), InvertibleLinear(n, gen), act), n,
                data_range=(0, 1)).eval().requires_grad_(False)
    prior = FlowPrior(data_range=(0, 1), device="cpu")
    prior.flow_, prior.n_features_in_, prior.device_ = flow, n, torch.device("cpu")
    return prior


def exact_posterior(prior, A, Y, sigma, full=False):
    """Mean ``(n_obs, n)`` and per-feature std ``(n,)`` (``full``: the covariance ``(n, n)``)
    of p(x | y) for y = A x + N(0, sigma^2)."""
    flow, n = prior.flow_, prior.n_features_in_
    g = lambda z: flow.inverse(z.float()[None])[0][0].double()  # noqa: E731
    mu = g(torch.zeros(n, dtype=torch.float64)).numpy()
    L = torch.autograd.functional.jacobian(g, torch.zeros(n, dtype=torch.float64)).numpy()
    prior_prec = np.linalg.inv(L @ L.T)
    cov = np.linalg.inv(prior_prec + A.T @ A / sigma**2)
    mean = (cov @ (prior_prec @ mu[:, None] + A.T @ Y.T / sigma**2)).T
    return mean, cov if full else np.sqrt(np.diag(cov))


@pytest.fixture(scope="module")
def setup():
    prior = gaussian_prior()
    op = CompressedSensing(N, 4, random_state=0)
    A = op.matrix.numpy().astype(np.float64)
    Y = np.random.RandomState(1).uniform(-1, 1, size=(4, A.shape[0]))
    return prior, op, A, Y


def _solver(prior, op, method, settings, **kw):
    return InverseSolver(prior, op, **{"method": method, **settings[method], **kw})


@pytest.mark.parametrize("method,mean_tol,std_tol", [
    ("vi", 0.1, 0.1), ("vi-from-prior", 0.1, 0.1), ("ambient-vi", 0.15, 0.1),
    ("ambient-vi-from-prior", 0.15, 0.1),
    ("amortized-vi", 0.2, 0.15), ("langevin", 0.2, 0.15), ("mala", 0.1, 0.1),
    ("hmc", 0.1, 0.1), ("pl-mcmc", 0.2, 0.1), ("smc", 0.1, 0.1)])
def test_matches_the_gaussian_posterior(setup, method, mean_tol, std_tol):
    """Mean within ``mean_tol`` posterior stds, per-feature std within ``std_tol`` relative."""
    prior, op, A, Y = setup
    sigma = 0.5
    mean, std = exact_posterior(prior, A, Y, sigma)
    solver = _solver(prior, op, method, ACCURATE, sigma=sigma, n_samples=4000, random_state=0)
    if METHODS[solver.method].needs_fit:
        solver.fit(Y)
    m, s = solver.predict(Y, return_std=True)
    assert m.shape == s.shape == Y.shape[:1] + (N,)
    assert (np.abs(m - mean) / std).max() < mean_tol
    np.testing.assert_allclose(s, np.broadcast_to(std, s.shape), rtol=std_tol)


@pytest.mark.parametrize("preconditioner", ["identity", "laplace"])
def test_perturbed_map_start_draws_the_gaussian_posterior(setup, preconditioner):
    """For an affine generator and a linear operator the perturb-and-MAP points are draws of the
    exact posterior, so chains started there need no burn-in. The chains are frozen (one step
    of size 1e-9), so the draws are the starts. Checked in the measured directions ``A x`` as
    well, where the posterior is narrowest; prior draws are far from the posterior."""
    prior, op, A, Y = setup
    sigma = 0.05
    mean, cov = exact_posterior(prior, A, Y, sigma, full=True)
    std, std_measured = np.sqrt(np.diag(cov)), np.sqrt(np.diag(A @ cov @ A.T))

    def draws(start):
        return InverseSolver(prior, op, method="mala", sigma=sigma, random_state=0,
                             method_params=dict(burn_in=0, thin=1, n_chains=4000, start=start,
                                                start_iter=2000, step_size=1e-9,
                                                preconditioner=preconditioner)
                             ).sample_posterior(Y, 4000)

    S = draws("perturbed-map")
    assert (np.abs(S.mean(1) - mean) / std).max() < 0.1
    np.testing.assert_allclose(S.std(1), np.broadcast_to(std, S.shape[::2]), rtol=0.1)
    np.testing.assert_allclose((S @ A.T).std(1), np.broadcast_to(std_measured, Y.shape),
                               rtol=0.1)
    assert (np.abs(draws("prior").mean(1) - mean) / std).max() > 1


def test_vi_beta_below_one_gives_a_colder_posterior(setup):
    prior, op, A, Y = setup
    kw = dict(method="vi", sigma=0.5, n_iter=100, n_samples=2000, random_state=0)
    _, warm = InverseSolver(prior, op, beta=1.0, **kw).predict(Y, return_std=True)
    _, cold = InverseSolver(prior, op, beta=0.25, **kw).predict(Y, return_std=True)
    # for a Gaussian, beta scales the posterior covariance: std shrinks by sqrt(beta)
    np.testing.assert_allclose(cold / warm, 0.5, rtol=0.15)


def test_vi_draws_leaving_the_finite_range_do_not_spoil_the_batch():
    """The operator is the identity for |x| < 1.5 and NaN beyond, with NaN gradients (as a
    flow that overflows): Monte Carlo draws of an observation near that edge give a NaN loss.
    That observation skips those steps; no pre-generator turns NaN, and the observation well
    inside still gets its exact posterior mean."""
    prior = gaussian_prior()
    op = FunctionOperator(lambda x: x + 0 * torch.log(1.5 - x.abs()), N)
    mu = prior.inverse_transform(np.zeros((1, N)))[0]
    Y = np.stack([mu, np.full(N, 1.4)])
    sigma = 0.2
    mean = InverseSolver(prior, op, method="vi", sigma=sigma, n_iter=300,
                         method_params={"n_samples": 1000}, random_state=0).predict(Y)
    assert np.isfinite(mean).all()
    expected, _ = exact_posterior(prior, np.eye(N), Y[:1], sigma)
    np.testing.assert_allclose(mean[0], expected[0], atol=0.05)


class _NaNBeyondEdge(torch.nn.Module):
    """Identity with a generator that is NaN where any latent |z_i| >= 1.5 (an overflow)."""

    def forward(self, x, context=None):
        return x, x.new_zeros(len(x))

    def inverse(self, z, context=None):
        return z + 0 * torch.log(1.5 - z.abs()), z.new_zeros(len(z))


@pytest.mark.parametrize("method", ["vi", "amortized-vi"])
def test_vi_redraws_draws_the_generator_cannot_make(method):
    """Part of q lies beyond the generator's finite range (|z_i| < 1.5); those draws are
    redrawn, so ``sample_posterior`` returns finite draws of latents inside the range."""
    prior = gaussian_prior()
    prior.flow_.body.layers.append(_NaNBeyondEdge())
    op = CompressedSensing(N, 4, random_state=0)
    Y = op.measure(prior.inverse_transform(np.full((2, N), 0.5)), noise_std=0.0)
    settings = {"vi": dict(n_iter=50), "amortized-vi": QUICK["amortized-vi"]}[method]
    solver = InverseSolver(prior, op, method=method, sigma=0.5, random_state=0, **settings)
    with warnings.catch_warnings():  # amortized-vi drops the simulations that overflow
        warnings.filterwarnings("ignore", ".*dropped", RuntimeWarning)
        draws = solver.fit(Y).sample_posterior(Y, n_samples=200)
    assert np.isfinite(draws).all()
    latents = prior.transform(draws.reshape(-1, N))
    assert (np.abs(latents) < 1.5).all()


def test_amortized_vi_drops_simulations_that_overflow():
    """Simulated measurements beyond the operator's finite range (NaN beyond |x| = 1.5) are
    dropped with a warning giving their count; the rest train a finite model."""
    prior = gaussian_prior()
    op = FunctionOperator(lambda x: x + 0 * torch.log(1.5 - x.abs()), N)
    solver = _solver(prior, op, "amortized-vi", QUICK, sigma=0.1, random_state=0)
    with pytest.warns(RuntimeWarning, match=r"dropped \d+ of 200 simulated"):
        solver.fit(np.zeros((1, N)))
    mean, std = solver.predict(np.zeros((3, N)), return_std=True)
    assert np.isfinite(mean).all() and np.isfinite(std).all()


@pytest.mark.parametrize("method", ["langevin", "pl-mcmc", "smc"])
def test_chains_stay_where_the_posterior_is_finite(method):
    """With the operator NaN beyond |x| = 1.5 (as a flow that overflows), prior draws start
    some chains there and steps near the edge cross it. Such starts are redrawn and such steps
    rejected: every draw is finite and inside, and the observation well inside still gets its
    exact posterior mean."""
    prior = gaussian_prior()
    op = FunctionOperator(lambda x: x + 0 * torch.log(1.5 - x.abs()), N)
    assert (np.abs(prior.sample(200, random_state=0)) >= 1.5).any(axis=1).mean() > 0.05
    mu = prior.inverse_transform(np.zeros((1, N)))[0]
    Y = np.stack([mu, np.full(N, 1.4)])
    sigma = 0.2
    settings = {"langevin": dict(start="prior", burn_in=200, thin=2, n_chains=100),
                "pl-mcmc": dict(start="prior", step_size=0.1, burn_in=300, thin=4, n_chains=100),
                "smc": dict(n_particles=2000)}[method]
    draws = InverseSolver(prior, op, method=method, sigma=sigma, method_params=settings,
                          random_state=0).sample_posterior(Y, n_samples=2000)
    assert np.isfinite(draws).all() and (np.abs(draws) < 1.5).all()
    expected, std = exact_posterior(prior, np.eye(N), Y[:1], sigma)
    assert (np.abs(draws[0].mean(0) - expected[0]) / std).max() < 0.2


def test_smc_raises_where_no_prior_draw_has_a_finite_likelihood():
    prior = gaussian_prior()
    op = FunctionOperator(lambda x: x + torch.log(-x.abs()), N)
    solver = InverseSolver(prior, op, method="smc", method_params={"preconditioner": "identity"})
    with pytest.raises(FloatingPointError, match="no prior draw .* for 2 of 2 observations"):
        solver.sample_posterior(np.zeros((2, N)), 4)


@pytest.mark.parametrize("preconditioner", ["laplace", "identity"])
def test_langevin_default_step_follows_the_curvature(setup, preconditioner):
    """The likelihood's curvature grows as 1 / sigma^2. With the Laplace preconditioner the
    default step mixes every direction at sigma = 0.01 (posterior std within 10 %); without it
    the step shrinks with the curvature, so the chains stay finite and, after a longer burn-in,
    fit the measurements as the exact posterior does (the weakly determined directions then mix
    slowly: not tested)."""
    prior, op, A, Y = setup
    sigma = 0.01
    mean, std = exact_posterior(prior, A, Y, sigma)
    m, s = InverseSolver(prior, op, method="langevin", sigma=sigma, n_samples=4000,
                         method_params=dict(n_chains=200, preconditioner=preconditioner,
                                            burn_in=200 if preconditioner == "laplace" else 1000),
                         random_state=0).predict(Y, return_std=True)
    assert np.isfinite(m).all() and np.isfinite(s).all()
    np.testing.assert_allclose(m @ A.T, mean @ A.T, atol=5 * sigma)
    if preconditioner == "laplace":
        np.testing.assert_allclose(s, np.broadcast_to(std, s.shape), rtol=0.1)


@pytest.mark.parametrize("method", ["vi", "langevin"])
def test_inpainting_is_uncertain_in_the_missing_box(method):
    prior = gaussian_prior(16, seed=3)
    op = Inpainting((1, 4, 4), box=(1, 1, 3, 3))
    missing = np.zeros((4, 4), bool)
    missing[1:3, 1:3] = True
    missing = missing.ravel()
    X = prior.sample(3, random_state=0)
    Y = op.measure(X, noise_std=0.05, random_state=0)
    sigma = 0.05
    A = np.eye(16)[~missing]
    mean, std = exact_posterior(prior, A, Y, sigma)
    settings = {"vi": dict(n_iter=300),  # defaults otherwise: Laplace start, path gradients
                "langevin": dict(method_params=dict(burn_in=400, thin=2, n_chains=100))}
    m, s = _solver(prior, op, method, settings, sigma=sigma, n_samples=2000,
                   random_state=0).predict(Y, return_std=True)
    assert (s[:, missing].min(1) > 3 * s[:, ~missing].max(1)).all()
    np.testing.assert_allclose(s, np.broadcast_to(std, s.shape), rtol=0.2)
    assert (np.abs(m - mean) / std).max() < 0.25


@pytest.fixture(scope="module")
def digits():
    from flowsk.datasets import load_digit_images
    X, shape = load_digit_images()
    return X, shape


def test_digit_inpainting_with_a_trained_prior(digits):
    """On a prior with a bounded data range, the posterior mean fits the observed pixels and
    is uncertain in the box."""
    X, shape = digits
    prior = FlowPrior(data_range=(0, 1), n_steps=2, hidden_features=16, max_epochs=3,
                      device="cpu", random_state=0).fit(X[:300])
    op = Inpainting(shape, box=(2, 2, 6, 6))
    Y = op.measure(X[300:304], noise_std=0.01, random_state=0)
    observed = np.ones(shape[-2:], bool)
    observed[2:6, 2:6] = False
    observed = np.broadcast_to(observed, shape).ravel()
    m, s = InverseSolver(prior, op, method="vi", sigma=0.05, n_iter=60,
                         random_state=0).predict(Y, return_std=True)
    assert np.isfinite(m).all() and m.min() >= 0 and m.max() <= 1
    assert np.abs(m[:, observed] - Y).mean() < 0.1
    assert s[:, ~observed].mean() > 3 * s[:, observed].mean()


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_ambient_vi_starts_at_the_exact_posterior(setup, covariance):
    """For an affine prior and a linear operator the latent Laplace approximation pushed through
    the generator is the exact posterior: ``q``'s Gaussian part before any step (``diag``: the
    KL-closest diagonal, variances ``1 / diag(precision)``)."""
    prior, op, A, Y = setup
    sigma = 0.5
    mean, cov = exact_posterior(prior, A, Y, sigma, full=True)
    method = METHODS["ambient-vi"]()
    problem = InverseSolver(prior, op, method="ambient-vi", sigma=sigma)._problem(method)
    q = BatchedPreGenerator(len(Y), N, covariance=covariance, init_noise=problem.randn)
    method._init_q(problem, q.requires_grad_(False), torch.as_tensor(Y, dtype=torch.float32))
    np.testing.assert_allclose(q.mean.numpy(), mean, atol=1e-4)
    scale = q.log_diag.exp().double()
    if covariance == "full":
        L = q.lower.double() * q.mask + torch.diag_embed(scale)
        np.testing.assert_allclose((L @ L.transpose(1, 2)).numpy(), np.broadcast_to(
            cov, (len(Y), N, N)), atol=1e-5)
    else:
        np.testing.assert_allclose(scale.numpy() ** 2, np.broadcast_to(
            1 / np.diag(np.linalg.inv(cov)), (len(Y), N)), rtol=1e-4)


@pytest.mark.parametrize("init", ["laplace", "prior"])
def test_ambient_vi_objective_is_finite_on_a_bounded_prior(digits, init):
    """Gaussian draws in data space fall outside a bounded prior's range (log p = NaN there);
    ambient-vi's q lives after the prior's logit layer, so every draw has a finite loss."""
    X, shape = digits
    prior = FlowPrior(data_range=(0, 1), n_steps=2, hidden_features=16, max_epochs=3,
                      device="cpu", random_state=0).fit(X[:300])
    op = Inpainting(shape, box=(2, 2, 6, 6))
    Y = torch.as_tensor(op.measure(X[300:304], noise_std=0.01, random_state=0),
                        dtype=torch.float32)
    solver = InverseSolver(prior, op, method="ambient-vi", sigma=0.05, random_state=0,
                           init=init)
    method = METHODS["ambient-vi"]()
    problem = solver._problem(method)
    q = BatchedPreGenerator(len(Y), X.shape[1], init_noise=problem.randn)
    method._init_q(problem, q, Y)
    assert torch.isfinite(method._loss(problem, q, Y, 64)).all()


def test_latent_methods_work_with_an_injective_prior(digits):
    from flowsk import InjectiveFlowPrior
    X, shape = digits
    prior = InjectiveFlowPrior(latent_dim=16, n_steps=1, n_latent_steps=1, hidden_features=16,
                               data_range=(0, 1), max_epochs=1, device="cpu",
                               random_state=0).fit(X[:200])
    op = Inpainting(shape, box=(2, 2, 6, 6))
    Y = op.measure(X[300:303], noise_std=0.01, random_state=0)
    for method in ("vi", "langevin", "pl-mcmc"):
        S = _solver(prior, op, method, QUICK, random_state=0).sample_posterior(Y, 4)
        assert S.shape == (3, 4, X.shape[1]) and np.isfinite(S).all()
    with pytest.raises(ValueError, match="injective"):
        InverseSolver(prior, op, method="ambient-vi").predict(Y)


@pytest.mark.parametrize("method", POSTERIOR)
def test_sample_posterior_shapes_dtype_and_seeds(setup, method):
    prior, op, A, Y = setup

    def draws(seed):
        solver = _solver(prior, op, method, QUICK, random_state=seed)
        if METHODS[method].needs_fit:
            solver.fit(Y)
        return solver.sample_posterior(Y, n_samples=7)

    S = draws(0)
    assert S.shape == (len(Y), 7, N) and S.dtype == np.float64 and np.isfinite(S).all()
    np.testing.assert_array_equal(S, draws(0))
    assert not np.allclose(S, draws(1))
    # predict is the mean of n_samples draws
    solver = _solver(prior, op, method, QUICK, n_samples=5, random_state=0)
    if METHODS[method].needs_fit:
        solver.fit(Y)
    mean, std = solver.predict(Y, return_std=True)
    assert mean.shape == std.shape == (len(Y), N) and (std > 0).all()
    np.testing.assert_allclose(solver.predict(Y), mean)


def test_amortized_vi_needs_fit_and_accepts_pairs(setup):
    prior, op, A, Y = setup
    solver = _solver(prior, op, "amortized-vi", QUICK, random_state=0)
    with pytest.raises(Exception, match="fit"):
        solver.predict(Y)
    X = prior.sample(50, random_state=0)
    Yx = op.measure(X, noise_std=0.1, random_state=0)
    assert solver.fit(Yx, X).sample_posterior(Y, 3).shape == (len(Y), 3, N)


def test_grid_search_over_sigma(setup):
    prior, op, A, _ = setup
    X = prior.sample(8, random_state=0)
    Y = op.measure(X, noise_std=0.1, random_state=0)
    search = GridSearchCV(InverseSolver(prior, op, method="vi", n_iter=20, n_samples=8,
                                        random_state=0),
                          {"sigma": [0.1, 1.0]}, cv=2).fit(Y, X)
    scores = search.cv_results_["mean_test_score"]
    assert np.all(np.isfinite(scores))
    assert search.best_params_["sigma"] == [0.1, 1.0][int(np.argmax(scores))]


def test_point_methods_refuse_posterior_queries(setup):
    prior, op, A, Y = setup
    solver = InverseSolver(prior, op, method="glowip", n_iter=5)
    with pytest.raises(ValueError, match="point estimate"):
        solver.sample_posterior(Y, 4)
    with pytest.raises(ValueError, match="point estimate"):
        solver.predict(Y, return_std=True)


@pytest.mark.parametrize("method,params", [
    ("langevin", {"step_size": -1.0}), ("langevin", {"thin": 0}), ("pl-mcmc", {"burn_in": 1.5}),
    ("vi", {"mc_samples": 0}), ("vi", {"covariance": "banana"}), ("vi", {"step_size": 0.1}),
    ("mala", {"start": "banana"}), ("mala", {"start_iter": 0}),
    ("mala", {"start": "laplace", "preconditioner": "identity"})])
def test_bad_method_params(setup, method, params):
    prior, op, A, Y = setup
    with pytest.raises(ValueError):
        InverseSolver(prior, op, method=method, method_params=params).predict(Y)


def _logit_operator(n_observed):
    """``y = logit(x)`` of the first ``n_observed`` features (the bounded prior's own logit, so
    ``A(G(z))`` is affine in ``z``)."""
    logit = Logit((0, 1))
    return FunctionOperator(lambda x: logit(x)[0][:, :n_observed], 4, output_dim=n_observed)


@pytest.mark.parametrize("method", ["vi", "vi-from-prior", "langevin", "mala", "hmc",
                                    "pl-mcmc", "smc"])
def test_bounded_prior_matches_its_closed_form_posterior(method):
    """A prior with ``data_range`` measured through its logit: the logit ``u`` of the signal
    has a Gaussian posterior, and every feature's posterior CDF is that of ``u`` mapped by the
    logit (monotone). Each method's draws must put ``p`` of their mass below the exact ``p``
    quantile of each feature, for p in 0.1, 0.5, 0.9 (within 0.04). (``ambient-vi`` needs
    about 2000 iterations here and ``amortized-vi`` a long fit: too slow for this test.)"""
    prior = bounded_prior()
    op = _logit_operator(2)
    sigma = 0.3
    layers = prior.flow_.body.layers
    affine = Chain(*layers[1:])  # z -> u, the flow after its logit layer
    g = lambda z: affine.inverse(z.float()[None])[0][0].double()  # noqa: E731
    c = g(torch.zeros(4, dtype=torch.float64)).numpy()
    M = torch.autograd.functional.jacobian(g, torch.zeros(4, dtype=torch.float64)).numpy()
    P = np.eye(4)[:2]
    Y = op.measure(prior.sample(3, random_state=2), noise_std=sigma, random_state=0)
    prec = np.linalg.inv(M @ M.T)
    cov = np.linalg.inv(prec + P.T @ P / sigma ** 2)
    mean = (cov @ (prec @ c[:, None] + P.T @ Y.T / sigma ** 2)).T
    p = np.array([0.1, 0.5, 0.9])
    u = mean[:, None] + stats_norm_ppf(p)[None, :, None] * np.sqrt(np.diag(cov))
    a = layers[0].alpha
    quantiles = (1 / (1 + np.exp(-u)) - a) / (1 - 2 * a)  # (n_obs, 3, 4), x of each quantile
    inside = (quantiles > 0) & (quantiles < 1)
    assert inside.mean() > 0.8  # the rest lie beyond a bound, where the clipped draws pile up
    settings = {**ACCURATE, **{m: dict(method_params=dict(
        burn_in=1000, thin=5, n_chains=400, preconditioner="identity"))
        for m in ("langevin", "mala", "pl-mcmc")},
        "hmc": dict(method_params=dict(burn_in=300, thin=1, n_chains=400,
                                       preconditioner="identity"))}
    solver = _solver(prior, op, method, settings, sigma=sigma, random_state=0)
    if METHODS[solver.method].needs_fit:
        solver.fit(Y)
    draws = solver.sample_posterior(Y, n_samples=4000)
    assert draws.min() >= 0 and draws.max() <= 1
    below = (draws[:, None] <= quantiles[:, :, None]).mean(2)  # (n_obs, 3, 4)
    np.testing.assert_allclose(below[inside], np.broadcast_to(p[:, None], below.shape)[inside],
                               atol=0.04)


def stats_norm_ppf(p):
    from scipy import stats
    return stats.norm.ppf(p)


def test_pre_generator_log_q_is_its_inverse_and_its_jacobian():
    """With every weight perturbed (couplings far from the identity), the ``log q`` of the
    forward pass equals ``log_prob`` of its own draws and ``log N(eps) - log|det dz/deps|``
    of the brute-force Jacobian (float64)."""
    gen = torch.Generator().manual_seed(0)
    q = BatchedPreGenerator(2, 4, n_layers=3, hidden_features=8,
                            init_noise=lambda *s: torch.randn(*s, generator=gen)).double()
    with torch.no_grad():
        for param in q.parameters():
            param.add_(0.5 * torch.randn(param.shape, generator=gen, dtype=torch.float64))
    eps = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    z, log_q = (t.detach() for t in q(eps))
    np.testing.assert_allclose(q.log_prob(z).numpy(), log_q.numpy(), atol=1e-10)
    assert (log_q.std(1) > 0.1).all()  # the draws' log q differ: the couplings are not trivial
    for i in range(2):
        for j in range(3):
            def f(e, i=i, j=j):
                full = eps.clone()
                full[i, j] = e
                return q(full)[0][i, j]
            J = torch.autograd.functional.jacobian(f, eps[i, j])
            brute = (-0.5 * (eps[i, j] ** 2).sum() - 2 * math.log(2 * math.pi)
                     - torch.linalg.slogdet(J)[1])
            assert float(log_q[i, j]) == pytest.approx(float(brute), abs=1e-10)


def test_vi_optimisation_improves_on_its_laplace_start():
    """A bounded prior's posterior is not Gaussian: the Laplace start is not its answer, and
    the optimisation lowers the negative ELBO (20 000 draws) of every observation."""
    prior = bounded_prior(3)
    op = CompressedSensing(3, 2, random_state=0)
    sigma = 0.05
    Y = torch.as_tensor(op.measure(prior.sample(4, random_state=1), noise_std=sigma,
                                   random_state=0), dtype=torch.float32)
    method = METHODS["vi"]()
    problem = InverseSolver(prior, op, method="vi", sigma=sigma, n_iter=300,
                            random_state=0)._problem(method)
    start = BatchedPreGenerator(len(Y), 3, init_noise=problem.randn)
    method._init_q(problem, start, Y)
    fitted = method.fit_q(problem, Y)
    with torch.no_grad():
        before = method._loss(problem, start, Y, 20000)
        after = method._loss(problem, fitted, Y, 20000)
    assert (after < before - 0.5).all()


def test_amortized_vi_fit_leaves_the_global_torch_generator_alone(setup):
    prior, op, A, Y = setup
    torch.manual_seed(123)
    state = torch.get_rng_state()
    _solver(prior, op, "amortized-vi", QUICK, random_state=0).fit(Y)
    assert torch.equal(torch.get_rng_state(), state)


def test_laplace_reaches_a_stationary_point_where_plain_gauss_newton_stalls():
    """On a bounded (nonlinear) prior with strong measurements, a full Gauss-Newton step from
    ``z = 0`` often raises the objective; undamped, the same step is proposed again at every
    iteration and the search stalls (gradient norms above 100 after 20 steps). With damping
    every observation ends at a stationary point of ``-log p(z | y)``."""
    from flowsk.methods.laplace import laplace, map_objective

    prior = bounded_prior(8, seed=0, spread=1.5)
    op = CompressedSensing(8, 3, random_state=0)
    Y = op.measure(prior.sample(20, random_state=0), noise_std=0.01, random_state=0)
    problem = InverseSolver(prior, op, method="mala", sigma=0.01)._problem(METHODS["mala"]())
    y = torch.as_tensor(Y, dtype=torch.float32)

    def gradient_norm(z):
        z = z.detach().requires_grad_(True)
        grad, = torch.autograd.grad(map_objective(problem, z, y).sum(), z)
        return grad.norm(dim=1)

    z_map, H = laplace(problem, y, 20)
    start = gradient_norm(torch.zeros_like(z_map))
    assert (gradient_norm(z_map) < 1e-3 * start).all()
    assert torch.isfinite(H).all()


def test_laplace_hessian_stays_positive_definite_at_small_noise():
    """``H = I + J^T J / sigma^2`` is formed in float64: in float32 its rounding outweighs the
    ``I`` at small noise (on this problem every observation's ``H`` was indefinite at
    sigma 1e-4, and the MCMC methods failed in their Cholesky factorisation)."""
    from flowsk.methods.laplace import laplace

    prior = bounded_prior(16, seed=0, spread=1.5)
    op = CompressedSensing(16, 4, random_state=0)
    Y = op.measure(prior.sample(10, random_state=0), noise_std=1e-4, random_state=0)
    solver = InverseSolver(prior, op, method="langevin", sigma=1e-4, n_samples=4,
                           method_params={"burn_in": 5, "thin": 1}, random_state=0)
    y = torch.as_tensor(Y, dtype=torch.float32)
    _, H = laplace(solver._problem(METHODS["langevin"]()), y, 0)
    assert H.dtype == torch.float64
    assert (torch.linalg.cholesky_ex(H).info == 0).all()
    assert np.isfinite(solver.sample_posterior(Y)).all()


def test_residual_jacobian_matches_autograd():
    """The Laplace Jacobian rows equal each observation's Jacobian from
    ``torch.autograd.functional.jacobian`` on a nonlinear (logit) flow."""
    from flowsk.methods.laplace import residual_jacobian

    prior = bounded_prior(6, seed=1, spread=2.0)
    op = CompressedSensing(6, 5, random_state=0)
    Y = torch.as_tensor(op.measure(prior.sample(3, random_state=0), noise_std=0.1,
                                   random_state=0), dtype=torch.float32)
    problem = InverseSolver(prior, op, method="langevin", sigma=0.1)._problem(
        METHODS["langevin"]())
    z = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    r, J = residual_jacobian(problem, z, Y)
    flow = prior.flow_
    for i in range(3):
        def residual(zi, yi=Y[i]):
            return op(flow.inverse(zi[None])[0])[0] - yi
        torch.testing.assert_close(r[i], residual(z[i]))
        torch.testing.assert_close(J[i], torch.autograd.functional.jacobian(residual, z[i]),
                                   rtol=1e-5, atol=1e-6)

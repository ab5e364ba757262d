"""The exact samplers (``mala``, ``hmc``, ``pl-mcmc``, ``smc``), ``langevin``'s step and ``vi``'s
importance resampling: against brute-force references on a bounded prior whose posterior is
not Gaussian, and simulation-based calibration."""
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_posterior import bounded_prior, exact_posterior, gaussian_prior

from flowsk import InverseSolver
from flowsk.diagnostics import rank_coverage, rank_uniformity, sbc_ranks
from flowsk.methods.base import Problem
from flowsk.methods.mcmc import _DualAveraging, _Target
from flowsk.methods.smc import effective_sample_size, next_beta, systematic_resample
from flowsk.operators import CompressedSensing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import calibration as bench  # noqa: E402
from inverse import gmm_mmse  # noqa: E402

SIGMA = 0.1


def importance_moments(prior, op, Y, sigma, n=1_000_000, seed=0):
    """Posterior mean and std ``(n_obs, D)`` of the decoded (clipped) signal by importance
    sampling from the prior: brute force, fine in 3-D."""
    flow = prior.flow_
    z = torch.randn(n, flow.latent_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        x = flow.inverse(z)[0]
        AX, X = op(x).double().numpy(), flow.clip(x).double().numpy()
    means, stds = [], []
    for y in Y:
        log_w = -((AX - y) ** 2).sum(1) / (2 * sigma ** 2)
        w = np.exp(log_w - log_w.max())
        w /= w.sum()
        assert 1 / (w ** 2).sum() > 5000  # enough effective draws for the reference
        m = w @ X
        means.append(m)
        stds.append(np.sqrt(w @ (X - m) ** 2))
    return np.array(means), np.array(stds)


@pytest.fixture(scope="module")
def bounded():
    prior = bounded_prior(3, seed=1, spread=2.0)
    op = CompressedSensing(3, 2, random_state=0)
    Y = op.measure(prior.sample(3, random_state=4), noise_std=SIGMA, random_state=0)
    return prior, op, Y, *importance_moments(prior, op, Y, SIGMA)


@pytest.mark.parametrize("method,params,mean_tol,std_tol", [
    ("mala", {}, 0.1, 0.1),
    ("mala", {"preconditioner": "identity", "burn_in": 1000, "thin": 20}, 0.1, 0.1),
    ("hmc", {}, 0.1, 0.1), ("pl-mcmc", {}, 0.1, 0.1),
    # unadjusted and biased: a longer burn-in, so that its error is the bias, not the start
    ("langevin", {"burn_in": 500}, 0.15, 0.15)])
def test_mcmc_matches_a_non_gaussian_posterior(bounded, method, params, mean_tol, std_tol):
    """Bounded prior, linear operator on the signal: the Laplace approximation is not the
    posterior, so the chains have to sample it (reference: importance sampling)."""
    prior, op, Y, mean, std = bounded
    draws = InverseSolver(prior, op, method=method, sigma=SIGMA, random_state=0,
                          method_params={"n_chains": 200, **params}).sample_posterior(Y, 4000)
    assert (np.abs(draws.mean(1) - mean) / std).max() < mean_tol
    np.testing.assert_allclose(draws.std(1), std, rtol=std_tol)


@pytest.mark.parametrize("params", [{}, {"preconditioner": "identity"}, {"kernel": "mala"},
                                    {"kernel": "mala", "n_moves": 1}])
def test_smc_matches_a_non_gaussian_posterior(bounded, params):
    """The same posteriors, from 4000 particles tempered from the prior (with one short move
    per stage the reweighting and resampling, not the moves, carry them there)."""
    prior, op, Y, mean, std = bounded
    draws = InverseSolver(prior, op, method="smc", sigma=SIGMA, random_state=0,
                          method_params={"n_particles": 4000, **params}
                          ).sample_posterior(Y, 4000)
    assert np.isfinite(draws).all()
    assert (np.abs(draws.mean(1) - mean) / std).max() < 0.1
    np.testing.assert_allclose(draws.std(1), std, rtol=0.1)


def test_next_beta_keeps_the_effective_sample_size_at_its_fraction():
    """Log-likelihoods ``-k``, ``k = 0..N-1``: the chosen step's weights have an effective
    sample size of half the particles (brute force over a fine grid of steps); an
    observation whose weights stay even up to ``beta = 1`` goes there in one stage."""
    log_lik = torch.stack([-torch.arange(100.0), torch.zeros(100)])
    beta = next_beta(torch.tensor([0.2, 0.3]), log_lik, 0.5)
    assert beta[1] == 1.0
    grid = torch.linspace(0, 0.8, 80001)
    ess = torch.stack([effective_sample_size(g * log_lik[:1])[0] for g in grid])
    assert beta[0].item() - 0.2 == pytest.approx(grid[ess >= 50].max().item(), abs=2e-5)
    assert effective_sample_size((beta[0] - 0.2) * log_lik[:1]).item() == pytest.approx(50,
                                                                                     rel=1e-3)


def test_smc_stops_with_an_error_where_the_tempering_does_not_finish(setup_gaussian,
                                                                     monkeypatch):
    """At ``sigma = 0.01`` one stage cannot reach ``beta = 1`` with half the particles kept."""
    import flowsk.methods.smc as smc
    prior, op, Y = setup_gaussian
    monkeypatch.setattr(smc, "MAX_STAGES", 1)
    solver = InverseSolver(prior, op, method="smc", sigma=0.01, random_state=0)
    with pytest.raises(RuntimeError, match="after 1 stages"):
        solver.sample_posterior(Y, 4)
    monkeypatch.setattr(smc, "MAX_STAGES", 1000)
    assert np.isfinite(solver.sample_posterior(Y, 4)).all()


def test_systematic_resampling_gives_each_particle_floor_or_ceil_of_its_share():
    """Each particle is drawn ``floor(N w)`` or ``ceil(N w)`` times, ``N`` in all."""
    w = torch.distributions.Dirichlet(torch.ones(50)).sample((20,))
    idx = systematic_resample(torch.log(w), torch.Generator().manual_seed(0))
    counts = torch.stack([torch.bincount(row, minlength=50) for row in idx]).double()
    share = 50 * w.double()
    assert ((counts >= share.floor() - 1e-9) & (counts <= share.ceil() + 1e-9)).all()
    assert (counts.sum(1) == 50).all()


def test_importance_resampling_corrects_vi(bounded):
    """vi's mode-seeking q under-disperses on this posterior; resampling its draws with
    importance weights moves the moments to the reference (the weights' tails are heavy here,
    Pareto k near 1, and say so)."""
    prior, op, Y, mean, std = bounded
    errors = {}
    for k in (0, 4000):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "vi: importance weights", RuntimeWarning)
            draws = InverseSolver(prior, op, method="vi", sigma=SIGMA, n_iter=300,
                                  random_state=0, method_params={"importance_samples": k}
                                  ).sample_posterior(Y, 4000)
        errors[k] = ((np.abs(draws.mean(1) - mean) / std).max(),
                     np.abs(draws.std(1) / std - 1).max())
    assert errors[0][1] > 0.12  # q alone misses the posterior's spread
    assert errors[4000][0] < 0.1 and errors[4000][1] < 0.1


def test_importance_resampling_warns_when_q_is_far_off(setup_gaussian):
    """q = N(0, I) (one step from the prior) against a posterior of std ~0.01: one draw takes
    nearly all the weight."""
    prior, op, Y = setup_gaussian
    solver = InverseSolver(prior, op, method="vi", sigma=0.01, n_iter=1, init="prior",
                           method_params={"importance_samples": 500}, random_state=0)
    with pytest.warns(RuntimeWarning, match=r"unreliable .* for 4 of 4 observations"):
        draws = solver.sample_posterior(Y, 20)
    assert np.isfinite(draws).all()


@pytest.fixture
def setup_gaussian():
    prior = gaussian_prior()
    op = CompressedSensing(6, 4, random_state=0)
    Y = np.random.RandomState(1).uniform(-1, 1, size=(4, 4))
    return prior, op, Y


def test_the_metropolis_correction_removes_the_langevin_bias(setup_gaussian):
    """At a large fixed step (1 in whitened coordinates) unadjusted Langevin inflates a
    Gaussian's variance by 1 / (1 - 1/2) = 2; mala's accept/reject step removes that."""
    prior, op, Y = setup_gaussian
    A = op.matrix.numpy().astype(np.float64)
    _, std = exact_posterior(prior, A, Y, 0.5)
    params = {"step_size": 1.0, "target_accept": None, "n_chains": 200, "burn_in": 100}
    stds = {m: InverseSolver(prior, op, method=m, sigma=0.5, method_params=params,
                             n_samples=4000, random_state=0).predict(Y, return_std=True)[1]
            for m in ("langevin", "mala")}
    np.testing.assert_allclose(stds["mala"], np.broadcast_to(std, stds["mala"].shape),
                               rtol=0.08)
    assert (stds["langevin"] / std > 1.25).all()


def test_dual_averaging_finds_the_step_of_the_target_rate():
    """With acceptance exp(-step), the rate 0.574 is reached at step -log(0.574)."""
    adapt = _DualAveraging(torch.tensor([0.01, 5.0]), 0.574)
    step = torch.tensor([0.01, 5.0])
    for _ in range(500):
        step = adapt.update(torch.exp(-step))
    np.testing.assert_allclose(adapt.final().numpy(), -np.log(0.574), rtol=0.05)


def test_mala_accepts_at_its_target_rate(setup_gaussian):
    """After burn-in every chain moves on about 57 % of its steps (thin 1: a kept draw that
    differs from the previous one was accepted)."""
    prior, op, Y = setup_gaussian
    draws = InverseSolver(prior, op, method="mala", sigma=0.5, random_state=0, method_params={
        "thin": 1, "n_chains": 50, "burn_in": 300}).sample_posterior(Y, 50 * 40)
    chains = draws.reshape(len(Y), 50, 40, -1)
    moved = (np.abs(np.diff(chains, axis=2)).max(-1) > 1e-5).mean()  # float32 round-off
    assert moved == pytest.approx(0.574, abs=0.06)


def test_curvature_is_the_top_eigenvalue_of_the_gauss_newton_hessian():
    """Power iteration with double-backward Jacobian products against the eigenvalues of the
    brute-force Hessian ``I + J^T J / sigma^2`` (autograd Jacobian) of a nonlinear flow."""
    prior = bounded_prior(3, seed=2, spread=2.0)
    op = CompressedSensing(3, 2, random_state=0)
    sigma = 0.2
    problem = Problem(flow=prior.flow_, operator=op, params={"sigma": sigma},
                      generator=torch.Generator().manual_seed(0))
    y = torch.zeros(4, 2)
    target = _Target(problem, y, 1)
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    top = target.curvature(w).numpy()
    for i in range(4):
        J = torch.autograd.functional.jacobian(lambda v: op(prior.flow_.inverse(v[None])[0])[0],
                                               w[i]).double().numpy()
        H = np.eye(3) + J.T @ J / sigma ** 2
        assert top[i] == pytest.approx(np.linalg.eigvalsh(H)[-1], rel=1e-3)
    assert top.max() > 1.3 * top.min()  # the curvature differs from start to start


@pytest.mark.slow
def test_sbc_of_mala_on_a_bounded_prior(bounded):
    """600 simulations from the bounded prior itself: ranks uniform, 90 % intervals hold 90 %
    (one draw per chain, so the draws are independent; with 1,800 ranks the coverage's
    standard error is about 0.007, so the tolerance is 3.5 of them)."""
    prior, op, *_ = bounded
    solver = InverseSolver(prior, op, method="mala", sigma=SIGMA, random_state=0,
                           method_params={"n_chains": 99, "thin": 1, "burn_in": 300})
    R = sbc_ranks(solver, 600, 99, random_state=0)
    assert rank_uniformity(R, 99) > 0.01
    assert rank_coverage(R, 99, (0.9,))[0] == pytest.approx(0.9, abs=0.025)


@pytest.mark.slow
def test_sbc_of_smc_on_a_bounded_prior(bounded):
    """The same check for ``smc``: all 99 particles of each observation are its draws."""
    prior, op, *_ = bounded
    solver = InverseSolver(prior, op, method="smc", sigma=SIGMA, random_state=0,
                           method_params={"n_particles": 99})
    R = sbc_ranks(solver, 600, 99, random_state=0)
    assert rank_uniformity(R, 99) > 0.01
    assert rank_coverage(R, 99, (0.9,))[0] == pytest.approx(0.9, abs=0.025)


@pytest.mark.parametrize("params,n_samples,match", [
    ({"n_particles": 1}, 1, "n_particles"), ({"n_moves": 0}, 4, "n_moves"),
    ({"ess_fraction": 1.0}, 4, "ess_fraction"), ({"kernel": "nuts"}, 4, "kernel"),
    ({"n_leapfrog": 0}, 4, "n_leapfrog"), ({"preconditioner": "banana"}, 4, "preconditioner"),
    ({"n_particles": 8}, 9, "at most n_particles")])
def test_bad_smc_params(setup_gaussian, params, n_samples, match):
    prior, op, Y = setup_gaussian
    with pytest.raises(ValueError, match=match):
        InverseSolver(prior, op, method="smc", method_params=params).sample_posterior(
            Y, n_samples)


@pytest.mark.parametrize("method,params", [
    ("mala", {"target_accept": 1.5}), ("hmc", {"n_leapfrog": 0}),
    ("mala", {"preconditioner": "banana"}), ("langevin", {"laplace_steps": -1}),
    ("vi", {"importance_samples": -1})])
def test_bad_sampler_params(setup_gaussian, method, params):
    prior, op, Y = setup_gaussian
    with pytest.raises(ValueError):
        InverseSolver(prior, op, method=method, n_iter=2 if method == "vi" else None,
                      method_params=params).predict(Y)


# -- the benchmark's references ------------------------------------------------------------
def test_gmm_posterior_draws_have_the_exact_posterior_mean():
    from sklearn.mixture import GaussianMixture
    rng = np.random.RandomState(0)
    X = np.concatenate([rng.normal(-1, 0.5, (300, 4)), rng.normal(1, 0.3, (300, 4))])
    gmm = GaussianMixture(2, random_state=0).fit(X)
    A = rng.normal(size=(2, 4))
    Y = X[:5] @ A.T + 0.1 * rng.normal(size=(5, 2))
    draws = bench.gmm_posterior_draws(gmm, A, 0.1, Y, 100_000, rng)
    np.testing.assert_allclose(draws.mean(1), gmm_mmse(gmm, A, 0.1, Y), atol=0.015)


def test_importance_reference_matches_the_closed_form(setup_gaussian):
    prior, op, Y = setup_gaussian
    A = op.matrix.numpy().astype(np.float64)
    mean, std = exact_posterior(prior, A, Y, 0.5)
    m, s, ess = bench.importance_reference(prior.flow_, A, 0.5, Y, 400_000)
    assert ess.min() > 1000
    assert (np.abs(m - mean) / std).max() < 0.1
    np.testing.assert_allclose(s, np.broadcast_to(std, s.shape), rtol=0.05)

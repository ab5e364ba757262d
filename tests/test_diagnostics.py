"""Calibration diagnostics (``flowsk.diagnostics``) on cases with known answers: exact
Gaussian posterior draws, too narrow or biased ones, ties, and an exact sampler behind the
solver protocol."""
import numpy as np
import pytest
import torch
from scipy import stats
from test_posterior import gaussian_prior

from flowsk.diagnostics import (
    coverage,
    plot_ranks,
    rank_coverage,
    rank_uniformity,
    ranks,
    sbc_ranks,
)
from flowsk.operators import CompressedSensing

LEVELS = (0.5, 0.8, 0.9, 0.95)


def gaussian_case(n, k, d, scale=1.0, shift=0.0, seed=0):
    """Truths ``x ~ N(mu_i, s_i^2)`` and ``k`` draws of ``N(mu_i + shift s_i, (scale s_i)^2)``
    per signal: exact posterior draws at ``scale=1, shift=0``."""
    rng = np.random.RandomState(seed)
    mu, s = rng.normal(size=(n, d)), rng.uniform(0.1, 2, size=(n, d))
    X = mu + s * rng.normal(size=(n, d))
    S = mu[:, None] + s[:, None] * (shift + scale * rng.normal(size=(n, k, d)))
    return X, S


@pytest.mark.parametrize("k", [3, 9, 99])
def test_exact_draws_cover_at_their_level_for_any_number_of_draws(k):
    X, S = gaussian_case(4000, k, 5)
    np.testing.assert_allclose(coverage(X, S, LEVELS, random_state=0), LEVELS, atol=0.012)
    np.testing.assert_allclose(coverage(X, S, LEVELS, joint=True, random_state=0), LEVELS,
                               atol=0.025)


def test_quantile_intervals_of_few_draws_would_under_cover():
    """What the rank-cell definition avoids: ``np.quantile`` intervals of 9 exact draws hold
    about ``level (k - 1) / (k + 1)`` of the truths, as the module says."""
    X, S = gaussian_case(4000, 9, 5)
    lo, hi = np.quantile(S, [0.1, 0.9], axis=1)
    assert np.mean((X >= lo) & (X <= hi)) == pytest.approx(0.8 * 8 / 10, abs=0.02)


@pytest.mark.parametrize("scale", [0.6, 1.5])
def test_too_narrow_or_too_wide_draws_miss_the_level_as_theory_says(scale):
    """With draws of std ``scale`` times the posterior's, the central ``l`` interval holds
    ``P(|Z| <= z_l scale)`` of the truths (normal CDF, 999 draws)."""
    X, S = gaussian_case(2000, 999, 4, scale=scale)
    expected = 2 * stats.norm.cdf(stats.norm.ppf((1 + np.array(LEVELS)) / 2) * scale) - 1
    np.testing.assert_allclose(coverage(X, S, LEVELS, random_state=0), expected, atol=0.015)


def test_joint_coverage_sees_a_posterior_too_narrow_as_a_whole():
    X, S = gaussian_case(1000, 99, 16, scale=0.8)
    joint = coverage(X, S, (0.9,), joint=True, random_state=0)[0]
    marginal = coverage(X, S, (0.9,), random_state=0)[0]
    # each feature's interval holds 0.81 of the truths, the signals' distances far less
    assert marginal == pytest.approx(0.81, abs=0.02) and joint < 0.7


def test_ties_get_uniform_random_ranks():
    """A truth equal to t draws takes ranks below + 0 .. t with equal probability."""
    X = np.zeros((20000, 1))
    S = np.concatenate([np.full((20000, 3, 1), -1.0), np.zeros((20000, 4, 1)),
                        np.ones((20000, 2, 1))], 1)
    R = ranks(X, S, random_state=0)
    counts = np.bincount(R.ravel(), minlength=10)
    assert (counts[:3] == 0).all() and (counts[8:] == 0).all()
    assert stats.chisquare(counts[3:8]).pvalue > 0.01
    # every truth tied with every draw: ranks uniform on 0 .. k, so coverage hits the levels
    Xz, Sz = np.zeros((5000, 8)), np.zeros((5000, 9, 8))
    np.testing.assert_allclose(coverage(Xz, Sz, LEVELS, random_state=0), LEVELS, atol=0.01)


def test_rank_coverage_counts_the_part_of_each_rank_cell_inside():
    # 4 draws: cells of width 0.2; the central 0.5 interval [0.25, 0.75] holds 3/4 of cell 1,
    # all of cell 2 and 3/4 of cell 3
    np.testing.assert_allclose(rank_coverage(np.array([0, 1, 2, 3, 4]), 4, (0.5,)),
                               [(0.75 + 1 + 0.75) / 5])
    np.testing.assert_allclose(rank_coverage(np.array([2]), 4, (0.5,), lower=True), [0.5])


def test_uniformity_is_not_rejected_for_exact_ranks_and_is_for_bad_ones():
    X, S = gaussian_case(200, 99, 16)
    assert rank_uniformity(ranks(X, S, random_state=0), 99) > 0.01
    for scale, shift in ((0.7, 0.0), (1.0, 0.3)):
        X, S = gaussian_case(200, 99, 16, scale=scale, shift=shift)
        assert rank_uniformity(ranks(X, S, random_state=0), 99) < 1e-4


class ExactGaussianSolver:
    """The solver protocol with exact posterior draws of an affine prior and a linear operator
    (``scale`` < 1 makes them too narrow)."""

    def __init__(self, prior, operator, sigma, scale=1.0, seed=0):
        self.prior, self.operator, self.sigma, self.scale = prior, operator, sigma, scale
        self.rng = np.random.RandomState(seed)
        flow = prior.flow_
        n = flow.n_features
        g = lambda z: flow.inverse(z.float()[None])[0][0].double()  # noqa: E731
        self.mu = g(torch.zeros(n, dtype=torch.float64)).numpy()
        L = torch.autograd.functional.jacobian(g, torch.zeros(n, dtype=torch.float64)).numpy()
        self.A = operator.matrix.numpy().astype(np.float64)
        prec = np.linalg.inv(L @ L.T)
        self.cov = np.linalg.inv(prec + self.A.T @ self.A / sigma ** 2)
        self.gain = self.cov @ self.A.T / sigma ** 2
        self.base = self.cov @ prec @ self.mu

    def sample_posterior(self, Y, n_samples):
        mean = self.base + Y @ self.gain.T
        chol = np.linalg.cholesky(self.cov)
        eps = self.rng.normal(size=(len(Y), n_samples, len(self.mu)))
        return mean[:, None] + self.scale * eps @ chol.T


@pytest.mark.parametrize("scale,calibrated", [(1.0, True), (0.7, False)])
def test_sbc_of_an_exact_and_of_a_too_narrow_sampler(scale, calibrated):
    prior = gaussian_prior()
    op = CompressedSensing(6, 4, random_state=0)
    solver = ExactGaussianSolver(prior, op, sigma=0.3, scale=scale)
    R = sbc_ranks(solver, 300, 99, random_state=0)
    assert R.shape == (300, 6) and R.min() >= 0 and R.max() <= 99
    p, cov90 = rank_uniformity(R, 99), rank_coverage(R, 99, (0.9,))[0]
    if calibrated:
        assert p > 0.01 and abs(cov90 - 0.9) < 0.03
    else:
        assert p < 1e-3 and cov90 < 0.8


class PriorSolver(ExactGaussianSolver):
    """Draws of the prior itself, whatever the measurements."""

    def sample_posterior(self, Y, n_samples):
        with torch.no_grad():
            z = torch.as_tensor(self.rng.normal(size=(len(Y) * n_samples, len(self.mu))))
            return self.prior.flow_.inverse(z.float())[0].double().numpy().reshape(
                len(Y), n_samples, -1)


def test_sbc_misfit_rank_tells_prior_draws_from_posterior_draws():
    """Prior draws pass the per-feature SBC (the truth is a prior draw too) and fail the
    misfit column; exact posterior draws pass both."""
    prior = gaussian_prior()
    op = CompressedSensing(6, 4, random_state=0)
    for solver, calibrated in ((ExactGaussianSolver(prior, op, sigma=0.3), True),
                               (PriorSolver(prior, op, sigma=0.3), False)):
        R = sbc_ranks(solver, 300, 99, misfit=True, random_state=0)
        assert R.shape == (300, 7) and R.min() >= 0 and R.max() <= 99
        assert rank_uniformity(R[:, :-1], 99) > 0.01
        if calibrated:
            assert rank_uniformity(R[:, -1:], 99) > 0.01
        else:  # the truth fits its measurement better than the prior's draws do
            assert rank_uniformity(R[:, -1:], 99) < 1e-6 and R[:, -1].mean() < 20


def test_sbc_simulates_with_the_solvers_sigma():
    """With the sampler's posterior for sigma 0.3 but measurements simulated at 1.0 the ranks
    are not uniform: noise_std is what the check is about."""
    prior = gaussian_prior()
    op = CompressedSensing(6, 4, random_state=0)
    solver = ExactGaussianSolver(prior, op, sigma=0.3)
    assert rank_uniformity(sbc_ranks(solver, 300, 99, noise_std=1.0, random_state=0), 99) < 1e-3
    solver.sigma = None
    with pytest.raises(ValueError, match="noise_std"):
        sbc_ranks(solver, 10, 9)


def test_plot_ranks_draws_the_histogram_of_the_ranks():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    X, S = gaussian_case(200, 99, 3)
    R = ranks(X, S, random_state=0)
    fig = plot_ranks(R, 99, title="exact")
    bars = [p.get_height() for p in fig.axes[0].patches]
    assert len(bars) == 20
    np.testing.assert_allclose(bars, np.bincount(R.ravel() // 5, minlength=20) / 3)
    assert len(fig.axes[1].lines) == 3 + 2  # one ECDF difference per feature, pooled, zero
    plt.close(fig)


def test_bad_input():
    X, S = gaussian_case(10, 5, 3)
    with pytest.raises(ValueError, match="matching"):
        coverage(X[:, :2], S)
    with pytest.raises(ValueError, match="finite"):
        coverage(np.where(X > 0, np.nan, X), S)
    with pytest.raises(ValueError, match="levels"):
        coverage(X, S, levels=(0.5, 1.0))
    with pytest.raises(ValueError, match="ranks"):
        rank_coverage(np.array([0, 6]), 5)
    with pytest.raises(ValueError, match="too few"):
        rank_uniformity(np.zeros((5, 2), int), 99)

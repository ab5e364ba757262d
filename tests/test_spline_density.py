"""A spline-coupling FlowPrior learns a non-Gaussian 2-D density: scikit-learn's two moons,
against the exact density of the data and a fitted Gaussian, on held-out points."""
import numpy as np
import pytest
from scipy.special import logsumexp
from sklearn.datasets import make_moons
from sklearn.mixture import GaussianMixture

from flowsk import FlowPrior

NOISE = 0.05


def moons_log_density(X, noise=NOISE, n_grid=1000):
    """Exact log-density of ``make_moons(noise=noise)`` at ``X (n, 2)``: each moon is an arc
    (outer ``(cos t, sin t)``, inner ``(1 - cos t, 0.5 - sin t)``, ``t`` uniform on
    ``[0, pi]``) with probability 1/2, blurred by ``N(0, noise^2 I)``; the integral over ``t``
    on ``n_grid`` points per arc (spacing far below ``noise``)."""
    t = np.linspace(0, np.pi, n_grid)
    arcs = np.concatenate([np.stack([np.cos(t), np.sin(t)], 1),
                           np.stack([1 - np.cos(t), 0.5 - np.sin(t)], 1)])
    d2 = ((X[:, None, :] - arcs[None]) ** 2).sum(-1)
    return (logsumexp(-d2 / (2 * noise**2), axis=1) - np.log(len(arcs))
            - np.log(2 * np.pi * noise**2))


def test_reference_density_is_normalised_and_fits_the_data():
    step = 0.04  # a Riemann sum with spacing below the noise: exact to far below 1e-3
    grid = np.stack(np.meshgrid(np.arange(-1.5, 2.5, step), np.arange(-1.0, 1.5, step)),
                    -1).reshape(-1, 2)
    mass = np.exp(moons_log_density(grid, n_grid=500)).sum() * step**2
    assert mass == pytest.approx(1.0, abs=1e-3)
    X, _ = make_moons(2000, noise=NOISE, random_state=1)
    many = GaussianMixture(20, random_state=0).fit(X[:1000]).score(X[1000:])
    assert many < moons_log_density(X[1000:]).mean() < many + 0.2  # the truth scores best


@pytest.mark.slow
def test_spline_flow_learns_two_moons():
    """Held-out mean log-likelihood (nats): the spline flow closes most of the gap between the
    best Gaussian and the exact density (81-92 % over seeds 0-3 measured; 75 % required) and
    ends within 0.4 nats of the exact density (0.13-0.30 measured). At 25 epochs the seeds
    spread across the threshold (73-83 %): the flow had not finished training."""
    X, _ = make_moons(2000, noise=NOISE, random_state=0)
    X_train, X_test = X[:1000], X[1000:]
    exact = moons_log_density(X_test).mean()
    gaussian = GaussianMixture(1).fit(X_train).score(X_test)
    flow = FlowPrior(coupling="spline", n_steps=2, hidden_features=32, max_epochs=60,
                     batch_size=100, learning_rate=1e-2, weight_decay=0.0, random_state=0,
                     device="cpu").fit(X_train)
    spline = flow.score(X_test)
    assert exact - gaussian > 1.0  # the moons are far from Gaussian
    assert spline > gaussian + 0.75 * (exact - gaussian)
    assert spline > exact - 0.4

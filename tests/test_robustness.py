"""Robustness: %Inf and OOD scores against hand-made references, and Hong et al.'s 2-D toy."""
import numpy as np
import pytest
import torch

from flowsk import FlowPrior, InverseSolver
from flowsk.datasets import MIXING, make_mixing_toy
from flowsk.methods import METHODS
from flowsk.methods.base import Method
from flowsk.methods.variational import amortized_context
from flowsk.metrics import inf_rate, ood_score
from flowsk.nn.base import Bijection, Chain, Flow
from flowsk.operators import MatrixOperator

SHIFT = (0.8, -0.8)


class Exploding(Bijection):
    """Identity, except that rows whose first entry exceeds 1 become inf (both directions)."""

    def _map(self, x):
        return torch.where(x[:, :1] > 1, torch.full_like(x, np.inf), x), x.new_zeros(len(x))

    def forward(self, x, context=None):
        return self._map(x)

    def inverse(self, z, context=None):
        return self._map(z)


def exploding_prior(n=3):
    prior = FlowPrior(device="cpu")
    prior.flow_, prior.n_features_in_ = Flow(Chain(Exploding()), n), n
    prior.device_ = torch.device("cpu")
    return prior


class BadDraw(Method):
    """Posterior draws ``y[:, :1]``; the last of them is inf where ``y_0 > 0``."""

    posterior = True

    def sample(self, problem, Y, n_samples):
        S = Y[:, None, :1].repeat(1, n_samples, problem.flow.n_features)
        last = torch.where(Y[:, :1] > 0, torch.full_like(Y[:, :1], np.inf), Y[:, :1])
        return torch.cat([S[:, :-1], last[:, None].expand(-1, 1, S.shape[2])], 1)


def mahalanobis(F_train, F):
    """Reference distance of the rows of ``F`` from the rows of ``F_train``, float64."""
    mu = F_train.mean(0)
    cov = np.cov(F_train, rowvar=False, bias=True)
    D = F - mu
    return np.sqrt(np.einsum("ij,jk,ik->i", D, np.linalg.inv(cov), D))


# -- the toy data --------------------------------------------------------------------------------
def test_make_mixing_toy():
    X, Y = make_mixing_toy(2000, random_state=0)
    assert X.shape == Y.shape == (2000, 2) and Y.dtype == np.float64
    assert X.min() >= -1 and X.max() <= 1 and X.min() < -0.99 and X.max() > 0.99
    residual = Y - X @ np.array([[0.7, 0.3], [0.3, 0.7]]).T
    assert abs(residual.std() - 0.01) < 0.001 and abs(residual.mean()) < 0.001
    Xs, Ys = make_mixing_toy(2000, shift=SHIFT, random_state=0)
    np.testing.assert_array_equal(Xs, X)
    np.testing.assert_allclose(Ys - Y, np.broadcast_to(SHIFT, Y.shape), atol=1e-12)
    for bad in (dict(n_samples=0), dict(shift=(1.0,)), dict(shift=(np.nan, 0)),
                dict(noise=-1.0), dict(noise="a")):
        with pytest.raises(ValueError):
            make_mixing_toy(**{"n_samples": 5, **bad})


# -- inf_rate ------------------------------------------------------------------------------------
def test_inf_rate_counts_prior_samples_and_round_trips():
    prior = exploding_prior()
    Z = 2.0 * np.random.RandomState(3).standard_normal((500, 3))
    assert inf_rate(prior, n_draws=500, temperature=2.0, random_state=3) == np.mean(Z[:, 0] > 1)
    X = np.random.RandomState(0).uniform(-2, 2, (200, 3))
    assert inf_rate(prior, X) == np.mean(X[:, 0] > 1)
    assert prior.on_nonfinite == "raise"  # restored
    with pytest.raises(FloatingPointError, match=r"\d+ of 500 samples"):
        prior.sample(500, temperature=2.0, random_state=3)


def test_inf_rate_counts_observations_with_any_bad_draw(monkeypatch):
    monkeypatch.setitem(METHODS, "bad-draw", BadDraw)
    Y = np.random.RandomState(0).standard_normal((40, 3))
    solver = InverseSolver(exploding_prior(), MatrixOperator(np.eye(3)), method="bad-draw")
    assert inf_rate(solver, Y, n_draws=4) == np.mean(Y[:, 0] > 0)
    with pytest.raises(FloatingPointError, match=f"{np.sum(Y[:, 0] > 0)} of 40 posterior"):
        solver.sample_posterior(Y, 4)
    with pytest.raises(ValueError, match="temperature"):
        inf_rate(solver, Y, temperature=2.0)


def test_nonfinite_outputs_raise_or_warn_with_count():
    prior = exploding_prior()
    X = np.array([[0.0, 0, 0], [2.0, 0, 0], [3.0, 1, 1]])
    for call in (prior.transform, prior.score_samples, prior.inverse_transform):
        with pytest.raises(FloatingPointError, match="2 of 3"):
            call(X)
    prior.on_nonfinite = "warn"
    with pytest.warns(RuntimeWarning, match="2 of 3 latent codes"):
        Z = prior.transform(X)
    assert np.isinf(Z[1:]).all() and np.isfinite(Z[0]).all()


# -- ood_score ----------------------------------------------------------------------------------
def test_ood_score_of_a_prior_matches_numpy_mahalanobis():
    X, _ = make_mixing_toy(300, random_state=0)
    prior = FlowPrior(n_steps=1, hidden_features=8, max_epochs=2, random_state=0,
                      device="cpu").fit(X)
    Xq = np.random.RandomState(1).uniform(-3, 3, (50, 2))
    expected = mahalanobis(prior.transform(X).astype(np.float64),
                           prior.transform(Xq).astype(np.float64))
    np.testing.assert_allclose(ood_score(prior, Xq), expected, rtol=1e-7)

    hand = exploding_prior(2)
    hand.latent_covariance_ = prior.latent_covariance_
    score = ood_score(hand, np.array([[0.0, 0.0], [2.0, 0.0]]))
    assert np.isfinite(score[0]) and score[1] == np.inf
    with pytest.raises(Exception, match="not fitted"):
        ood_score(FlowPrior(), Xq)
    with pytest.raises(TypeError, match="FlowPrior"):
        ood_score(object(), Xq)


# -- the 2-D toy of Hong et al. --------------------------------------------------------------
@pytest.fixture(scope="module")
def toy():
    """A robust-spline prior and amortized-vi solver fitted on the toy (a few seconds)."""
    X, Y = make_mixing_toy(1000, random_state=0)
    prior = FlowPrior(coupling="robust-spline", n_steps=3, hidden_features=32, max_epochs=10,
                      batch_size=128, random_state=0, device="cpu").fit(X)
    solver = InverseSolver(prior, MatrixOperator(MIXING), method="amortized-vi", sigma=0.01,
                           random_state=0, method_params=dict(
                               coupling="robust-spline", n_steps=3, hidden_features=32,
                               n_iter=15, batch_size=128)).fit(Y, X)
    return X, Y, prior, solver


def test_toy_robust_spline_ood_samples_are_finite_and_bounded(toy):
    solver = toy[3]
    X_in, Y_in = make_mixing_toy(200, random_state=1)
    _, Y_ood = make_mixing_toy(200, shift=SHIFT, random_state=1)
    assert inf_rate(solver, Y_in) == 0.0 and inf_rate(solver, Y_ood) == 0.0
    S_in, S_ood = solver.sample_posterior(Y_in, 10), solver.sample_posterior(Y_ood, 10)
    assert np.abs(S_ood).max() < 4.0
    # in distribution the draws sit near the truth: the posterior std is about 0.02
    assert np.mean((S_in.mean(1) - X_in) ** 2) < 0.05


def test_toy_ood_scores_grow_with_the_shift(toy):
    _, Y, prior, solver = toy
    X_in, Y_in = make_mixing_toy(200, random_state=1)
    _, Y_ood = make_mixing_toy(200, shift=SHIFT, random_state=1)
    features = amortized_context(solver.model_, torch.as_tensor(Y, dtype=torch.float32))
    reference = mahalanobis(features.numpy().astype(np.float64), amortized_context(
        solver.model_, torch.as_tensor(Y_ood, dtype=torch.float32)).numpy().astype(np.float64))
    np.testing.assert_allclose(ood_score(solver, Y_ood), reference, rtol=1e-6)
    assert np.median(ood_score(solver, Y_ood)) > 2 * np.median(ood_score(solver, Y_in))
    X_ood = X_in + 1.5 * np.sign(X_in)  # outside the training box [-1, 1]^2
    assert np.median(ood_score(prior, X_ood)) > 2 * np.median(ood_score(prior, X_in))
    with pytest.raises(ValueError, match="amortized-vi"):
        ood_score(InverseSolver(prior, MatrixOperator(MIXING), method="glowip"), Y_in)

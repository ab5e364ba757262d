"""Projected-gradient methods ``iflow`` / ``iflow-l`` and the injective prior's latent VI.

The math checks use an injective prior whose range is a linear subspace ``range(W)`` with a
Gaussian density on it, so the constrained least-squares and MAP solutions have closed forms
(NumPy, float64).
"""
import numpy as np
import pytest
import torch

from flowsk import FlowPrior, InjectiveFlowPrior, InverseSolver
from flowsk.methods import METHODS
from flowsk.methods.base import Problem
from flowsk.nn.base import Chain, Flow
from flowsk.nn.injective import InjectiveFlow, InjectiveLinear, build_injective_flow
from flowsk.nn.linear import ActNorm
from flowsk.operators import CompressedSensing, Inpainting, MatrixOperator

N, D = 8, 3
F64 = torch.float64


def linear_flow(seed=0):
    """``x = W (mu + diag(s) z)``: range ``range(W)``, a Gaussian density on it (float64)."""
    gen = torch.Generator().manual_seed(seed)
    layer = InjectiveLinear(D, N, regularization=0.0, generator=gen)
    act = ActNorm(D)
    with torch.no_grad():
        layer.weight.add_(0.3 * torch.randn(N, D, generator=gen))  # not orthonormal
        act.bias.copy_(torch.randn(D, generator=gen))
        act.log_scale.copy_(0.3 * torch.randn(D, generator=gen))
        act.initialized.fill_(True)
    flow = InjectiveFlow(Chain(layer), Chain(act), N, D)
    return flow.double().eval().requires_grad_(False)


def as_prior(flow, **params):
    """A fitted InjectiveFlowPrior around a hand-built flow."""
    prior = InjectiveFlowPrior(device="cpu", **params)
    prior.flow_, prior.n_features_in_, prior.latent_dim_ = flow, flow.n_features, flow.latent_dim
    prior.device_ = torch.device("cpu")
    return prior


def small_prior(data_range=(0, 1)):
    """A non-linear TRUMPET on 4x4 images with perturbed weights (float32)."""
    flow = build_injective_flow(16, 4, image_shape=(1, 4, 4), n_steps=1, n_latent_steps=2,
                                hidden_features=8, data_range=data_range, random_state=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return as_prior(flow.eval().requires_grad_(False), image_shape=(1, 4, 4),
                    data_range=data_range)


def run(method, flow, A, Y, **params):
    """Call a method directly in float64: ``Y (n, m) -> X (n, N)`` as NumPy."""
    m = METHODS[method]()
    problem = Problem(flow=flow, operator=MatrixOperator(A), params={**m.defaults, **params},
                      generator=torch.Generator().manual_seed(0))
    return m.predict(problem, torch.as_tensor(Y)).numpy()


@pytest.fixture(scope="module")
def linear():
    flow = linear_flow()
    rng = np.random.RandomState(0)
    A = rng.randn(5, N) / np.sqrt(5)
    Y = rng.randn(4, 5)  # not in the range of A W: the data fit cannot reach zero
    W = flow.injective.layers[0].weight.numpy()
    act = flow.bijective.layers[0]
    # h: z -> c = mu + diag(s) z, read off the ActNorm and checked against the flow
    mu, s = act.bias.numpy(), np.exp(-act.log_scale.numpy())
    z = np.random.RandomState(1).randn(2, D)
    np.testing.assert_allclose(flow.inverse(torch.as_tensor(z))[0].numpy(), (mu + s * z) @ W.T,
                               atol=1e-12)
    return flow, A, Y, W, mu, s


def test_iflow_converges_to_least_squares_on_the_range(linear):
    flow, A, Y, W, _, _ = linear
    X = run("iflow", flow, A, Y, n_iter=400)
    C = np.linalg.lstsq(A @ W, Y.T, rcond=None)[0]
    np.testing.assert_allclose(X, (W @ C).T, atol=1e-8)
    # and the pseudo-inverse start alone is not that solution
    assert np.abs(Y @ np.linalg.pinv(A).T - (W @ C).T).max() > 0.1


def test_iflow_l_converges_to_the_map_on_the_range(linear):
    flow, A, Y, W, mu, s = linear
    beta = 2.0
    X = run("iflow-l", flow, A, Y, beta=beta, n_iter=400)
    # min_c ||A W c - y||^2 + beta / 2 (c - mu)^T diag(s)^-2 (c - mu)
    prec = np.diag(s ** -2.0)
    H = 2 * W.T @ A.T @ A @ W + beta * prec
    C = np.linalg.solve(H, 2 * W.T @ A.T @ Y.T + beta * (prec @ mu)[:, None])
    np.testing.assert_allclose(X, (W @ C).T, atol=1e-8)


def test_iflow_l_with_zero_beta_is_iflow(linear):
    flow, A, Y, *_ = linear
    np.testing.assert_allclose(run("iflow-l", flow, A, Y, beta=0.0),
                               run("iflow", flow, A, Y), atol=1e-12)


def test_larger_beta_gives_higher_likelihood(linear):
    flow, A, Y, *_ = linear
    X = {b: run("iflow-l", flow, A, Y, beta=b, n_iter=300) for b in (0.0, 3.0, 100.0)}
    log_p = [flow.log_prob(torch.as_tensor(x)).numpy() for x in X.values()]
    fit = [np.linalg.norm(X[b] @ A.T - Y, axis=1) for b in (0.0, 100.0)]
    assert (np.diff(log_p, axis=0) > 0).all()
    assert (fit[1] > fit[0]).all()  # the price: a worse data fit


def test_solver_runs_batched_with_seeds_and_stays_on_the_range():
    prior = small_prior()
    rng = np.random.RandomState(0)
    X = prior.project(rng.uniform(0.2, 0.8, size=(5, 16)))
    op = Inpainting((1, 4, 4), box=(1, 1, 3, 3))
    Y = op.measure(X, noise_std=0.01, random_state=0)
    for method, params in (("iflow", {}), ("iflow-l", {"beta": 0.1})):
        solver = InverseSolver(prior, op, method=method, n_iter=20, random_state=0, **params)
        X_hat = solver.predict(Y)
        assert X_hat.shape == X.shape and X_hat.min() >= 0 and X_hat.max() <= 1
        np.testing.assert_allclose(prior.project(X_hat), X_hat, atol=1e-4)
        one_by_one = np.concatenate([solver.predict(Y[i:i + 1]) for i in (0, 3)])
        np.testing.assert_allclose(X_hat[[0, 3]], one_by_one, atol=1e-5)
        np.testing.assert_array_equal(X_hat, solver.predict(Y))
        # better than the clipped pseudo-inverse it starts from
        pinv = InverseSolver(prior, op, method="pinv").predict(Y)
        assert np.linalg.norm(X_hat - X) < np.linalg.norm(pinv - X)


def test_solver_reaches_float32_least_squares(linear):
    flow, *_ = linear
    prior = as_prior(flow.float())
    op = CompressedSensing(N, 5, random_state=0)
    A = op.matrix.numpy().astype(np.float64)
    Y = np.random.RandomState(2).randn(3, 5)
    W = flow.injective.layers[0].weight.double().numpy()
    X_hat = InverseSolver(prior, op, method="iflow", n_iter=1000, random_state=0).predict(Y)
    C = np.linalg.lstsq(A @ W, Y.T, rcond=None)[0]
    np.testing.assert_allclose(X_hat, (W @ C).T, atol=1e-4)


def test_errors():
    flow = Flow(Chain(ActNorm(N)), N).eval().requires_grad_(False)
    bijective = FlowPrior(device="cpu")
    bijective.flow_, bijective.n_features_in_ = flow, N
    bijective.device_ = torch.device("cpu")
    op = CompressedSensing(N, 5, random_state=0)
    Y = np.zeros((2, 5))
    for method in ("iflow", "iflow-l"):
        with pytest.raises(ValueError, match="InjectiveFlowPrior"):
            InverseSolver(bijective, op, method=method).predict(Y)
    prior = as_prior(linear_flow().float())
    with pytest.raises(ValueError, match="does not use beta"):
        InverseSolver(prior, op, method="iflow", beta=1.0).predict(Y)
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        InverseSolver(prior, op, method="iflow-l", learning_rate=0.0).predict(Y)


def test_vi_samples_lie_on_the_range_of_an_injective_prior():
    prior = small_prior(data_range=None)
    op = CompressedSensing(16, 6, random_state=0)
    Y = op.measure(prior.sample(3, random_state=0), noise_std=0.01, random_state=0)
    solver = InverseSolver(prior, op, method="vi", n_iter=5, random_state=0)
    S = solver.sample_posterior(Y, n_samples=4)
    assert S.shape == (3, 4, 16) and np.isfinite(S).all()
    flat = S.reshape(-1, 16)
    np.testing.assert_allclose(prior.project(flat), flat, atol=1e-4)
    assert S.std(1).min(1).max() > 1e-3  # the draws differ
    np.testing.assert_array_equal(S, solver.sample_posterior(Y, n_samples=4))

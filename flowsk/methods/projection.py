"""Projected gradient in data space with an injective prior: ``iflow``, ``iflow-l``.

Algorithm 1 of Kothari et al. (TRUMPET). Starting from ``x = A^+ y``, alternate a projection
onto the prior's range, ``v = P(x) = g(g^+(x))``, with a gradient step on a per-observation
loss at ``v``, and finish with a projection:

- ``iflow``: ``L(v) = ||A v - y||^2`` (projected Landweber iteration, Raj et al.);
- ``iflow-l``: ``L(v) = ||A v - y||^2 + beta * R(v)``, ``R(v)`` the bound (6) on
  ``-log p(v)`` (one pass of ``G^+``); ``beta`` plays the paper's ``2 sigma^2``.

The step size starts at ``learning_rate / ||A||^2`` (``||A||`` by power iteration), so the
default ``learning_rate = 0.5`` is the Landweber step that solves denoising in one iteration.
A step that raises an observation's loss (beyond rounding) is rejected and that
observation's step halved, so a large ``beta`` (a stiffer loss) cannot make the iteration
diverge. With a ``data_range`` every iterate is clipped to it before the projection. All
observations are updated together as one batch, each with its own step, so they stay
independent.

``P`` is idempotent but, off the range of a nonlinear ``g``, not the nearest-point projection:
the iteration stops where ``J_{g^+}(v) grad L(v) = 0``, which is a stationary point of ``L`` on
the range only when ``g^+`` is linear (e.g. a single injective layer). Latent-space methods
such as ``csgm`` can fit the data better with the same prior.
"""
import torch
from tqdm.auto import tqdm

from ..nn.injective import InjectiveFlow
from .base import Method


def operator_norm_squared(operator, n_features, randn, n_iter=30):
    """``||A||^2`` (the largest eigenvalue of ``A^T A``) of a linear operator, by power
    iteration from a random start; a 0-d tensor."""
    u = randn(1, n_features)
    for _ in range(n_iter):
        with torch.enable_grad():
            v = (u / u.norm().clamp_min(torch.finfo(u.dtype).tiny)).requires_grad_(True)
            u, = torch.autograd.grad(0.5 * (operator(v) ** 2).sum(), v)  # A^T A v
    return u.norm()


class IFlow(Method):
    """Projected gradient descent on ``||A x - y||^2`` over the range of an injective prior."""

    name = "iflow"
    defaults = {"n_iter": 100, "learning_rate": 0.5}

    def check_prior(self, prior):
        if not isinstance(prior.flow_, InjectiveFlow):
            raise ValueError(f"method {self.name!r} projects onto the range of an injective "
                             f"prior; fit an InjectiveFlowPrior instead of "
                             f"{type(prior).__name__}")

    def beta(self, problem):
        return 0.0

    def _clip(self, problem, x):
        return x.clamp(*problem.data_range) if problem.data_range is not None else x

    def _loss_and_grad(self, problem, v, Y):
        """Per-observation loss ``(n,)`` at ``v (n, N)`` and its gradient ``(n, N)``."""
        with torch.enable_grad():
            v = v.detach().requires_grad_(True)
            loss = ((problem.operator(v) - Y) ** 2).sum(1)
            beta = self.beta(problem)
            if beta:
                loss = loss - beta * problem.flow.log_prob(v)
            grad, = torch.autograd.grad(loss.sum(), v)
        return loss.detach(), grad

    def predict(self, problem, Y):
        flow, p = problem.flow, problem.params
        lam = operator_norm_squared(problem.operator, flow.n_features, problem.randn)
        step = (p["learning_rate"] / lam.clamp_min(torch.finfo(lam.dtype).tiny)).expand(
            len(Y), 1)
        with torch.no_grad():
            v = flow.project(self._clip(problem, problem.operator.pinv(Y)))
        loss, grad = self._loss_and_grad(problem, v, Y)
        rtol = torch.finfo(loss.dtype).eps ** 0.5
        for _ in tqdm(range(p["n_iter"]), desc=self.name, leave=False,
                      disable=problem.verbose <= 0):
            with torch.no_grad():
                candidate = flow.project(self._clip(problem, v - step * grad))
            c_loss, c_grad = self._loss_and_grad(problem, candidate, Y)
            # a rise within rounding (sqrt(eps) relative) is not a divergence; NaN is
            ok = (c_loss <= loss + rtol * loss.abs())[:, None]
            v, grad = torch.where(ok, candidate, v), torch.where(ok, c_grad, grad)
            loss = torch.where(ok[:, 0], c_loss, loss)
            step = torch.where(ok, step, 0.5 * step)
        return v


class IFlowL(IFlow):
    """``iflow`` with ``beta`` times the likelihood bound ``-log p(x)`` added to the loss."""

    name = "iflow-l"
    defaults = {**IFlow.defaults, "beta": 1e-3}

    def beta(self, problem):
        return problem.params["beta"]


METHODS = {"iflow": IFlow, "iflow-l": IFlowL}

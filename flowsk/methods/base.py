"""The interface every inverse-problem method implements.

A method sees a :class:`Problem` and works on a whole batch of observations at once:
point methods implement ``predict``, posterior methods implement ``sample`` (the solver derives
the mean and per-pixel std from the draws), and amortized methods also implement ``fit``.
"""
from dataclasses import dataclass

import torch


@dataclass
class Problem:
    """Everything a method needs, already on one device and in float32.

    ``flow``: the frozen prior (``inverse(z) -> (x, logdet)``, ``generate(z) -> (x, log p(x))``);
    ``operator``: ``forward(x) -> y``; ``params``: resolved hyperparameters;
    ``generator``: seeded torch generator on the device; ``model``: what ``fit`` returned.
    """

    flow: torch.nn.Module
    operator: torch.nn.Module
    params: dict
    generator: torch.Generator
    data_range: tuple = None
    model: object = None
    verbose: int = 0

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.generator,
                           device=self.generator.device)


def sum_squares(r):
    """Sum of squares over the last axis: ``(..., m) -> (...)``."""
    return (r * r).sum(-1)


class Method:
    """Base of all methods. ``defaults`` lists the hyperparameters a method reads."""

    posterior = False
    needs_fit = False
    defaults = {}

    def check_prior(self, prior):
        """Raise ``ValueError`` when ``prior`` cannot be used with this method."""

    def fit(self, problem, Y, X=None):
        """Train what the method needs from ``Y (n, m)`` [and ``X (n, n_features)``]."""
        return None

    def predict(self, problem, Y):
        """Point estimate ``(n, m) -> (n, n_features)``."""
        raise NotImplementedError

    def sample(self, problem, Y, n_samples):
        """Posterior draws ``(n, m) -> (n, n_samples, n_features)``."""
        raise NotImplementedError


def redraw_nonfinite(draw, evaluate, tries=10):
    """Random candidates whose value is finite, where ``tries`` redraws can find one.

    ``draw() -> c (B, ...)`` makes a batch of candidates, ``evaluate(c) -> v (B, ...)`` their
    values; rows of ``v`` with a non-finite entry are replaced by fresh candidates. Returns
    ``(c, v)``; rows still non-finite after ``tries`` redraws are left for the caller.
    """
    c = draw()
    v = evaluate(c)
    for _ in range(tries):
        bad = ~torch.isfinite(v.reshape(len(v), -1)).all(1)
        if not bad.any():
            break
        c_new = draw()
        v_new = evaluate(c_new)
        c = torch.where(bad.view(-1, *[1] * (c.dim() - 1)), c_new, c)
        v = torch.where(bad.view(-1, *[1] * (v.dim() - 1)), v_new, v)
    return c, v

"""The interface every inverse-problem method implements.

A method sees a :class:`Problem` and works on a whole batch of observations at once:
point methods implement ``predict``, posterior methods implement ``sample`` (the solver derives
the mean and per-pixel std from the draws), and amortized methods also implement ``fit``.
"""
from dataclasses import dataclass, field

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
    prior: object = None
    model: object = None
    verbose: int = 0
    extra: dict = field(default_factory=dict)

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.generator,
                           device=self.generator.device)


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

"""The bijection convention every layer follows.

``forward(x, context=None) -> (z, logdet)`` maps data to latent with ``logdet = log|det dz/dx|``;
``inverse(z, context=None) -> (x, logdet)`` maps latent to data with ``logdet = log|det dx/dz|``.
Log-dets are per sample, shape ``(B,)``. ``context`` is an optional ``(B, k)`` conditioning
vector that only conditional couplings read.
"""
import math

import torch
from torch import nn


def sum_per_sample(t):
    """Sum every dimension but the first: ``(B, ...) -> (B,)``."""
    return t.reshape(t.shape[0], -1).sum(1)


def soft_clamp(t, limit):
    """``limit * tanh(t / limit)``: the identity near 0, smoothly bounded to ``(-limit, limit)``."""
    return limit * torch.tanh(t / limit)


def standard_normal_log_prob(z):
    """Log-density of a standard normal, summed per sample: ``(B, d) -> (B,)``."""
    return -0.5 * (z * z).sum(1) - 0.5 * math.log(2 * math.pi) * z.shape[1]


class Bijection(nn.Module):
    """An invertible map with tractable log-determinants in both directions."""

    def forward(self, x, context=None):
        raise NotImplementedError

    def inverse(self, z, context=None):
        raise NotImplementedError


class Chain(Bijection):
    """Composition ``layers[-1] o ... o layers[0]`` in the data-to-latent direction."""

    def __init__(self, *layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x, context=None):
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x, context)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z, context=None):
        logdet = z.new_zeros(z.shape[0])
        for layer in reversed(self.layers):
            z, ld = layer.inverse(z, context)
            logdet = logdet + ld
        return z, logdet


class Flow(Bijection):
    """A bijection from flat data ``(B, n)`` to a flat standard-normal latent ``(B, n)``.

    The generator ``G`` of the inverse-problem papers is :meth:`inverse`; because it returns its
    own log-det, ``log p(G(z)) = log N(z) - logdet`` costs one pass (see :meth:`generate`).
    With a ``data_range`` (a logit layer at the data end), ``G`` maps onto a slightly wider open
    box (see :class:`~flowsk.nn.multiscale.Logit`) and :meth:`decode` clips its output to the
    range: densities and gradients use ``G``, signals handed to users ``decode``.
    """

    def __init__(self, body, n_features, data_range=None):
        super().__init__()
        self.body = body
        self.n_features = n_features
        self.latent_dim = n_features
        self.data_range = None if data_range is None else tuple(float(v) for v in data_range)

    def forward(self, x, context=None):
        return self.body(x, context)

    def inverse(self, z, context=None):
        return self.body.inverse(z, context)

    def log_prob(self, x, context=None):
        """``(B, n) -> (B,)`` natural log-density of ``x``."""
        z, logdet = self.body(x, context)
        return standard_normal_log_prob(z) + logdet

    def generate(self, z, context=None):
        """``(B, d) -> (x (B, n), log p(x) (B,))`` in one generator pass."""
        x, logdet = self.body.inverse(z, context)
        return x, standard_normal_log_prob(z) - logdet

    def clip(self, x):
        """``x`` clipped to ``data_range`` (unchanged without one)."""
        return x if self.data_range is None else x.clamp(*self.data_range)

    def decode(self, z, context=None):
        """The signals ``G(z)`` clipped to ``data_range``: ``(B, d) -> (B, n)``."""
        return self.clip(self.inverse(z, context)[0])

"""Masked autoregressive flows (Papamakarios et al., 2017; with splines, Durkan et al., 2019).

A :class:`MaskedAutoregressive` layer transforms each entry ``x_i`` of ``(B, D)`` element-wise
with parameters computed from ``x_1, ..., x_{i-1}`` by one masked network (:class:`MADE`). The
density direction (``forward``) is one network pass; the generator (``inverse``) needs ``D``
passes, one per entry, so these flows are for density estimation, not for the latent-space
solvers, which run the generator at every iteration.
"""
import torch
from torch import nn
from torch.nn import functional as F

from .base import Bijection


class MaskedLinear(nn.Linear):
    """``nn.Linear`` whose weight is multiplied by a fixed 0/1 ``mask`` ``(out, in)``."""

    def __init__(self, in_features, out_features, mask):
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Masked autoencoder (Germain et al., 2015): ``(B, D) -> (B, D, n_params)``, where the
    parameters of entry ``i`` depend only on entries ``j < i``. The last layer is
    zero-initialised, so a new layer is the identity."""

    def __init__(self, features, n_params, hidden_features=64, n_hidden=2):
        super().__init__()
        self.features, self.n_params = features, n_params
        degree_in = torch.arange(1, features + 1)
        # hidden degrees cycle through 1 .. D-1: every unit sees a non-empty prefix
        degree_hidden = torch.arange(hidden_features) % max(features - 1, 1) + 1
        layers, degree = [], degree_in
        for _ in range(n_hidden):
            mask = degree_hidden[:, None] >= degree[None, :]
            layers += [MaskedLinear(len(degree), hidden_features, mask), nn.SiLU()]
            degree = degree_hidden
        degree_out = degree_in.repeat_interleave(n_params)
        out = MaskedLinear(len(degree), features * n_params, degree_out[:, None] > degree[None])
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*layers, out)

    def forward(self, x):
        return self.net(x).reshape(x.shape[0], self.features, self.n_params)


class MaskedAutoregressive(Bijection):
    """``z_i = transform(x_i; MADE(x)_i)`` on ``(B, D)``, with any element-wise transform of
    :mod:`flowsk.nn.coupling` (``transform(x, params, inverse) -> (y, logabsdet)``).

    ``inverse`` solves for ``x`` entry by entry: ``D`` passes of ``x <- transform^{-1}(z;
    MADE(x))``, after the ``k``-th of which the first ``k`` entries are exact.
    """

    def __init__(self, features, transform, hidden_features=64, n_hidden=2):
        super().__init__()
        self.transform = transform
        self.made = MADE(features, transform.n_params, hidden_features, n_hidden)

    def forward(self, x, context=None):
        z, logdet = self.transform(x, self.made(x))
        return z, logdet.sum(1)

    def inverse(self, z, context=None):
        x = z
        for _ in range(z.shape[1]):
            x, logdet = self.transform(z, self.made(x), inverse=True)
        return x, logdet.sum(1)

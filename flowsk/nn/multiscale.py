"""Shape bijections: reshape, squeeze, multiscale split, and the logit map for bounded data."""
import math

import torch
from torch import nn
from torch.nn import functional as F

from .base import Bijection, sum_per_sample


class Reshape(Bijection):
    """Flat ``(B, prod(shape))`` to ``(B, *shape)`` and back."""

    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x, context=None):
        return x.reshape(x.shape[0], *self.shape), x.new_zeros(x.shape[0])

    def inverse(self, z, context=None):
        return z.reshape(z.shape[0], -1), z.new_zeros(z.shape[0])


class Squeeze(Bijection):
    """``(B, C, H, W) -> (B, 4C, H/2, W/2)``, each 2x2 block moved into channels."""

    def forward(self, x, context=None):
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return x.reshape(b, 4 * c, h // 2, w // 2), x.new_zeros(b)

    def inverse(self, z, context=None):
        b, c, h, w = z.shape
        z = z.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return z.reshape(b, c // 4, 2 * h, 2 * w), z.new_zeros(b)


class Multiscale(Bijection):
    """Glow's multiscale architecture on ``(B, C, H, W)``, flat latent ``(B, C*H*W)`` out.

    Level ``i`` squeezes, runs ``levels[i]`` and, except at the last level, factors half of the
    channels out to the latent. ``shapes[i]`` is the ``(C, H, W)`` each level's steps see.
    """

    def __init__(self, levels, shapes):
        super().__init__()
        self.levels = nn.ModuleList(levels)
        self.shapes = [tuple(s) for s in shapes]
        self.squeeze = Squeeze()

    def _n_out(self, i):
        c, h, w = self.shapes[i]
        return c * h * w if i == len(self.levels) - 1 else (c - c // 2) * h * w

    def forward(self, x, context=None):
        logdet, outs = x.new_zeros(x.shape[0]), []
        for i, level in enumerate(self.levels):
            x, _ = self.squeeze(x)
            x, ld = level(x, context)
            logdet = logdet + ld
            if i < len(self.levels) - 1:
                keep = x.shape[1] // 2
                outs.append(x[:, keep:].reshape(x.shape[0], -1))
                x = x[:, :keep]
        outs.append(x.reshape(x.shape[0], -1))
        return torch.cat(outs, 1), logdet

    def inverse(self, z, context=None):
        logdet = z.new_zeros(z.shape[0])
        pieces = torch.split(z, [self._n_out(i) for i in range(len(self.levels))], 1)
        x = None
        for i in reversed(range(len(self.levels))):
            c, h, w = self.shapes[i]
            if x is None:
                x = pieces[i].reshape(-1, c, h, w)
            else:
                x = torch.cat([x, pieces[i].reshape(-1, c - c // 2, h, w)], 1)
            x, ld = self.levels[i].inverse(x, context)
            logdet = logdet + ld
            x, _ = self.squeeze.inverse(x)
        return x, logdet


class Logit(Bijection):
    """Maps ``[lo, hi]`` to the real line: ``u = a + (1 - 2a)(x - lo)/(hi - lo)``, ``z = logit(u)``.

    ``a = alpha`` keeps the bounds themselves finite. The map is a bijection of the open box
    ``(lo - delta, hi + delta)``, ``delta = a (hi - lo) / (1 - 2a)``, onto the real line, and its
    inverse is that whole bijection (no clamp), so log-dets and gradients are those of a smooth
    map everywhere; :meth:`~flowsk.nn.base.Flow.decode` clips generated signals to
    ``[lo, hi]``.
    """

    def __init__(self, data_range, alpha=0.05):
        super().__init__()
        self.lo, self.hi = (float(v) for v in data_range)
        self.alpha = alpha
        self._log_c = math.log((1 - 2 * alpha) / (self.hi - self.lo))

    def forward(self, x, context=None):
        u = self.alpha + (1 - 2 * self.alpha) * (x - self.lo) / (self.hi - self.lo)
        log_u, log_1mu = torch.log(u), torch.log1p(-u)
        return log_u - log_1mu, sum_per_sample(self._log_c - log_u - log_1mu)

    def inverse(self, z, context=None):
        u = torch.sigmoid(z)
        x = self.lo + (self.hi - self.lo) * (u - self.alpha) / (1 - 2 * self.alpha)
        return x, sum_per_sample(self.inverse_log_slope(z))

    def inverse_log_slope(self, z):
        """``log dx_i/dz_i`` of the inverse, per coordinate (its Jacobian is diagonal)."""
        return F.logsigmoid(z) + F.logsigmoid(-z) - self._log_c

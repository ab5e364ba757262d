"""Coupling layers with a pluggable element-wise transform.

A coupling splits dimension 1 into ``(x_a, x_b)``, keeps ``x_a`` and transforms ``x_b``
element-wise with parameters computed from ``x_a`` (and an optional context) by a
conditioner network.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

from . import splines
from .base import Bijection, soft_clamp, sum_per_sample


class Affine(nn.Module):
    """Glow's ``z = (x + t) * sigmoid(s + 2)``, rescaled by ``1 / sigmoid(2)`` so that zero
    parameters are the identity, with the log-scale soft-clamped to ``(-clamp, clamp)`` (as
    FrEIA's ``affine_clamping``): the inverse expands by at most ``exp(clamp)``, so it cannot
    overflow however extreme the conditioner's output."""

    n_params = 2
    _offset = -math.log1p(math.exp(-2.0))  # log(sigmoid(2)) in double precision

    def __init__(self, clamp=3.0):
        super().__init__()
        self.clamp = clamp

    def forward(self, x, params, inverse=False):
        s, t = params.unbind(-1)
        log_scale = soft_clamp(F.logsigmoid(s + 2.0) - self._offset, self.clamp)
        if inverse:
            return x * torch.exp(-log_scale) - t, -log_scale
        return (x + t) * log_scale.exp(), log_scale


class Additive(nn.Module):
    """NICE's volume-preserving ``z = x + t``."""

    n_params = 1

    def forward(self, x, params, inverse=False):
        t = params[..., 0]
        return (x - t if inverse else x + t), torch.zeros_like(x)


class Spline(nn.Module):
    """Rational-quadratic spline with ``n_bins`` bins on ``[-bound, bound]`` and identity tails
    (Durkan et al.). ``affine=True`` puts a conditional :class:`Affine` in front, which
    shifts and scales each value into the box: ``z = spline(affine(x))``."""

    def __init__(self, n_bins=8, bound=3.0, affine=False):
        super().__init__()
        self.n_bins, self.bound = n_bins, bound
        self.affine = Affine() if affine else None
        self.n_params = splines.n_params(n_bins) + (Affine.n_params if affine else 0)

    def forward(self, x, params, inverse=False):
        if self.affine is None:
            return splines.rational_quadratic(x, params, bound=self.bound, inverse=inverse)
        k = Affine.n_params
        affine, spline = params[..., :k], params[..., k:]
        if inverse:
            u, lad_spline = splines.rational_quadratic(x, spline, bound=self.bound,
                                                       inverse=True)
            y, lad_affine = self.affine(u, affine, inverse=True)
        else:
            u, lad_affine = self.affine(x, affine)
            y, lad_spline = splines.rational_quadratic(u, spline, bound=self.bound)
        return y, lad_affine + lad_spline


class RobustSpline(nn.Module):
    """Hong et al.'s modified spline: one learned knot on ``[-bound, bound]``, identity outside,
    plus a bias. Its inverse stays within ``2 * bound`` of ``y - t`` and its slope is at most
    ``1 / splines.min_slope(2)`` (see :func:`~flowsk.nn.splines.robust_rational_quadratic`)."""

    n_params = splines.ROBUST_N_PARAMS

    def __init__(self, bound=3.0):
        super().__init__()
        self.bound = bound

    def forward(self, x, params, inverse=False):
        return splines.robust_rational_quadratic(x, params, bound=self.bound, inverse=inverse)


TRANSFORMS = {"affine": Affine, "additive": Additive, "spline": Spline,
              "robust-spline": RobustSpline}
#: The options each transform takes (the rest of ``make_transform``'s options are ignored).
OPTIONS = {"affine": (), "additive": (), "spline": ("n_bins", "bound", "affine"),
           "robust-spline": ("bound",)}


def make_transform(name, **options):
    """Element-wise transform by name (one of ``TRANSFORMS``). ``options`` (``n_bins``,
    ``bound``, ``affine``) go to the transforms that take them (``OPTIONS``); None values
    keep the transform's defaults."""
    if name not in TRANSFORMS:
        raise ValueError(f"coupling must be one of {sorted(TRANSFORMS)}, got {name!r}")
    kwargs = {k: v for k, v in options.items() if k in OPTIONS[name] and v is not None}
    return TRANSFORMS[name](**kwargs)


class Coupling(Bijection):
    """Coupling over dimension 1, split at ``split``: the first ``split`` entries condition the
    rest. ``conditioner(x_a, context)`` must return ``transform.n_params`` values per entry of
    ``x_b``, laid out as ``(B, n_params * n_b, ...)``; works for ``(B, D)`` and ``(B, C, H, W)``.
    """

    def __init__(self, split, conditioner, transform):
        super().__init__()
        self.split = split
        self.conditioner = conditioner
        self.transform = transform

    def _params(self, x_a, x_b, context):
        h = self.conditioner(x_a, context)
        n_b, k = x_b.shape[1], self.transform.n_params
        h = h.reshape(h.shape[0], n_b, k, *h.shape[2:])
        return h.movedim(2, -1)  # (B, n_b, ..., k)

    def _couple(self, x, context, inverse):
        x_a, x_b = x[:, :self.split], x[:, self.split:]
        y_b, logdet = self.transform(x_b, self._params(x_a, x_b, context), inverse=inverse)
        return torch.cat([x_a, y_b], 1), sum_per_sample(logdet)

    def forward(self, x, context=None):
        return self._couple(x, context, inverse=False)

    def inverse(self, z, context=None):
        return self._couple(z, context, inverse=True)

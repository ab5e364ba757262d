"""Element-wise monotone rational-quadratic splines.

``rational_quadratic`` is the spline of Durkan et al. (2019), "Neural Spline
Flows", on ``[-bound, bound]`` with linear (identity) tails outside.
``robust_rational_quadratic`` is the two-bin variant of Hong, Park & Chun,
"On the robustness of normalizing flows for inverse problems in imaging"
(eq. 13): one learned interior knot and derivative, plus a learned shift.

The unnormalised parameters are soft-clamped to ``(-clamp, clamp)`` (see
:func:`~flowsk.nn.base.soft_clamp`), which bounds the ratio of bin sizes and
the knot derivatives, hence the slopes of the spline and of its inverse
(:func:`min_slope`).

Everything here is written to export to ONNX: bins are found with
comparisons and a sum, bin quantities are selected with ``torch.gather``,
and the tails are handled with ``torch.where`` on a clamped input, so the
spline branch never produces non-finite values (which would poison
gradients through ``where``).  No ``searchsorted``, no boolean-mask
indexing, no in-place writes.
"""
import math

import torch
from torch.nn import functional as F

from .base import soft_clamp

ROBUST_N_PARAMS = 6
#: Default soft clamp of the unnormalised widths, heights and derivatives.
CLAMP = 5.0
#: Default floors of the bin widths and heights (fractions of the box) and of the derivatives.
MIN_BIN_WIDTH = MIN_BIN_HEIGHT = MIN_DERIVATIVE = 1e-3


def n_params(num_bins):
    """Number of spline parameters per element for ``num_bins`` bins: ``3K - 1``."""
    return 3 * num_bins - 1


def _derivative_shift(min_derivative):
    """The softplus shift that makes a zero parameter a derivative of exactly 1."""
    return math.log(math.expm1(1.0 - min_derivative))


def _knots(unnormalized, bound, min_size):
    """Softmax bin sizes with a floor, as knot positions ``(..., K + 1)`` and sizes ``(..., K)``."""
    num_bins = unnormalized.shape[-1]
    sizes = torch.softmax(unnormalized, dim=-1)
    sizes = min_size + (1.0 - min_size * num_bins) * sizes
    cum = torch.cumsum(sizes, dim=-1)
    edge = cum[..., :1]
    knots = torch.cat(
        [torch.full_like(edge, -bound), 2.0 * bound * cum[..., :-1] - bound,
         torch.full_like(edge, bound)],
        dim=-1,
    )
    return knots, knots[..., 1:] - knots[..., :-1]


def _select(t, idx):
    """``t[..., idx]`` for a per-element bin index ``idx`` of shape ``(..., 1)``.

    Returns ``(...)``.
    """
    return torch.gather(t, -1, idx)[..., 0]


def rational_quadratic(
    x,
    params,
    *,
    bound=3.0,
    inverse=False,
    min_bin_width=MIN_BIN_WIDTH,
    min_bin_height=MIN_BIN_HEIGHT,
    min_derivative=MIN_DERIVATIVE,
    clamp=CLAMP,
):
    """Monotone rational-quadratic spline on ``[-bound, bound]``, identity outside.

    Args:
        x: ``(...)`` inputs (outputs of the spline when ``inverse=True``).
        params: ``(..., 3K - 1)`` unnormalised parameters: ``K`` widths, ``K``
            heights, ``K - 1`` interior derivatives.  Boundary derivatives are
            1.  All-zero parameters give the identity map.
        bound: half-width of the spline box.
        inverse: evaluate ``c^{-1}`` instead of ``c``.
        clamp: the parameters are soft-clamped to ``(-clamp, clamp)`` first
            (None: not clamped); then ``c' >= min_slope(K, ...)`` everywhere,
            so the inverse's slope is at most ``1 / min_slope(K, ...)``.

    Returns:
        ``(y, logabsdet)``, both ``(...)``: ``y = c(x)`` and ``log|c'(x)|``,
        or with ``inverse=True`` ``y = c^{-1}(x)`` and ``log|dc^{-1}/dx|``.
    """
    if params.shape[:-1] != x.shape:
        raise ValueError(f"params batch shape {tuple(params.shape[:-1])} != input shape "
                         f"{tuple(x.shape)}")
    num_bins = (params.shape[-1] + 1) // 3
    if num_bins < 1 or params.shape[-1] != n_params(num_bins):
        raise ValueError(f"params last dimension must be 3K - 1, got {params.shape[-1]}")
    if min_bin_width * num_bins > 1.0 or min_bin_height * num_bins > 1.0:
        raise ValueError("minimal bin width/height too large for the number of bins")
    if clamp is not None:
        params = soft_clamp(params, clamp)

    cumwidths, widths = _knots(params[..., :num_bins], bound, min_bin_width)
    cumheights, heights = _knots(params[..., num_bins : 2 * num_bins], bound, min_bin_height)
    shift = _derivative_shift(min_derivative)
    interior = min_derivative + F.softplus(params[..., 2 * num_bins :] + shift)
    one = torch.ones_like(cumwidths[..., :1])
    derivatives = torch.cat([one, interior, one], dim=-1)

    inside = (x >= -bound) & (x <= bound)
    xc = x.clamp(-bound, bound)

    knots = cumheights if inverse else cumwidths
    idx = (xc[..., None] >= knots[..., 1:-1]).long().sum(dim=-1, keepdim=True)

    x_k = _select(cumwidths, idx)
    w_k = _select(widths, idx)
    y_k = _select(cumheights, idx)
    h_k = _select(heights, idx)
    d_k = _select(derivatives, idx)
    d_k1 = _select(derivatives[..., 1:], idx)
    s_k = h_k / w_k
    curv = d_k1 + d_k - 2.0 * s_k

    if inverse:
        dy = xc - y_k
        a = h_k * (s_k - d_k) + dy * curv
        b = h_k * d_k - dy * curv
        c = -s_k * dy
        disc = (b * b - 4.0 * a * c).clamp(min=0.0)
        theta = (2.0 * c) / (-b - torch.sqrt(disc))
        out = theta * w_k + x_k
    else:
        theta = (xc - x_k) / w_k

    t1mt = theta * (1.0 - theta)
    denom = s_k + curv * t1mt
    deriv_num = s_k * s_k * (d_k1 * theta * theta + 2.0 * s_k * t1mt
                             + d_k * (1.0 - theta) * (1.0 - theta))
    lad = torch.log(deriv_num) - 2.0 * torch.log(denom)
    if inverse:
        lad = -lad
    else:
        out = y_k + h_k * (s_k * theta * theta + d_k * t1mt) / denom

    y = torch.where(inside, out, x)
    logabsdet = torch.where(inside, lad, torch.zeros_like(lad))
    return y, logabsdet


def robust_rational_quadratic(
    x,
    params,
    *,
    bound=3.0,
    inverse=False,
    min_bin_width=MIN_BIN_WIDTH,
    min_bin_height=MIN_BIN_HEIGHT,
    min_derivative=MIN_DERIVATIVE,
    clamp=CLAMP,
):
    """Two-bin RQ spline plus a learned shift: ``c(x) = s(x) + t`` (Hong, Park & Chun, eq. 13).

    ``s`` is ``rational_quadratic`` with ``K = 2``: one learned interior knot
    ``(x*, y*)`` with learned derivative, derivative 1 and ``s(±bound) = ±bound``
    at the ends, identity outside the box.  Its inverse is bounded,
    ``|c^{-1}(y) - (y - t)| <= 2 * bound``, and so is its slope:
    ``dc^{-1}/dy <= 1 / min_slope(2, ...)`` (about 1.8e6 with the default
    floors and clamp, a log-slope of 14.4; the floor ``min_derivative`` alone
    does not bound it, since a bin's slope dips below both end derivatives
    when its secant is small).

    Args:
        x: ``(...)`` inputs (outputs when ``inverse=True``).
        params: ``(..., 6)``: the 5 parameters of a two-bin
            ``rational_quadratic`` followed by the shift ``t``.  All-zero
            parameters give the identity map.

    Returns:
        ``(y, logabsdet)``, both ``(...)``, as for ``rational_quadratic``.
    """
    if params.shape[-1] != ROBUST_N_PARAMS:
        raise ValueError(f"params last dimension must be {ROBUST_N_PARAMS}, got {params.shape[-1]}")
    spline_params, t = params[..., :-1], params[..., -1]
    kwargs = dict(bound=bound, min_bin_width=min_bin_width, min_bin_height=min_bin_height,
                  min_derivative=min_derivative, clamp=clamp)
    if inverse:
        return rational_quadratic(x - t, spline_params, inverse=True, **kwargs)
    y, logabsdet = rational_quadratic(x, spline_params, **kwargs)
    return y + t, logabsdet


def _rq_slope(xi, s, d0, d1):
    """Slope of a rational-quadratic bin at ``xi`` in [0, 1] (secant ``s``, end derivatives
    ``d0``, ``d1``), Gregory & Delbourgo's formula."""
    a, b = 1.0 - xi, xi
    num = s * s * (d1 * b * b + 2.0 * s * a * b + d0 * a * a)
    return num / (s + (d0 + d1 - 2.0 * s) * a * b) ** 2


def _min_over_bin(s, d0, d1, n_grid=2001, n_refine=100):
    """``min_xi _rq_slope(xi, s, d0, d1)``: a grid, then golden-section search around its
    smallest point."""
    grid = [k / (n_grid - 1) for k in range(n_grid)]
    k = min(range(n_grid), key=lambda i: _rq_slope(grid[i], s, d0, d1))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, n_grid - 1)]
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(n_refine):
        m1, m2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if _rq_slope(m1, s, d0, d1) < _rq_slope(m2, s, d0, d1):
            hi = m2
        else:
            lo = m1
    return min(_rq_slope((lo + hi) / 2, s, d0, d1), _rq_slope(grid[k], s, d0, d1))


def min_slope(num_bins, *, min_bin_width=MIN_BIN_WIDTH, min_bin_height=MIN_BIN_HEIGHT,
              min_derivative=MIN_DERIVATIVE, clamp=CLAMP):
    """The infimum over all parameters and inputs of the slope ``c'`` of
    :func:`rational_quadratic` with ``num_bins`` bins (also of the spline part of
    :func:`robust_rational_quadratic` with ``num_bins=2``); 0 without a clamp.

    With parameters in ``(-clamp, clamp)`` a bin's secant ``s`` is at least ``s_min``
    (the smallest height over the largest width) and a knot's derivative lies in
    ``[d_min, d_max]``. The slope in a bin increases with ``s`` and, at each point of the
    bin, is first increasing then decreasing in each end derivative, so its infimum is the
    smallest over the bin of the slope at ``s_min`` with each end derivative at ``d_min`` or
    ``d_max`` (1 at the ends of the box).
    """
    if num_bins == 1:
        return 1.0  # one bin spanning the box: the identity
    if clamp is None:
        return 0.0  # an unbounded interior derivative flattens its bins without limit
    spread = math.exp(2.0 * clamp)  # the largest ratio of two softmax weights
    p_min = 1.0 / (1.0 + (num_bins - 1) * spread)
    p_max = 1.0 / (1.0 + (num_bins - 1) / spread)
    s_min = ((min_bin_height + (1.0 - num_bins * min_bin_height) * p_min)
             / (min_bin_width + (1.0 - num_bins * min_bin_width) * p_max))
    shift = _derivative_shift(min_derivative)
    knots = [min_derivative + math.log1p(math.exp(v + shift)) for v in (-clamp, clamp)]
    ends = [(1.0, d) for d in knots]  # the bins at the ends of the box
    if num_bins > 2:
        ends += [(d0, d1) for d0 in knots for d1 in knots]
    return min(1.0, *(_min_over_bin(s_min, d0, d1) for d0, d1 in ends))

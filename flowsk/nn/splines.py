"""Element-wise monotone rational-quadratic splines.

``rational_quadratic`` is the spline of Durkan et al. (2019), "Neural Spline
Flows", on ``[-bound, bound]`` with linear (identity) tails outside.
``robust_rational_quadratic`` is the two-bin variant of Hong, Park & Chun,
"On the robustness of normalizing flows for inverse problems in imaging"
(eq. 13): one learned interior knot and derivative, plus a learned shift.

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

ROBUST_N_PARAMS = 6


def n_params(num_bins):
    """Number of spline parameters per element for ``num_bins`` bins: ``3K - 1``."""
    return 3 * num_bins - 1


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
    min_bin_width=1e-3,
    min_bin_height=1e-3,
    min_derivative=1e-3,
):
    """Monotone rational-quadratic spline on ``[-bound, bound]``, identity outside.

    Args:
        x: ``(...)`` inputs (outputs of the spline when ``inverse=True``).
        params: ``(..., 3K - 1)`` unnormalised parameters: ``K`` widths, ``K``
            heights, ``K - 1`` interior derivatives.  Boundary derivatives are
            1.  All-zero parameters give the identity map.
        bound: half-width of the spline box.
        inverse: evaluate ``c^{-1}`` instead of ``c``.

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

    cumwidths, widths = _knots(params[..., :num_bins], bound, min_bin_width)
    cumheights, heights = _knots(params[..., num_bins : 2 * num_bins], bound, min_bin_height)
    # softplus shift so that a zero parameter gives derivative exactly 1
    shift = math.log(math.expm1(1.0 - min_derivative))
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
    min_bin_width=1e-3,
    min_bin_height=1e-3,
    min_derivative=1e-3,
):
    """Two-bin RQ spline plus a learned shift: ``c(x) = s(x) + t`` (Hong, Park & Chun, eq. 13).

    ``s`` is ``rational_quadratic`` with ``K = 2``: one learned interior knot
    ``(x*, y*)`` with learned derivative, derivative 1 and ``s(±bound) = ±bound``
    at the ends, identity outside the box.  Its inverse is bounded:
    ``|c^{-1}(y) - (y - t)| <= 2 * bound``.

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
    kwargs = dict(
        bound=bound,
        min_bin_width=min_bin_width,
        min_bin_height=min_bin_height,
        min_derivative=min_derivative,
    )
    if inverse:
        return rational_quadratic(x - t, spline_params, inverse=True, **kwargs)
    y, logabsdet = rational_quadratic(x, spline_params, **kwargs)
    return y + t, logabsdet

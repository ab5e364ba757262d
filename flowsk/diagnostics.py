"""Posterior calibration: coverage of credible intervals and simulation-based calibration.

Both rest on one fact: if the draws ``s_1 .. s_k`` come from the exact posterior of ``x``, then
``x`` and the draws are ``k + 1`` exchangeable values, so the rank of ``x`` among the draws (the
number of draws below it) is uniform on ``0 .. k``, for every feature and any ``k``.

- :func:`coverage`: the share of true values inside the central ``level`` credible interval of
  the draws. Good: close to ``level`` at every level (0.9 at 0.9). Too narrow a posterior
  (over-confident, under-dispersed, a sampler that mixes too little) gives less; too wide a
  posterior more. The interval is taken in rank terms, which makes the score exact for any
  number of draws: a value whose rank cell ``[r, r + 1] / (k + 1)`` lies partly inside the
  central ``level`` of ``[0, 1]`` counts for that part. Intervals between empirical quantiles
  (``np.quantile``) of ``k`` draws hold only about ``level (k - 1) / (k + 1)`` of exact
  posterior samples (0.85 at 0.9 with 32 draws).
- ``coverage(..., joint=True)``: TARP-style coverage of whole signals. Each of the ``k + 1``
  points (the truth and the draws) gets its distance to their common mean (the posterior mean
  estimate that keeps the points exchangeable); the score is the share of signals whose distance
  ranks within the ``level`` quantile of the draws' distances. Good: ``level``; a posterior too
  narrow as a whole gives less.
- :func:`sbc_ranks`: simulation-based calibration (Talts et al.) with the prior itself as the
  truth: ``x ~ prior``, ``y = A(x) + noise``, draws from the solver's posterior, and the rank of
  each true feature. An exact sampler gives uniform ranks whatever the prior's misfit to real
  data, so SBC separates the sampler's error from the prior's. :func:`rank_uniformity` tests the
  ranks for uniformity (good: a p-value that is not small, e.g. above 0.01), and
  :func:`plot_ranks` draws the rank histogram and the ECDF difference (good: a flat histogram and
  an ECDF difference inside its band; a U shape or an ECDF difference below zero on the left
  and above on the right means too narrow draws, a hump the opposite, a slope one way a bias).
  Per-feature SBC is passed by draws of the prior itself (the truth is one too), so
  ``sbc_ranks(..., misfit=True)`` also ranks the truth's data misfit ``||A(x) - y||`` among the
  draws': not uniform (low ranks) when the draws fit the measurements worse than the truth.

Ties (a signal on a lattice, or on a bound where clipped draws pile up) get randomised ranks:
a truth equal to ``t`` draws takes each of the ``t + 1`` ranks with equal probability.

The functions take arrays, or a solver by duck typing (an object with ``prior``, ``operator``,
``sigma`` and ``sample_posterior``, like :class:`flowsk.InverseSolver`).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from scipy import stats
from sklearn.utils import check_random_state

from ._typing import RandomStateLike
from ._validation import check_int, is_real

LEVELS = (0.5, 0.8, 0.9, 0.95)


def _check_draws(X, samples):
    X, S = np.asarray(X, dtype=np.float64), np.asarray(samples, dtype=np.float64)
    if X.ndim != 2 or S.ndim != 3 or S.shape[0] != X.shape[0] or S.shape[2] != X.shape[1]:
        raise ValueError(f"X must be (n, n_features) and samples (n, n_samples, n_features) "
                         f"with matching n and n_features, got {X.shape} and {S.shape}")
    if S.shape[1] < 1 or X.size == 0:
        raise ValueError("X and samples must not be empty")
    if not (np.isfinite(X).all() and np.isfinite(S).all()):
        raise ValueError("X and samples must be finite (no NaN or inf)")
    return X, S


def _check_levels(levels):
    levels = np.atleast_1d(np.asarray(levels, dtype=np.float64))
    if levels.ndim != 1 or not ((levels > 0) & (levels < 1)).all():
        raise ValueError(f"levels must be numbers in (0, 1), got {levels!r}")
    return levels


def _random_ranks(below, ties, rng):
    """``below + U{0 .. ties}``: the rank of a value with ``below`` draws under it and ``ties``
    draws equal to it."""
    return below + np.floor(rng.uniform(size=below.shape) * (ties + 1)).astype(np.int64)


def ranks(X: ArrayLike, samples: ArrayLike,
          random_state: RandomStateLike = None) -> NDArray[np.int64]:
    """Rank of each true value among its draws, ties randomised: ``X (n, D)``, ``samples
    (n, k, D) -> (n, D)`` ints in ``0 .. k``. Uniform for exact posterior draws."""
    X, S = _check_draws(X, samples)
    below = (S < X[:, None]).sum(1)
    ties = (S == X[:, None]).sum(1)
    return _random_ranks(below, ties, check_random_state(random_state))


def rank_coverage(R: ArrayLike, n_samples: int, levels: ArrayLike = LEVELS, *,
                  lower: bool = False) -> NDArray[np.float64]:
    """Coverage from ranks ``R`` (any shape, ints in ``0 .. n_samples``): ``(n_levels,)``.

    The central ``level`` interval of ``[0, 1]`` (with ``lower``, ``[0, level]``) against each
    rank's cell ``[r, r + 1] / (n_samples + 1)``, counting the part of the cell inside: exact in
    expectation for uniform ranks, at any ``n_samples``.
    """
    check_int("n_samples", n_samples, 1)
    R = np.asarray(R)
    if R.size == 0 or R.dtype.kind not in "iu" or R.min() < 0 or R.max() > n_samples:
        raise ValueError(f"ranks must be a non-empty int array in [0, {n_samples}]")
    levels = _check_levels(levels)
    lo = np.zeros_like(levels) if lower else (1 - levels) / 2
    hi = levels if lower else (1 + levels) / 2
    counts = np.bincount(R.ravel(), minlength=n_samples + 1) / R.size
    cells = np.arange(n_samples + 2) / (n_samples + 1)
    inside = (np.clip(np.minimum(cells[1:], hi[:, None]) - np.maximum(cells[:-1], lo[:, None]),
                      0, None) * (n_samples + 1))
    return inside @ counts


def coverage(X: ArrayLike, samples: ArrayLike, levels: ArrayLike = LEVELS, *,
             joint: bool = False, random_state: RandomStateLike = None) -> NDArray[np.float64]:
    """Share of true values inside the draws' credible intervals at each level.

    Parameters
    ----------
    X : (n, n_features) true signals
    samples : (n, n_samples, n_features) posterior draws for each signal
    levels : credible levels in (0, 1)
    joint : bool
        False: per-feature central intervals, pooled over signals and features. True: whole
        signals, TARP-style (distances to the mean of the draws and the truth).
    random_state : seeds the randomised ranks of ties

    Returns
    -------
    (n_levels,) coverage per level; good when close to ``levels``.
    """
    X, S = _check_draws(X, samples)
    rng = check_random_state(random_state)
    if not joint:
        return rank_coverage(ranks(X, S, rng), S.shape[1], levels)
    points = np.concatenate([X[:, None], S], 1)
    dist = np.linalg.norm(points - points.mean(1, keepdims=True), axis=2)
    R = _random_ranks((dist[:, 1:] < dist[:, :1]).sum(1), (dist[:, 1:] == dist[:, :1]).sum(1),
                      rng)
    return rank_coverage(R, S.shape[1], levels, lower=True)


def sbc_ranks(solver: Any, n_simulations: int, n_samples: int = 99, *,
              noise_std: float | None = None, misfit: bool = False,
              random_state: RandomStateLike = None) -> NDArray[np.int64]:
    """Simulation-based calibration with the prior as the truth: ranks ``(n_simulations,
    n_features)``, ints in ``0 .. n_samples`` (``n_features + 1`` columns with
    ``misfit``).

    For each simulation: ``z ~ N(0, I)``, ``x = G(z)`` (the prior's generator, the signal its
    posterior methods assume), ``y = A(x) + noise_std * N(0, I)``, then ``n_samples`` draws of
    ``solver.sample_posterior(y)`` and the rank of each feature of ``x`` (clipped to the prior's
    ``data_range``, as the draws are) among them. ``noise_std`` defaults to the solver's
    ``sigma``, the noise its posterior assumes. A solver that needs ``fit`` must be fitted.

    ``misfit=True`` appends a column: the rank of the truth's misfit ``||A(x) - y||`` among
    the draws' (a data-dependent test quantity, Modrak et al. 2023). Draws that ignore the data,
    draws of the prior itself for instance, give uniform feature ranks, since the truth is a
    prior draw too; their misfits are too large, so the truth ranks low and this column is not
    uniform. Score coverage on ``R[:, :-1]``, test ``R[:, -1:]`` with :func:`rank_uniformity`.

    ``solver``: an object with ``prior`` (a fitted flow prior: ``flow_``, ``data_range``),
    ``operator`` (``measure``), ``sigma`` and ``sample_posterior`` (an ``InverseSolver`` with a
    posterior method). ``n_samples + 1`` should be a multiple of the histogram's bins
    (99 draws: 100 ranks).
    """
    check_int("n_simulations", n_simulations, 1)
    check_int("n_samples", n_samples, 1)
    noise_std = getattr(solver, "sigma", None) if noise_std is None else noise_std
    if not is_real(noise_std, 0):
        raise ValueError(f"noise_std must be a number >= 0 (set it, or the solver's sigma), "
                         f"got {noise_std!r}")
    rng = check_random_state(random_state)
    prior = solver.prior
    flow = prior.flow_
    device = next(iter(flow.buffers()), torch.empty(0)).device
    X = np.empty((n_simulations, flow.n_features))
    todo = np.arange(n_simulations)
    for _ in range(10):  # latents where the generator overflows carry no mass: redraw them
        z = torch.as_tensor(rng.standard_normal((len(todo), flow.latent_dim)),
                            dtype=torch.float32, device=device)
        with torch.no_grad():
            X[todo] = flow.inverse(z)[0].double().cpu().numpy()
        todo = todo[~np.isfinite(X[todo]).all(1)]
        if not len(todo):
            break
    else:
        raise FloatingPointError(f"the prior's generator overflows on {len(todo)} of "
                                 f"{n_simulations} latents after ten redraws")
    Y = solver.operator.measure(X, noise_std=noise_std, random_state=rng)
    S = solver.sample_posterior(Y, n_samples=n_samples)
    if prior.data_range is not None:
        X = np.clip(X, *prior.data_range)
    R = ranks(X, S, rng)
    if not misfit:
        return R
    S = np.asarray(S, dtype=np.float64)
    fit = np.linalg.norm(solver.operator.measure(np.concatenate([X, S.reshape(-1, X.shape[1])]))
                         - np.concatenate([Y, np.repeat(Y, S.shape[1], 0)]), axis=1)
    truth, draws = fit[:len(X)], fit[len(X):].reshape(len(X), -1)
    return np.column_stack([R, ranks(truth[:, None], draws[..., None], rng)])


def _bins(n_ranks, n_values):
    """Bins of ranks ``0 .. n_ranks - 1`` for a histogram of ``n_values`` ranks: the largest
    count up to 20 with at least 5 expected per bin (edges of equal width in rank)."""
    n_bins = int(max(1, min(20, n_ranks, n_values // 5)))
    return np.floor(np.arange(n_ranks) * n_bins / n_ranks).astype(int), n_bins


def rank_uniformity(R: ArrayLike, n_samples: int) -> float:
    """p-value of "every feature's ranks are uniform": ``R (n_simulations, D)``.

    A chi-squared test per feature (ranks grouped into up to 20 bins, each with its exact
    probability), combined by Bonferroni: the smallest p-value times ``D``, capped at 1. Small
    values (below 0.01, say) reject calibration; features are tested separately because the
    features of one signal are not independent.
    """
    check_int("n_samples", n_samples, 1)
    R = np.asarray(R)
    if R.ndim != 2 or R.shape[0] < 2 or R.dtype.kind not in "iu" or R.min() < 0 \
            or R.max() > n_samples:
        raise ValueError(f"ranks must be (n_simulations >= 2, n_features) ints in "
                         f"[0, {n_samples}], got shape {R.shape}")
    group, n_bins = _bins(n_samples + 1, len(R))
    if n_bins < 2:
        raise ValueError("too few simulations to test uniformity (need at least 10)")
    expected = np.bincount(group, minlength=n_bins) / (n_samples + 1) * len(R)
    observed = np.stack([np.bincount(group[r], minlength=n_bins) for r in R.T])
    p = stats.chisquare(observed, expected, axis=1).pvalue
    return float(min(1.0, p.min() * R.shape[1]))


def plot_ranks(R: ArrayLike, n_samples: int, *, title: str | None = None,
               axes: Any = None) -> Any:
    """Rank histogram and ECDF difference of SBC ranks ``R (n_simulations, D)``; returns the
    figure.

    Left: the ranks of all features pooled into bins, with the 99 % range of a bin's count
    under uniformity (for one feature's ``n_simulations`` ranks, scaled to the pooled count).
    Right: each feature's ECDF of ``(r + 0.5) / (n_samples + 1)`` minus the uniform CDF (grey)
    and the pooled one (black), with the 95 % band of one feature's ECDF (DKW inequality).
    """
    import matplotlib.pyplot as plt
    R = np.asarray(R)
    if R.ndim != 2:
        raise ValueError(f"ranks must be (n_simulations, n_features), got shape {R.shape}")
    n, D = R.shape
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    else:
        fig = axes[0].figure
    group, n_bins = _bins(n_samples + 1, n)
    share = np.bincount(group, minlength=n_bins) / (n_samples + 1)
    counts = np.bincount(group[R.ravel()], minlength=n_bins) / D
    band = stats.binom.interval(0.99, n, share)
    axes[0].bar(np.arange(n_bins), counts, width=1.0, color="C0", alpha=0.7)
    axes[0].fill_between(np.arange(n_bins + 1) - 0.5, np.append(band[0], band[0][-1]),
                         np.append(band[1], band[1][-1]), step="post", color="grey", alpha=0.3)
    axes[0].set(xlabel="rank bin", ylabel="simulations per feature", xlim=(-0.5, n_bins - 0.5))
    u = np.linspace(0, 1, 201)
    pit = (R + 0.5) / (n_samples + 1)
    for j in range(D):
        axes[1].plot(u, (pit[:, j][:, None] <= u).mean(0) - u, color="grey", lw=0.4, alpha=0.4)
    axes[1].plot(u, (pit.ravel()[:, None] <= u).mean(0) - u, color="k", lw=1.5)
    eps = np.sqrt(np.log(2 / 0.05) / (2 * n))
    axes[1].axhspan(-eps, eps, color="C0", alpha=0.15)
    axes[1].axhline(0, color="k", lw=0.5)
    axes[1].set(xlabel="fractional rank", ylabel="ECDF - uniform", xlim=(0, 1))
    if title:
        axes[0].set_title(title, fontsize=9, loc="left")
    fig.tight_layout()
    return fig


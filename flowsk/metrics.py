"""Image-quality, density and robustness metrics."""
from __future__ import annotations

import math
import numbers
import warnings
from contextlib import contextmanager
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from skimage.metrics import structural_similarity
from sklearn.utils.validation import check_is_fitted

from ._typing import RandomStateLike


def _check_data_range(data_range):
    if (isinstance(data_range, bool) or not isinstance(data_range, numbers.Real)
            or not (np.isfinite(data_range) and data_range > 0)):
        raise ValueError(f"data_range must be a finite number > 0 (hi - lo of the signals), "
                         f"got {data_range!r}")


def _pair(X_true, X_pred):
    X_true, X_pred = np.asarray(X_true), np.asarray(X_pred)
    for X in (X_true, X_pred):
        if X.dtype.kind not in "biuf":
            raise ValueError(f"X_true and X_pred must hold real numbers, got dtype {X.dtype}")
    X_true, X_pred = X_true.astype(np.float64), X_pred.astype(np.float64)
    if X_true.ndim == 1:
        X_true, X_pred = X_true[None], X_pred[None]
    if X_true.ndim != 2 or X_true.shape != X_pred.shape:
        raise ValueError(f"X_true and X_pred must be 2-D arrays of one shape, got "
                         f"{X_true.shape} and {X_pred.shape}")
    if X_true.size == 0:
        raise ValueError("X_true and X_pred are empty")
    if not (np.isfinite(X_true).all() and np.isfinite(X_pred).all()):
        raise ValueError("X_true and X_pred must be finite (no NaN or inf)")
    return X_true, X_pred


def psnr(X_true: ArrayLike, X_pred: ArrayLike, data_range: float = 1.0) -> NDArray[np.float64]:
    """Peak signal-to-noise ratio in dB per row: ``(n, d), (n, d) -> (n,)``.

    ``10 log10(data_range^2 / mse)``; a perfect reconstruction gives ``inf``.
    """
    _check_data_range(data_range)
    X_true, X_pred = _pair(X_true, X_pred)
    with np.errstate(over="ignore"):
        mse = np.mean((X_true - X_pred) ** 2, axis=1)
    if not np.isfinite(mse).all():
        raise ValueError("the squared error of X_true and X_pred overflows float64; rescale "
                         "both arrays")
    with np.errstate(divide="ignore"):
        return 10 * np.log10(data_range ** 2 / mse)


def ssim(X_true: ArrayLike, X_pred: ArrayLike, image_shape: tuple[int, int, int],
         data_range: float = 1.0) -> NDArray[np.float64]:
    """Structural similarity per row (scikit-image), images ``(C, H, W)`` flattened:
    ``(n, d), (n, d) -> (n,)``. Uses a 7x7 window, or the largest odd one that fits."""
    _check_data_range(data_range)
    X_true, X_pred = _pair(X_true, X_pred)
    shape = tuple(image_shape) if np.ndim(image_shape) == 1 else ()
    if len(shape) != 3 or not all(isinstance(s, numbers.Integral) and s > 0 for s in shape):
        raise ValueError(f"image_shape must be (C, H, W) positive ints, got {image_shape!r}")
    c, h, w = shape
    if c * h * w != X_true.shape[1]:
        raise ValueError(f"image_shape {shape} does not match {X_true.shape[1]} features")
    win = min(7, h - (1 - h % 2), w - (1 - w % 2))
    if win < 3:
        raise ValueError(f"images of shape {shape} are too small for SSIM")
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.asarray([structural_similarity(t.reshape(c, h, w), p.reshape(c, h, w),
                                                channel_axis=0, data_range=data_range,
                                                win_size=win)
                          for t, p in zip(X_true, X_pred)])
    if not np.isfinite(out).all():
        raise ValueError("SSIM overflows float64 for these values; rescale X_true and X_pred")
    return out


def bits_per_dim(log_likelihood: ArrayLike, n_features: int, n_bits: int | None = None,
                 data_range: float = 1.0) -> float | NDArray[np.float64]:
    """Negative log-likelihood in nats per sample -> bits per dimension (same shape).

    Without ``n_bits``: ``-log2 p(x) / D`` for the density of the data as given. With
    ``n_bits``, the convention of the image-flow literature: the data, spread over a range of
    width ``data_range`` (``hi - lo``), are taken to hold ``2**n_bits`` levels, and the result is
    the bits per dimension of the density on ``[0, 2**n_bits)``,
    ``-log2 p(x) / D + n_bits - log2(data_range)``; for 8-bit images scaled to [0, 1] that is
    ``-log2 p(x) / D + 8``, comparable with published numbers (Glow: 3.35 on CIFAR-10).
    """
    if (isinstance(n_features, bool) or not isinstance(n_features, numbers.Integral)
            or n_features < 1):
        raise ValueError(f"n_features must be a positive int, got {n_features!r}")
    ll = np.asarray(log_likelihood)
    if ll.dtype.kind not in "biuf" or not np.isfinite(ll).all():
        raise ValueError(f"log_likelihood must be finite real numbers, got {log_likelihood!r}")
    bpd = -ll.astype(np.float64)[()] / (n_features * math.log(2))
    if n_bits is None:
        return bpd
    if isinstance(n_bits, bool) or not isinstance(n_bits, numbers.Integral) or n_bits < 1:
        raise ValueError(f"n_bits must be a positive int or None, got {n_bits!r}")
    _check_data_range(data_range)
    return bpd + n_bits - math.log2(data_range)


@contextmanager
def _raw_outputs(estimator):
    """Let ``estimator`` return non-finite outputs (no raise, no warning) for a while."""
    saved = estimator.on_nonfinite
    estimator.on_nonfinite = "warn"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*contain non-finite values",
                                    category=RuntimeWarning)
            yield
    finally:
        estimator.on_nonfinite = saved


def _bad_rows(A):
    """Rows of ``A (n, ...)`` holding a non-finite value: bool ``(n,)``."""
    return ~np.isfinite(A.reshape(len(A), -1)).all(1)


def inf_rate(estimator: Any, X: ArrayLike | None = None, *, n_draws: int = 10,
             temperature: float = 1.0, random_state: RandomStateLike = None) -> float:
    """%Inf of Hong et al.: the share of inputs whose draws hold a non-finite value, in [0, 1].

    Non-finite outputs are counted, not raised, whatever the estimator's ``on_nonfinite``.
    ``estimator`` is anything with the estimators' methods (duck typing):

    - a posterior sampler (``sample_posterior``, an ``InverseSolver`` with a posterior method):
      ``X`` are measurements ``(n_obs, m)``; each observation gets ``n_draws`` posterior draws
      (``temperature`` must be 1).
    - a flow prior (``sample``, ``transform``, ``inverse_transform``) with ``X``
      ``(n, n_features)``: each input's draw is its latent code ``f(x)`` and its round trip
      ``G(f(x))`` (``n_draws`` and ``temperature`` are not used).
    - a flow prior with ``X=None``: ``n_draws`` samples ``G(temperature * eps)``, each its own
      input.
    """
    if not (isinstance(temperature, numbers.Real) and np.isfinite(temperature)
            and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if hasattr(estimator, "sample_posterior"):
        if X is None:
            raise ValueError("inf_rate of a posterior sampler needs measurements X (n_obs, m)")
        if temperature != 1:
            raise ValueError("a posterior sampler draws from its posterior: temperature must "
                             "be 1")
        with _raw_outputs(estimator):
            S = estimator.sample_posterior(X, n_samples=n_draws)
        return float(_bad_rows(S).mean())
    if not all(hasattr(estimator, name) for name in ("sample", "transform",
                                                       "inverse_transform")):
        raise TypeError(f"inf_rate needs a flow prior (sample, transform, inverse_transform) or "
                        f"a posterior sampler (sample_posterior), got {type(estimator).__name__}")
    check_is_fitted(estimator)
    with _raw_outputs(estimator):
        if X is None:
            S = estimator.sample(n_draws, temperature=temperature, random_state=random_state)
            return float(_bad_rows(S).mean())
        Z = estimator.transform(X)
        bad = _bad_rows(Z)
        if (~bad).any():
            bad[~bad] = _bad_rows(estimator.inverse_transform(Z[~bad]))
    return float(bad.mean())


def ood_score(estimator: Any, X: ArrayLike) -> NDArray[np.float64]:
    """Mahalanobis distance of each input's features from their training distribution:
    ``(n, n_features or m) -> (n,)`` (``inf`` where the features are not finite).

    ``estimator`` provides ``ood_features(X) -> (features (n, k), reference)``, ``reference``
    the :class:`sklearn.covariance.EmpiricalCovariance` of the training features:

    - ``FlowPrior`` / ``InjectiveFlowPrior``: ``X`` data ``(n, n_features)``, features = latent
      codes ``f(x)``, against those of the training data (``latent_covariance_``).
    - ``InverseSolver`` with ``method="amortized-vi"``, fitted: ``X`` measurements ``(n, m)``,
      features = the conditional pre-generator's encoding of ``y`` (Hong et al.'s ``g(y)``),
      against those of its training measurements.

    The distance is ``sqrt((u - mu)^T Sigma^+ (u - mu))``.
    """
    if not hasattr(estimator, "ood_features"):
        raise TypeError(f"ood_score needs an estimator with ood_features(X) (a FlowPrior, "
                        f"InjectiveFlowPrior or amortized-vi InverseSolver), got "
                        f"{type(estimator).__name__}")
    with _raw_outputs(estimator):
        features, reference = estimator.ood_features(X)
    bad = _bad_rows(features)
    out = np.full(len(features), np.inf)
    if (~bad).any():
        out[~bad] = np.sqrt(reference.mahalanobis(features[~bad].astype(np.float64)))
    return out

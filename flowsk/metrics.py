"""Image-quality and density metrics."""
import math

import numpy as np
from skimage.metrics import structural_similarity


def _pair(X_true, X_pred):
    X_true, X_pred = np.asarray(X_true, dtype=np.float64), np.asarray(X_pred, dtype=np.float64)
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


def psnr(X_true, X_pred, data_range=1.0):
    """Peak signal-to-noise ratio in dB per row: ``(n, d), (n, d) -> (n,)``.

    ``10 log10(data_range^2 / mse)``; a perfect reconstruction gives ``inf``.
    """
    X_true, X_pred = _pair(X_true, X_pred)
    mse = np.mean((X_true - X_pred) ** 2, axis=1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(data_range ** 2 / mse)


def ssim(X_true, X_pred, image_shape, data_range=1.0):
    """Structural similarity per row (scikit-image), images ``(C, H, W)`` flattened:
    ``(n, d), (n, d) -> (n,)``. Uses a 7x7 window, or the largest odd one that fits."""
    X_true, X_pred = _pair(X_true, X_pred)
    c, h, w = image_shape
    if c * h * w != X_true.shape[1]:
        raise ValueError(f"image_shape {tuple(image_shape)} does not match "
                         f"{X_true.shape[1]} features")
    win = min(7, h - (1 - h % 2), w - (1 - w % 2))
    if win < 3:
        raise ValueError(f"images of shape {tuple(image_shape)} are too small for SSIM")
    out = [structural_similarity(t.reshape(c, h, w), p.reshape(c, h, w), channel_axis=0,
                                 data_range=data_range, win_size=win)
           for t, p in zip(X_true, X_pred)]
    return np.asarray(out)


def bits_per_dim(log_likelihood, n_features):
    """Negative log-likelihood in nats per sample -> bits per dimension."""
    return -log_likelihood / (n_features * math.log(2))

"""The image benchmark's deconvolution baselines for the zero-padded ``Blur``, checked against
scipy's convolution (an implementation independent of flowsk's operator)."""
import sys
from pathlib import Path

import numpy as np
from scipy.signal import convolve
from skimage import restoration

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from images import (  # noqa: E402
    BLUR,
    LAPLACIAN,
    richardson_lucy_boundary,
    wiener_boundary,
)

SIDE = 16


def smooth_image(seed=0):
    """A positive ``(SIDE, SIDE)`` image with edges: a few random rectangles."""
    rng = np.random.RandomState(seed)
    x = np.full((SIDE, SIDE), 0.2)
    for _ in range(4):
        r, c = rng.randint(0, SIDE - 4, 2)
        x[r:r + rng.randint(3, 8), c:c + rng.randint(3, 8)] += rng.uniform(0.2, 0.5)
    return x


def blur(x):
    return convolve(x, BLUR, mode="same")  # zero padding, as flowsk.operators.Blur


def mse(a, b):
    return float(np.mean((a - b) ** 2))


def test_wiener_boundary_zeroes_the_gradient_of_its_objective():
    """``x`` minimises ``||A x - y||^2 + balance ||D x||^2`` with ``A`` the zero-padded blur."""
    y = blur(smooth_image()) + 0.01 * np.random.RandomState(1).standard_normal((SIDE, SIDE))
    balance = 0.01
    x = wiener_boundary(y, None, balance)
    adjoint = BLUR[::-1, ::-1]
    gradient = (convolve(blur(x) - y, adjoint, mode="same")
                + balance * convolve(convolve(x, LAPLACIAN, mode="same"), LAPLACIAN[::-1, ::-1],
                                     mode="same"))
    assert np.abs(gradient).max() < 1e-10
    assert np.abs(x).max() > 0.1  # not the zero image


def test_richardson_lucy_boundary_restores_what_skimage_loses_at_the_border():
    """Noise-free, the boundary-normalised iterations approach the truth (closer than the
    blurred image, and closer with more iterations); scikit-image's, without the division by
    ``A^T 1``, end further from it than the blurred image itself."""
    x = smooth_image()
    y = blur(x)
    errors = [mse(richardson_lucy_boundary(y, None, n), x) for n in (20, 200)]
    assert errors[1] < errors[0] < mse(y, x)
    assert errors[1] < 0.5 * mse(y, x)
    assert mse(restoration.richardson_lucy(y, BLUR, num_iter=100, clip=False), x) > mse(y, x)

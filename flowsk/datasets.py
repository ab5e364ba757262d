"""Embedded data: scikit-learn's digits, patches of bundled photographs, and Hong et al.'s 2-D
mixing toy."""
import numbers

import numpy as np
from skimage import color
from skimage import data as skdata
from sklearn.datasets import load_digits, load_sample_images
from sklearn.utils import check_random_state

_SKIMAGE_PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon")


def load_digit_images():
    """Digits 0-9 as ``(1797, 64)`` floats ``pixels / 16`` in [0, 1], with shape ``(1, 8, 8)``.

    Returns ``(X, image_shape)``; labels are ``sklearn.datasets.load_digits().target``.
    """
    return load_digits().data / 16.0, (1, 8, 8)


def _photos(color_images):
    photos = [getattr(skdata, name)() for name in _SKIMAGE_PHOTOS]
    photos += list(load_sample_images().images)
    out = []
    for img in photos:
        img = np.asarray(img, dtype=np.float64)
        img = img / 255.0 if img.max() > 1 else img
        if img.ndim == 3 and img.shape[2] == 4:
            img = img[..., :3]
        if color_images:
            if img.ndim == 3:
                out.append(img)
        else:
            out.append(color.rgb2gray(img) if img.ndim == 3 else img)
    return out


def load_image_patches(size=8, n_patches=2000, color=False, images=None, random_state=None):
    """Random ``size x size`` patches of bundled photographs, values in [0, 1].

    ``images``: list of ``(H, W)`` / ``(H, W, 3)`` arrays in [0, 1] to cut from instead
    (default: scikit-image's and scikit-learn's sample photographs). Returns
    ``(X, image_shape)`` with ``X`` of shape ``(n_patches, C * size * size)``, C-order
    ``(C, H, W)``.
    """
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if not isinstance(n_patches, (int, np.integer)) or n_patches < 1:
        raise ValueError(f"n_patches must be a positive int, got {n_patches!r}")
    rng = check_random_state(random_state)
    images = _photos(color) if images is None else [np.asarray(i, float) for i in images]
    channels = 3 if color else 1
    patches = np.empty((n_patches, channels, size, size))
    which = rng.randint(len(images), size=n_patches)
    for k, i in enumerate(which):
        img = images[i]
        if img.ndim == 2:
            img = img[..., None]
        if img.shape[2] != channels:
            raise ValueError(f"image {i} has {img.shape[2]} channels, expected {channels}")
        r = rng.randint(img.shape[0] - size + 1)
        c = rng.randint(img.shape[1] - size + 1)
        patches[k] = img[r:r + size, c:c + size].transpose(2, 0, 1)
    return patches.reshape(n_patches, -1), (channels, size, size)


MIXING = np.array([[0.7, 0.3], [0.3, 0.7]])


def make_mixing_toy(n_samples=1000, shift=(0.0, 0.0), noise=0.01, random_state=None):
    """The 2-D toy inverse problem of Hong, Park and Chun (eq. 7).

    ``x`` uniform on ``[-1, 1]^2``, ``y = MIXING x + N(0, noise^2 I) + shift`` with
    ``MIXING = [[0.7, 0.3], [0.3, 0.7]]``; ``shift=(0.8, -0.8)`` gives their out-of-distribution
    measurements. Returns ``(X, Y)``, both ``(n_samples, 2)`` float64.
    """
    if (isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral)
            or n_samples < 1):
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    shift = np.asarray(shift)
    if shift.shape != (2,) or shift.dtype.kind not in "biuf" or not np.isfinite(shift).all():
        raise ValueError(f"shift must be 2 finite numbers, got {shift!r}")
    if (isinstance(noise, bool) or not isinstance(noise, numbers.Real)
            or not (np.isfinite(noise) and noise >= 0)):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    rng = check_random_state(random_state)
    X = rng.uniform(-1.0, 1.0, (n_samples, 2))
    Y = X @ MIXING.T + noise * rng.standard_normal((n_samples, 2)) + shift
    return X, Y

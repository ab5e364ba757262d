"""Embedded data: scikit-learn's digits, patches of bundled photographs and scientific images
split by source image, the Shepp-Logan phantom, LFW faces, and Hong et al.'s 2-D mixing toy.

Every image here ships inside scikit-image or scikit-learn: nothing downloads at run time.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from skimage import color
from skimage import data as skdata
from skimage.transform import resize
from sklearn.datasets import load_digits, load_sample_images
from sklearn.utils import check_random_state

from ._typing import ImageShape, RandomStateLike
from ._validation import check_choice, check_int

#: ``(X (n, C * H * W) float64, image_shape (C, H, W))``, what the image loaders return.
Images = tuple[NDArray[np.float64], ImageShape]

_SKIMAGE_PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon")
#: Source photographs of each split of :func:`load_photo_patches` (scikit-image names, plus
#: scikit-learn's sample images ``china.jpg`` / ``flower.jpg``). Grey-only photographs sit out of
#: the colour splits.
PHOTO_SPLITS = {
    "train": ("astronaut", "chelsea", "rocket", "motorcycle", "flower.jpg", "coins", "moon",
              "brick", "grass", "gravel"),
    "test": ("coffee", "china.jpg", "camera"),
}
#: Source images of each split of :func:`load_scientific_patches` (scikit-image names).
SCIENTIFIC_SPLITS = {
    "train": ("retina", "immunohistochemistry", "hubble_deep_field"),
    "test": ("cell", "microaneurysms"),
}


def load_digit_images() -> Images:
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


def load_image_patches(size: int = 8, n_patches: int = 2000, color: bool = False,
                       images: Sequence[ArrayLike] | None = None,
                       random_state: RandomStateLike = None) -> Images:
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


def _bundled(name):
    """One bundled image as ``uint8`` ``(H, W)`` or ``(H, W, 3)``."""
    if name.endswith(".jpg"):
        images = load_sample_images()
        return images.images[[f.rsplit("/", 1)[-1] for f in images.filenames].index(name)]
    if name == "motorcycle":
        return skdata.stereo_motorcycle()[0]
    return getattr(skdata, name)()


def _quantise(img, color_image):
    """``uint8`` image -> 8-bit lattice ``k / 255`` as ``(C, H, W)`` float64, or None when a
    colour image is asked of a grey one."""
    if img.ndim == 2:
        if color_image:
            return None
        return (img / 255.0)[None]
    if color_image:
        return (img / 255.0).transpose(2, 0, 1)
    return (np.round(color.rgb2gray(img) * 255) / 255)[None]


def _tiles(images, size):
    """Every non-overlapping ``size x size`` tile of each ``(C, H, W)`` image on the grid from
    its top-left corner, image by image in raster order: ``(n, C * size * size)``."""
    out = []
    for img in images:
        c, h, w = img.shape
        grid = img[:, :h - h % size, :w - w % size].reshape(c, h // size, size, w // size, size)
        out.append(grid.transpose(1, 3, 0, 2, 4).reshape(-1, c * size * size))
    return np.concatenate(out)


def _windows(images, size, n_patches, rng):
    """``n_patches`` windows at random positions; images drawn in proportion to their number
    of windows, so every window of the split is equally likely: ``(n, C * size * size)``."""
    counts = np.array([(i.shape[1] - size + 1) * (i.shape[2] - size + 1) for i in images])
    which = rng.choice(len(images), size=n_patches, p=counts / counts.sum())
    out = np.empty((n_patches, images[0].shape[0], size, size))
    for k, i in enumerate(which):
        _, h, w = images[i].shape
        r, c = rng.randint(h - size + 1), rng.randint(w - size + 1)
        out[k] = images[i][:, r:r + size, c:c + size]
    return out.reshape(n_patches, -1)


def _split_patches(names, size, color_image, n_patches, random_state):
    check_int("size", size, 2)
    if n_patches is not None:
        check_int("n_patches", n_patches, 1)
    images = [img for img in (_quantise(_bundled(n), color_image) for n in names)
              if img is not None and min(img.shape[1:]) >= size]
    if not images:
        raise ValueError(f"no image of this split is {size}x{size} or larger")
    if n_patches is None:
        X = _tiles(images, size)
        if random_state is not None:
            X = X[check_random_state(random_state).permutation(len(X))]
    else:
        X = _windows(images, size, n_patches, check_random_state(random_state))
    return X, (images[0].shape[0], size, size)


def load_photo_patches(size: int, color: bool = False, split: Literal["train", "test"] = "train",
                       n_patches: int | None = None,
                       random_state: RandomStateLike = None) -> Images:
    """Patches of the photographs bundled with scikit-image and scikit-learn, on the 8-bit
    lattice ``k / 255``, ``k`` in 0..255 (grey: ``rgb2gray`` rounded to the lattice).

    The splits hold different photographs (``PHOTO_SPLITS``), so test scores measure
    generalisation, not memorisation:

    - ``"train"``: astronaut, chelsea, rocket, motorcycle (left view), flower.jpg, and for grey
      patches also coins, moon, brick, grass, gravel;
    - ``"test"``: coffee, china.jpg, and for grey patches also camera.

    ``n_patches=None`` returns every non-overlapping tile of the grid (image by image in raster
    order, shuffled when ``random_state`` is given): grey 16x16 9,562 train / 2,989 test
    patches, 32x32 2,379 / 732; colour 16x16 5,034 / 1,965, 32x32 1,247 / 476. An int draws
    that many windows at random positions (overlapping, seeded by ``random_state``).

    Returns ``(X, image_shape)``: ``X`` ``(n, C * size * size)`` float64 flattened C-order from
    ``image_shape = (C, size, size)``, C = 3 for ``color`` else 1.
    """
    check_choice("split", split, PHOTO_SPLITS)
    return _split_patches(PHOTO_SPLITS[split], size, color, n_patches, random_state)


def load_scientific_patches(size: int, split: Literal["train", "test"] = "train",
                            n_patches: int | None = None,
                            random_state: RandomStateLike = None) -> Images:
    """Grey patches of scikit-image's bundled medical and scientific images, on the 8-bit
    lattice, split by source image as :func:`load_photo_patches` (``SCIENTIFIC_SPLITS``):

    - ``"train"``: retina (fundus photograph), immunohistochemistry (stained tissue),
      hubble_deep_field (galaxies);
    - ``"test"``: cell (phase-contrast microscopy), microaneurysms (a retina close-up).

    ``n_patches=None``: every non-overlapping tile, 16x16 12,116 train / 1,430 test, 32x32
    3,029 / 349. Returns ``(X, (1, size, size))``.
    """
    check_choice("split", split, SCIENTIFIC_SPLITS)
    return _split_patches(SCIENTIFIC_SPLITS[split], size, False, n_patches, random_state)


def load_phantom(size: int = 64) -> Images:
    """The Shepp-Logan phantom (a test image for :class:`flowsk.operators.
    LimitedAngleTomography`), resized with anti-aliasing to ``size x size`` and rounded to the
    8-bit lattice: ``(X (1, size * size), (1, size, size))``."""
    check_int("size", size, 2)
    img = resize(skdata.shepp_logan_phantom(), (size, size), anti_aliasing=True)
    return np.round(np.clip(img, 0, 1) * 255).reshape(1, -1) / 255, (1, size, size)


def load_face_images(size: int | None = None) -> Images:
    """The 100 faces of scikit-image's ``lfw_subset`` (25x25 grey crops of Labeled Faces in the
    Wild), an out-of-distribution set for priors trained on photographs. ``size``: resize to
    ``size x size`` (anti-aliased); None keeps 25x25. Values on the 8-bit lattice.

    Returns ``(X (100, size * size), (1, size, size))``.
    """
    faces = skdata.lfw_subset()[:100]
    if size is not None:
        check_int("size", size, 2)
        faces = resize(faces, (len(faces), size, size), anti_aliasing=True)
    side = faces.shape[1]
    return np.round(np.clip(faces, 0, 1) * 255).reshape(100, -1) / 255, (1, side, side)


MIXING = np.array([[0.7, 0.3], [0.3, 0.7]])


def make_mixing_toy(n_samples: int = 1000, shift: ArrayLike = (0.0, 0.0), noise: float = 0.01,
                    random_state: RandomStateLike = None
                    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
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

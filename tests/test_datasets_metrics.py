"""Embedded data and metrics, against scikit-learn, scikit-image and hand formulas."""
import math

import numpy as np
import pytest
from skimage import data as skdata
from skimage.metrics import structural_similarity
from sklearn.datasets import load_digits

from flowsk.datasets import load_digit_images, load_image_patches
from flowsk.metrics import bits_per_dim, psnr, ssim


# -- datasets ------------------------------------------------------------------------------------
def test_load_digit_images():
    X, shape = load_digit_images()
    assert X.shape == (1797, 64) and shape == (1, 8, 8)
    assert X.dtype == np.float64
    assert X.min() == 0.0 and X.max() == 1.0
    np.testing.assert_array_equal(X * 16, load_digits().data)
    # C-order (C, H, W) flattening: row 0 reshaped is the first digit image
    np.testing.assert_array_equal(X[0].reshape(shape)[0] * 16, load_digits().images[0])


@pytest.mark.parametrize("size, color, shape", [(8, False, (1, 8, 8)),
                                                (32, True, (3, 32, 32))])
def test_load_image_patches(size, color, shape):
    X, image_shape = load_image_patches(size, n_patches=50, color=color, random_state=0)
    assert image_shape == shape
    assert X.shape == (50, int(np.prod(shape))) and X.dtype == np.float64
    assert X.min() >= 0.0 and X.max() <= 1.0
    assert X.std() > 0.05  # real photographs, not a constant
    again, _ = load_image_patches(size, n_patches=50, color=color, random_state=0)
    np.testing.assert_array_equal(X, again)
    other, _ = load_image_patches(size, n_patches=50, color=color, random_state=1)
    assert not np.array_equal(X, other)


def test_load_image_patches_cuts_from_given_images():
    """Each patch is a window of the given image, flattened C-order from (C, H, W)."""
    gray = skdata.camera()[200:260, 150:230] / 255.0
    X, shape = load_image_patches(6, n_patches=10, images=[gray], random_state=0)
    assert shape == (1, 6, 6)
    windows = np.lib.stride_tricks.sliding_window_view(gray, (6, 6)).reshape(-1, 36)
    for patch in X:
        assert (np.abs(windows - patch).max(1) == 0).any()

    rgb = skdata.astronaut()[:40, :40] / 255.0
    Xc, shape = load_image_patches(4, n_patches=5, color=True, images=[rgb], random_state=0)
    assert shape == (3, 4, 4)
    windows = np.lib.stride_tricks.sliding_window_view(rgb, (4, 4, 3)).reshape(-1, 4, 4, 3)
    windows = windows.transpose(0, 3, 1, 2).reshape(len(windows), -1)
    for patch in Xc:
        assert (np.abs(windows - patch).max(1) == 0).any()


def test_load_image_patches_bad_input():
    with pytest.raises(ValueError, match="size"):
        load_image_patches(0)
    with pytest.raises(ValueError, match="size"):
        load_image_patches(2.5)
    with pytest.raises(ValueError, match="n_patches"):
        load_image_patches(8, n_patches=0)
    with pytest.raises(ValueError, match="channels"):
        load_image_patches(4, n_patches=3, color=True, images=[np.zeros((10, 10))])


# -- metrics -------------------------------------------------------------------------------------
def test_psnr_hand_formula():
    rng = np.random.RandomState(0)
    X = rng.rand(4, 30)
    Y = X + 0.05 * rng.randn(4, 30)
    for data_range in (1.0, 2.0):
        expected = [10 * math.log10(data_range ** 2 / np.mean((x - y) ** 2))
                    for x, y in zip(X, Y)]
        np.testing.assert_allclose(psnr(X, Y, data_range=data_range), expected, rtol=1e-12)
    # a known value: mse 0.01 on range 1 is 20 dB
    assert psnr(np.zeros((1, 4)), np.full((1, 4), 0.1))[0] == pytest.approx(20.0)
    assert psnr(X, X)[0] == np.inf
    assert psnr(X[0], Y[0]).shape == (1,)  # one signal as a 1-D array


def test_ssim_matches_skimage():
    img = skdata.camera()[100:164:2, 200:264:2] / 255.0  # 32 x 32
    rng = np.random.RandomState(0)
    noisy = np.clip(img + 0.1 * rng.randn(*img.shape), 0, 1)
    got = ssim(img.reshape(1, -1), noisy.reshape(1, -1), (1, 32, 32))
    expected = structural_similarity(img, noisy, data_range=1.0, win_size=7)
    assert got.shape == (1,)
    assert got[0] == pytest.approx(expected, rel=1e-12)
    assert ssim(img.reshape(1, -1), img.reshape(1, -1), (1, 32, 32))[0] == pytest.approx(1.0)


def test_ssim_color_and_small_images():
    rgb = skdata.astronaut()[:16, :16] / 255.0
    rng = np.random.RandomState(1)
    noisy = np.clip(rgb + 0.1 * rng.randn(*rgb.shape), 0, 1)

    def flat(a):  # (H, W, C) -> one flat (C, H, W) row
        return a.transpose(2, 0, 1).reshape(1, -1)

    expected = structural_similarity(rgb, noisy, channel_axis=2, data_range=1.0, win_size=7)
    assert ssim(flat(rgb), flat(noisy), (3, 16, 16))[0] == pytest.approx(expected, rel=1e-12)
    # 8x8 digits use a 7x7 window; 4x4 images the largest odd window that fits, 3x3
    X, shape = load_digit_images()
    expected = structural_similarity(X[0].reshape(8, 8), X[1].reshape(8, 8), data_range=1.0,
                                     win_size=7)
    assert ssim(X[:1], X[1:2], shape)[0] == pytest.approx(expected, rel=1e-12)
    a, b = rng.rand(1, 16), rng.rand(1, 16)
    expected = structural_similarity(a.reshape(4, 4), b.reshape(4, 4), data_range=1.0,
                                     win_size=3)
    assert ssim(a, b, (1, 4, 4))[0] == pytest.approx(expected, rel=1e-12)


def test_bits_per_dim_formula():
    assert bits_per_dim(-64 * math.log(2), 64) == pytest.approx(1.0)
    assert bits_per_dim(-100.0, 10) == pytest.approx(100.0 / (10 * math.log(2)))
    assert bits_per_dim(20.0, 4) == pytest.approx(-20.0 / (4 * math.log(2)))


def test_metrics_bad_input():
    X = np.zeros((2, 16))
    with pytest.raises(ValueError, match="one shape"):
        psnr(X, np.zeros((2, 15)))
    with pytest.raises(ValueError, match="one shape"):
        psnr(np.zeros((2, 2, 4)), np.zeros((2, 2, 4)))
    with pytest.raises(ValueError, match="finite"):
        psnr(X, np.full((2, 16), np.nan))
    with pytest.raises(ValueError, match="finite"):
        ssim(np.full((2, 16), np.inf), X, (1, 4, 4))
    with pytest.raises(ValueError, match="empty"):
        psnr(np.zeros((0, 4)), np.zeros((0, 4)))
    with pytest.raises(ValueError, match="does not match"):
        ssim(X, X, (1, 4, 5))
    with pytest.raises(ValueError, match="too small"):
        ssim(np.zeros((1, 4)), np.zeros((1, 4)), (1, 2, 2))

"""Embedded data and metrics, against scikit-learn, scikit-image and hand formulas."""
import math
import socket

import numpy as np
import pytest
from skimage import color as skcolor
from skimage import data as skdata
from skimage.metrics import structural_similarity
from skimage.transform import resize
from sklearn.datasets import load_digits, load_sample_images

from flowsk import FlowPrior
from flowsk.datasets import (
    PHOTO_SPLITS,
    SCIENTIFIC_SPLITS,
    load_digit_images,
    load_face_images,
    load_image_patches,
    load_phantom,
    load_photo_patches,
    load_scientific_patches,
)
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


# -- photo / scientific patches split by source image -------------------------------------------
def _source(name):
    """The raw uint8 image, loaded here without flowsk."""
    if name == "motorcycle":
        return skdata.stereo_motorcycle()[0]
    if name.endswith(".jpg"):
        sample = load_sample_images()
        return sample.images[[f.endswith(name) for f in sample.filenames].index(True)]
    return getattr(skdata, name)()


def _grey(img):
    return img / 255.0 if img.ndim == 2 else np.round(skcolor.rgb2gray(img) * 255) / 255


def _found_in(patch, img):
    """Whether the 2-D ``patch`` is a window of the 2-D ``img`` (exact match)."""
    s = patch.shape[0]
    rows, cols = np.nonzero(img[:img.shape[0] - s + 1, :img.shape[1] - s + 1] == patch[0, 0])
    return any(np.array_equal(img[r:r + s, c:c + s], patch) for r, c in zip(rows, cols))


def test_photo_splits_hold_different_photographs():
    for splits in (PHOTO_SPLITS, SCIENTIFIC_SPLITS):
        assert not set(splits["train"]) & set(splits["test"])
    # every random test window comes from a test photograph and from no training photograph
    X, _ = load_photo_patches(16, split="test", n_patches=12, random_state=0)
    train = [_grey(_source(n)) for n in PHOTO_SPLITS["train"]]
    test = [_grey(_source(n)) for n in PHOTO_SPLITS["test"]]
    for patch in X.reshape(-1, 16, 16):
        assert any(_found_in(patch, img) for img in test)
        if patch.std() > 0.02:  # a flat patch could sit in any photograph
            assert not any(_found_in(patch, img) for img in train)


@pytest.mark.parametrize("loader, splits, color",
                         [(load_photo_patches, PHOTO_SPLITS, False),
                          (load_photo_patches, PHOTO_SPLITS, True),
                          (load_scientific_patches, SCIENTIFIC_SPLITS, False)])
def test_split_patches_tile_every_source_image(loader, splits, color):
    size = 32
    kwargs = {"color": color} if loader is load_photo_patches else {}
    for split, names in splits.items():
        X, shape = loader(size, split=split, **kwargs)
        channels = 3 if color else 1
        sources = [_source(n) for n in names]
        sources = [img for img in sources if not color or img.ndim == 3]
        expected = sum((img.shape[0] // size) * (img.shape[1] // size) for img in sources)
        assert shape == (channels, size, size)
        assert X.shape == (expected, channels * size * size) and X.dtype == np.float64
        # the 8-bit lattice k / 255 in [0, 1]
        np.testing.assert_array_equal(X * 255, np.round(X * 255))
        assert X.min() >= 0 and X.max() <= 1 and X.std() > 0.05
        # the first tile is the top-left corner of the first source image, C-order (C, H, W)
        first = sources[0] / 255.0 if color else _grey(sources[0])
        first = first[:size, :size].transpose(2, 0, 1) if color else first[None, :size, :size]
        np.testing.assert_array_equal(X[0], first.ravel())


def test_split_patches_seeds():
    tiles, _ = load_photo_patches(16, split="test")
    shuffled, _ = load_photo_patches(16, split="test", random_state=0)
    assert not np.array_equal(tiles, shuffled)
    np.testing.assert_array_equal(np.sort(tiles, 0), np.sort(shuffled, 0))  # same tiles
    np.testing.assert_array_equal(shuffled, load_photo_patches(16, split="test",
                                                               random_state=0)[0])
    a, _ = load_scientific_patches(16, n_patches=40, random_state=3)
    np.testing.assert_array_equal(a, load_scientific_patches(16, n_patches=40,
                                                             random_state=3)[0])
    assert a.shape == (40, 256)
    assert not np.array_equal(a, load_scientific_patches(16, n_patches=40, random_state=4)[0])


def test_phantom_and_faces():
    X, shape = load_phantom(32)
    assert shape == (1, 32, 32) and X.shape == (1, 1024)
    np.testing.assert_array_equal(X * 255, np.round(X * 255))
    small = resize(skdata.shepp_logan_phantom(), (32, 32), anti_aliasing=True).ravel()
    assert np.abs(X[0] - small).max() <= 0.5 / 255 + 1e-12
    F, shape = load_face_images()
    assert shape == (1, 25, 25) and F.shape == (100, 625)
    np.testing.assert_array_equal(F, np.round(skdata.lfw_subset()[:100].reshape(100, -1)
                                              * 255) / 255)
    F16, shape = load_face_images(16)
    assert shape == (1, 16, 16) and F16.shape == (100, 256)
    np.testing.assert_array_equal(F16 * 255, np.round(F16 * 255))


def test_loaders_work_offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access in a data loader")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for color in (False, True):
        for split in ("train", "test"):
            assert len(load_photo_patches(32, color=color, split=split)[0])
    for split in ("train", "test"):
        assert len(load_scientific_patches(32, split=split)[0])
    assert len(load_phantom()[0]) == 1 and len(load_face_images()[0]) == 100
    assert len(load_image_patches(8, n_patches=3, random_state=0)[0]) == 3


def test_split_patches_bad_input():
    with pytest.raises(ValueError, match="split"):
        load_photo_patches(16, split="validation")
    with pytest.raises(ValueError, match="split"):
        load_scientific_patches(16, split=None)
    with pytest.raises(ValueError, match="size"):
        load_photo_patches(1)
    with pytest.raises(ValueError, match="size"):
        load_photo_patches(16.0)
    with pytest.raises(ValueError, match="n_patches"):
        load_photo_patches(16, n_patches=0)
    with pytest.raises(ValueError, match="no image"):
        load_scientific_patches(600, split="test")  # microaneurysms is 102 px, cell 550
    with pytest.raises(ValueError, match="size"):
        load_phantom(0)
    with pytest.raises(ValueError, match="size"):
        load_face_images(1)


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


def test_bits_per_dim_image_convention():
    """8-bit data: the uniform density over the 256 levels is 8 bits per dimension, whatever
    range the levels are spread over."""
    D = 16
    assert bits_per_dim(0.0, D, n_bits=8) == pytest.approx(8.0)  # uniform on [0, 1]^D
    assert bits_per_dim(-D * math.log(2), D, n_bits=8, data_range=2.0) == pytest.approx(8.0)
    assert bits_per_dim(-D * math.log(255), D, n_bits=8, data_range=255.0) == pytest.approx(8.0)
    # 5 bits on [0, 1]: -log2 p / D + 5
    assert bits_per_dim(-3.0, 4, n_bits=5) == pytest.approx(3.0 / (4 * math.log(2)) + 5)
    with pytest.raises(ValueError, match="n_bits"):
        bits_per_dim(0.0, D, n_bits=0)
    with pytest.raises(ValueError, match="data_range"):
        bits_per_dim(0.0, D, n_bits=8, data_range=0.0)


def test_flow_prior_bits_per_dim_uses_its_data_range():
    rng = np.random.RandomState(0)
    X = (np.floor(rng.beta(2, 3, (200, 4)) * 256) + 0.5) / 128  # 8-bit data on [0, 2]
    prior = FlowPrior(data_range=(0, 2), n_steps=2, hidden_features=16, max_epochs=3,
                      dequantize=1 / 128, random_state=0).fit(X)
    nats = np.mean(prior.score_samples(X))
    # hand computation: the density on [0, 256)^4 is p(x) / 128^4
    expected = -(nats - 4 * math.log(128)) / (4 * math.log(2))
    assert prior.bits_per_dim(X, n_bits=8) == pytest.approx(expected, rel=1e-9)
    assert prior.bits_per_dim(X) == pytest.approx(-nats / (4 * math.log(2)), rel=1e-9)
    assert 0 < expected < 8  # a fitted non-uniform density beats the uniform 8 bits
    with pytest.raises(ValueError, match="data_range"):
        FlowPrior(n_steps=1, max_epochs=1, random_state=0).fit(X).bits_per_dim(X, n_bits=8)


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

"""Image priors sample finite values at every stage of training, for every coupling."""
import warnings

import numpy as np
import pytest

from flowsk import FlowPrior
from flowsk.datasets import load_photo_patches
from flowsk.nn.coupling import TRANSFORMS


@pytest.fixture(scope="module")
def patches():
    """8-bit grey 8x8 photo patches at their bin centres, as an image prior is trained."""
    X, shape = load_photo_patches(8, n_patches=320, random_state=0)
    return (np.round(X * 255) + 0.5) / 256, shape


@pytest.mark.slow
@pytest.mark.parametrize("coupling", sorted(TRANSFORMS))
def test_samples_finite_after_1_10_and_all_epochs(patches, coupling):
    X, shape = patches
    bad = []
    for epochs in (1, 10, 60):  # 60: early stopping ends the run (the end of training)
        prior = FlowPrior(image_shape=shape, coupling=coupling, data_range=(0, 1),
                          dequantize=1 / 256, max_epochs=epochs, n_iter_no_change=5,
                          learning_rate=3e-3, on_nonfinite="warn", device="cpu",
                          random_state=0).fit(X)
        if epochs == 60:
            assert len(prior.history_["train_loss"]) > 10
        # the prior has learned something: better than the uniform 8 bits per dimension
        assert prior.bits_per_dim(X, n_bits=8) < 8
        for temperature in (0.5, 0.8, 1.0):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                S = prior.sample(2000, temperature=temperature, random_state=1)
            n_bad = int((~np.isfinite(S).all(1)).sum())
            if n_bad:
                bad.append(f"{n_bad} of 2000 after {len(prior.history_['train_loss'])} epochs "
                           f"at temperature {temperature}")
            else:
                assert S.min() >= 0 and S.max() <= 1
    assert not bad, f"non-finite samples with coupling={coupling!r}: " + "; ".join(bad)

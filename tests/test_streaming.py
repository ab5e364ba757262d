"""Fitting on memory-mapped data: batches are streamed from the map, and nothing in ``fit``
allocates an array of the data's size (measured with tracemalloc, which sees every NumPy
allocation); the latent covariance is accumulated chunk by chunk and equals the one fitted on
all codes at once."""
import tracemalloc

import numpy as np
import pytest
import torch
from sklearn.covariance import EmpiricalCovariance

import flowsk._training
import flowsk.prior
from flowsk import FlowPrior
from flowsk.nn.base import Bijection, Chain, Flow

SHAPE = (3, 4, 4)
N_FEATURES = int(np.prod(SHAPE))


def _memmap(tmp_path, n, seed=0):
    rng = np.random.RandomState(seed)
    X = rng.beta(2.0, 3.0, (n, N_FEATURES)).astype(np.float32)
    np.save(tmp_path / "X.npy", X)
    return np.load(tmp_path / "X.npy", mmap_mode="r")


def _small_prior(**kw):
    args = {"image_shape": SHAPE, "architecture": "glow", "n_levels": 1, "n_steps": 1,
            "hidden_features": 4, "data_range": (0, 1), "max_epochs": 1, "batch_size": 500,
            "random_state": 0, "device": "cpu"}
    return FlowPrior(**{**args, **kw})


def test_fit_streams_a_memmap_and_allocates_no_copy_of_it(tmp_path, monkeypatch):
    X = _memmap(tmp_path, 40_000)
    # the streaming path, which data over 512 MiB take, on a small map; small latent chunks
    monkeypatch.setattr(flowsk._training, "_DEVICE_COPY_LIMIT", X.nbytes // 4)
    monkeypatch.setattr(flowsk.prior, "_CHUNK", 512)
    sources = []
    real_init = flowsk._training.Batches.__init__

    def spy_init(self, data, device):
        real_init(self, data, device)
        sources.append(self.data)

    _small_prior().fit(X[:1000])  # first calls import and cache; not what is measured
    monkeypatch.setattr(flowsk._training.Batches, "__init__", spy_init)
    prior = _small_prior(batch_size=1000)
    tracemalloc.start()
    try:
        prior.fit(X)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(sources) == 1 and isinstance(sources[0], np.ndarray)
    assert np.shares_memory(sources[0], X), "the training loop reads the map itself"
    assert peak < 0.25 * X.nbytes, f"fit allocated {peak / X.nbytes:.2f}x the data's size"
    assert np.isfinite(prior.latent_covariance_.covariance_).all()


def test_latent_covariance_equals_the_one_fitted_on_all_codes(monkeypatch):
    X = np.random.RandomState(1).beta(2.0, 3.0, (700, N_FEATURES))
    monkeypatch.setattr(flowsk.prior, "_CHUNK", 128)  # several chunks, the last one partial
    prior = _small_prior(max_epochs=2, batch_size=64).fit(X)
    reference = EmpiricalCovariance().fit(prior.transform(X).astype(np.float64))
    got = prior.latent_covariance_
    np.testing.assert_allclose(got.location_, reference.location_, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.covariance_, reference.covariance_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.precision_, reference.precision_, rtol=1e-7, atol=1e-9)
    X_new = np.random.RandomState(2).beta(2.0, 3.0, (5, N_FEATURES))
    Z_new = prior.transform(X_new).astype(np.float64)
    np.testing.assert_allclose(got.mahalanobis(Z_new), reference.mahalanobis(Z_new),
                               rtol=1e-7)


class _InfAboveOne(Bijection):
    """Identity, except that rows with ``x_0 > 1`` map to inf."""

    def forward(self, x, context=None):
        z = torch.where(x[:, :1] > 1, torch.full_like(x, np.inf), x)
        return z, x.new_zeros(len(x))


@pytest.mark.parametrize("on_nonfinite", ["warn", "raise"])
def test_latent_covariance_skips_and_reports_non_finite_codes(on_nonfinite, monkeypatch):
    monkeypatch.setattr(flowsk.prior, "_CHUNK", 32)
    X = np.random.RandomState(3).normal(size=(200, 3))
    n_bad = int((X[:, 0] > 1).sum())
    assert 0 < n_bad < len(X)
    prior = FlowPrior(device="cpu", on_nonfinite=on_nonfinite)
    prior.flow_, prior.device_ = Flow(Chain(_InfAboveOne()), 3), torch.device("cpu")
    if on_nonfinite == "raise":
        with pytest.raises(FloatingPointError, match=f"{n_bad} of 200 latent codes"):
            prior._latent_covariance(X)
        return
    with pytest.warns(RuntimeWarning, match=f"{n_bad} of 200 latent codes"):
        got = prior._latent_covariance(X)
    reference = EmpiricalCovariance().fit(X[X[:, 0] <= 1].astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(got.location_, reference.location_, rtol=1e-10)
    np.testing.assert_allclose(got.covariance_, reference.covariance_, rtol=1e-9)

"""CUDA paths: no host synchronisation per step in the training loop or the solver loop, and
the layers on the GPU. Every test here skips without a CUDA device."""
import warnings

import numpy as np
import pytest
import torch

from flowsk import FlowPrior, InverseSolver
from flowsk._training import Batches, _train_epoch, make_optimizer
from flowsk.nn.builders import build_flow
from flowsk.nn.linear import InvertibleLinear
from flowsk.operators import Denoising

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
SHAPE = (1, 8, 8)


def _syncs(fn):
    """How many host synchronisations ``fn()`` makes (torch's sync debug mode)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _nll(flow, batch):
    return -flow.log_prob(batch).mean()


def test_training_loop_synchronises_only_at_its_checks():
    """32 steps cost at most one more loss/gradient check (two reads) than 16 steps."""
    torch.manual_seed(0)
    flow = build_flow(64, image_shape=SHAPE, architecture="glow", n_levels=2, n_steps=2,
                      hidden_features=8, data_range=(0, 1)).to(CUDA).train()
    data = 0.05 + 0.9 * torch.rand(32 * 16, 64, device=CUDA)
    batches = Batches(data, CUDA)
    optimizer = make_optimizer(flow, 1e-3, 0.0)
    params = list(flow.parameters())

    def epoch(n_rows):
        return lambda: _train_epoch(flow, _nll, batches, np.arange(n_rows), 16, optimizer,
                                    params, 10.0)

    epoch(16)()  # initialises ActNorm
    n16, n32 = _syncs(epoch(16 * 16)), _syncs(epoch(32 * 16))
    assert n32 - n16 <= 2, (n16, n32)


def test_solver_loop_does_not_synchronise_per_iteration():
    rng = np.random.RandomState(0)
    X = rng.uniform(0.05, 0.95, (256, 64))
    prior = FlowPrior(image_shape=SHAPE, data_range=(0, 1), n_steps=2, hidden_features=8,
                      max_epochs=1, random_state=0, device="cuda").fit(X)
    op = Denoising(SHAPE)
    Y = op.measure(X[:32], noise_std=0.05, random_state=0)
    for method in ("map", "likelihood", "glowip"):
        solvers = [InverseSolver(prior, op, method=method, n_iter=n, random_state=0)
                   for n in (10, 40)]
        counts = [_syncs(lambda s=s: s.predict(Y)) for s in solvers]
        assert counts[0] == counts[1], (method, counts)


def test_invertible_linear_round_trip_on_cuda():
    layer = InvertibleLinear(12, torch.Generator().manual_seed(0)).to(CUDA)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(5, 12, 4, 4, device=CUDA)
    for mode in (True, False):
        layer.train(mode)
        x_back, _ = layer.inverse(layer(x)[0])
        torch.testing.assert_close(x_back, x, rtol=1e-5, atol=1e-5)


def test_streamed_batches_reach_the_device(tmp_path, monkeypatch):
    import flowsk._training

    X = np.random.RandomState(0).uniform(size=(100, 6)).astype(np.float32)
    np.save(tmp_path / "X.npy", X)
    mm = np.load(tmp_path / "X.npy", mmap_mode="r")
    monkeypatch.setattr(flowsk._training, "_DEVICE_COPY_LIMIT", 16)
    batches = Batches(mm, CUDA)
    assert not batches.on_device
    idx = np.array([7, 3, 50])
    batch = batches[batches.index(idx)]
    assert batch.device.type == "cuda"
    np.testing.assert_array_equal(batch.cpu().numpy(), X[np.sort(idx)])

"""Shared test configuration.

The tests use tiny tensors, for which intra-op thread pools cost far more than they save (and
oversubscribe a loaded 2-core CI machine), so torch runs single-threaded here.
"""
import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def rng():
    return np.random.RandomState(0)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same torch global generator state."""
    torch.manual_seed(0)

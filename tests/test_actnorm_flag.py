"""ActNorm reads its ``initialized`` buffer (a host synchronisation on a GPU) only until it has
seen it set, and again after ``load_state_dict``."""
import torch

from flowsk.nn.linear import ActNorm


def _count_flag_reads(monkeypatch, layer):
    reads = []
    real_bool = torch.Tensor.__bool__

    def spy(self):
        if self is layer.initialized:
            reads.append(1)
        return real_bool(self)

    monkeypatch.setattr(torch.Tensor, "__bool__", spy)
    return reads


def test_training_calls_read_the_flag_once(monkeypatch):
    layer = ActNorm(3).train()
    reads = _count_flag_reads(monkeypatch, layer)
    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        layer(x)
    assert len(reads) == 1


def test_a_loaded_uninitialised_state_initialises_again():
    g = torch.Generator().manual_seed(0)
    layer = ActNorm(3).train()
    layer(torch.randn(8, 3, generator=g))
    layer.load_state_dict(ActNorm(3).state_dict())  # a fresh, uninitialised state
    x = 5 + 3 * torch.randn(64, 3, generator=g)
    z, _ = layer(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(3), rtol=0, atol=1e-4)


def test_a_loaded_initialised_state_is_kept():
    g = torch.Generator().manual_seed(1)
    trained = ActNorm(3).train()
    trained(torch.randn(16, 3, generator=g))
    layer = ActNorm(3).train()
    layer.load_state_dict(trained.state_dict())
    x = 5 + 3 * torch.randn(16, 3, generator=g)
    torch.testing.assert_close(layer(x)[0], trained.eval()(x)[0], rtol=0, atol=0)

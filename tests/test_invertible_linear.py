"""InvertibleLinear: the inverse always follows the current weights, and the ONNX export reads
the cached buffer (no matrix inverse in the graph)."""
import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from flowsk.nn.linear import InvertibleLinear

C = 5


def _layer(seed):
    """A float64 layer moved well away from its random-rotation start."""
    layer = InvertibleLinear(C, torch.Generator().manual_seed(seed)).double()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return layer


def _change_by_load_state_dict(layer):
    layer.load_state_dict(_layer(7).state_dict())


def _change_by_optimizer_step(layer):
    opt = torch.optim.SGD(layer.parameters(), lr=0.02)
    x = torch.randn(16, C, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (layer(x)[0] ** 2).sum().backward()
    opt.step()


def _change_by_data_edit(layer):
    layer.lower.data.mul_(-2.0)
    layer.log_s.data.add_(0.5)


@pytest.mark.parametrize("change", [_change_by_load_state_dict, _change_by_optimizer_step,
                                    _change_by_data_edit])
@pytest.mark.parametrize("shape", [(C,), (C, 3, 3)])
def test_inverse_follows_weights_changed_in_eval_mode(change, shape):
    layer = _layer(0).eval()  # eval() fills the cache from the weights of this moment
    before = layer.weight().detach().clone()
    change(layer)
    w = layer.weight().detach()
    assert (w - before).abs().max() > 0.1, "the change must move the weights"
    x = torch.randn(4, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z, logdet = layer(x)
        x_back, logdet_inv = layer.inverse(z)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-10)
    torch.testing.assert_close(logdet_inv, -logdet, rtol=0, atol=1e-10)
    # the reference: the exact inverse of the current weight matrix
    expected = torch.linalg.inv(w) @ z.movedim(1, -1).unsqueeze(-1)
    torch.testing.assert_close(x_back.movedim(1, -1), expected.squeeze(-1), rtol=0, atol=1e-10)


def test_inverse_needs_no_matrix_inverse(monkeypatch):
    layer = _layer(0)

    def no_inverse(*args, **kwargs):
        raise AssertionError("linalg.inv called")

    monkeypatch.setattr(torch.linalg, "inv", no_inverse)
    x = torch.randn(3, C, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for mode in (True, False):
        layer.train(mode)
        torch.testing.assert_close(layer.inverse(layer(x)[0])[0], x, rtol=0, atol=1e-10)


def test_inverse_gradients_match_the_matrix_inverse():
    """Training-mode gradients through the triangular solves equal those through
    ``linalg.inv`` (float64)."""
    layer = _layer(0).train()
    z = torch.randn(6, C, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    (layer.inverse(z)[0] ** 2).sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    (torch.nn.functional.linear(z, torch.linalg.inv(layer.weight())) ** 2).sum().backward()
    for got, want in zip(grads, (p.grad for p in layer.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


class _Decoder(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, z):
        return self.layer.inverse(z)[0]


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript")
def test_onnx_export_reads_the_cache_refreshed_by_eval():
    """The exported inverse uses the buffer (the graph has no Inverse op) and matches the
    current weights once ``eval()`` is called after a change."""
    layer = _layer(0).float().eval()
    _change_by_data_edit(layer)
    layer.eval()
    z = torch.randn(4, C, 3, 3, generator=torch.Generator().manual_seed(5))
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(_Decoder(layer), (z,), buffer, input_names=["z"], output_names=["x"],
                          dynamo=False)
    model = onnx.load_from_string(buffer.getvalue())
    ops = {node.op_type for node in model.graph.node}
    assert "Inverse" not in ops
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (x_onnx,) = session.run(None, {"z": z.numpy()})
    with torch.no_grad():
        x_torch = layer.inverse(z)[0].numpy()
    np.testing.assert_allclose(x_onnx, x_torch, rtol=0, atol=1e-5)

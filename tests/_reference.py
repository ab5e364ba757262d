"""Float32 results of another runtime (onnxruntime) against a float64 reference."""
import copy

import numpy as np
import torch


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def assert_float32_accurate(got, module, inputs, atol, factor=100.0, msg=""):
    """Each of ``got`` (arrays, or one array) is as accurate as PyTorch's own float32
    evaluation of ``module(*inputs)`` (float32 tensors): its largest error against the float64
    evaluation of a copy of ``module`` is at most ``atol`` or ``factor`` times PyTorch's.

    Flows with large weights amplify float32 rounding; PyTorch's error measures how much, so
    the bound stays tight where the computation is well conditioned (``atol``) and an export
    error (a wrong op, a stale buffer: errors of order one) fails where it is not. The factor
    is onnxruntime's: its exp, tanh and sigmoid kernels approximate more coarsely than
    PyTorch's, so on the deepest test flow (3 levels, perturbed weights) its error against
    float64 was 25x PyTorch's with every graph optimisation off, 52x with them on.
    """
    with torch.no_grad():
        ref32 = _as_tuple(module(*inputs))
        ref64 = _as_tuple(copy.deepcopy(module).double()(*(x.double() for x in inputs)))
    got = _as_tuple(got)
    assert len(got) == len(ref32)
    for k, (g, r32, r64) in enumerate(zip(got, ref32, ref64)):
        r32, r64 = r32.numpy(), r64.numpy()
        assert g.shape == r32.shape and np.isfinite(r64).all()
        err_torch = np.abs(r32 - r64).max(initial=0.0)
        err = np.abs(g - r64).max(initial=0.0)
        bound = max(atol, factor * err_torch)
        assert err <= bound, (f"{msg} output {k}: error {err:.2e} against float64, PyTorch "
                              f"float32's {err_torch:.2e}, bound {bound:.2e}")

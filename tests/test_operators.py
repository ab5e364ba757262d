import numpy as np
import pytest
import scipy.sparse
import torch
from scipy.ndimage import uniform_filter
from scipy.signal import convolve2d
from scipy.sparse.linalg import aslinearoperator

from flowsk.operators import (
    Blur,
    Colorization,
    CompressedSensing,
    Denoising,
    FunctionOperator,
    Inpainting,
    LimitedAngleTomography,
    MatrixOperator,
    RandomMask,
    SuperResolution,
)

RNG = np.random.default_rng(0)
W_LIN = RNG.standard_normal((5, 7))
KERNEL = RNG.standard_normal((3, 5))


def linear_module(W):
    layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(W))
    return layer


def inpainting_mask():
    mask = np.ones((2, 6, 6), dtype=bool)
    mask[0, 1:3, 2:5] = False
    mask[1, 4, 0] = False
    return mask


LINEAR_OPERATORS = {
    "denoising": lambda: Denoising((2, 3, 4)),
    "blur_mean": lambda: Blur((2, 6, 6), kernel=3),
    "blur_kernel": lambda: Blur((6, 7), kernel=KERNEL),
    "inpainting_box": lambda: Inpainting((3, 6, 6), box=(1, 2, 4, 5)),
    "inpainting_mask": lambda: Inpainting((2, 6, 6), mask=inpainting_mask()),
    "random_mask": lambda: RandomMask((3, 6, 6), p=0.4, random_state=0),
    "colorization": lambda: Colorization((3, 4, 5)),
    "compressed_sensing": lambda: CompressedSensing(20, 8, random_state=0),
    "super_resolution": lambda: SuperResolution((2, 6, 4), factor=2),
    "tomography": lambda: LimitedAngleTomography((6, 6), angles=5),
    "matrix": lambda: MatrixOperator(W_LIN),
    "function_linear": lambda: FunctionOperator(linear_module(W_LIN), 7, linear=True),
}


@pytest.fixture(params=sorted(LINEAR_OPERATORS))
def linear_op(request):
    return LINEAR_OPERATORS[request.param]()


def t64(a):
    return torch.as_tensor(a, dtype=torch.float64)


def dense(op):
    """The matrix of a linear operator, built by applying forward to the identity."""
    with torch.no_grad():
        return op(torch.eye(op.n_features, dtype=torch.float64)).numpy().T


# Independent references ----------------------------------------------------------------


def blur_reference(images, kernel):
    """(N, C, H, W) -> blurred with zero padding and 'same' size."""
    out = np.empty_like(images)
    for i in np.ndindex(images.shape[:2]):
        out[i] = convolve2d(images[i], kernel, mode="same", boundary="fill")
    return out


def matrix_from_reference(reference, input_shape):
    """Dense matrix whose column j is ``reference`` applied to basis image j."""
    n = int(np.prod(input_shape))
    basis = np.eye(n).reshape(n, *input_shape)
    return reference(basis).reshape(n, -1).T


INDEPENDENT_MATRICES = {
    "denoising": lambda op: np.eye(24),
    "blur_mean": lambda op: matrix_from_reference(
        lambda b: uniform_filter(b, size=(1, 1, 3, 3), mode="constant"), (2, 6, 6)
    ),
    "blur_kernel": lambda op: matrix_from_reference(
        lambda b: blur_reference(b, KERNEL), (1, 6, 7)
    ),
    "inpainting_box": lambda op: np.eye(108)[
        np.broadcast_to(~np.pad(np.ones((3, 3), bool), ((1, 2), (2, 1))), (3, 6, 6)).ravel()
    ],
    "inpainting_mask": lambda op: np.eye(72)[inpainting_mask().ravel()],
    "random_mask": lambda op: np.eye(108)[
        np.broadcast_to(np.random.RandomState(0).random_sample((6, 6)) >= 0.4, (3, 6, 6)).ravel()
    ],
    "colorization": lambda op: np.hstack([np.eye(20)] * 3) / 3,
    "super_resolution": lambda op: matrix_from_reference(
        lambda b: b.reshape(len(b), 2, 3, 2, 2, 2).mean(axis=(3, 5)), (2, 6, 4)
    ),
    "compressed_sensing": lambda op: op.matrix.numpy(),
    "tomography": lambda op: op.matrix.numpy(),
    "matrix": lambda op: W_LIN,
    "function_linear": lambda op: W_LIN,
}


# Linear algebra ------------------------------------------------------------------------


def test_adjointness(linear_op):
    rng = np.random.default_rng(1)
    x = t64(rng.standard_normal((4, linear_op.n_features)))
    y = t64(rng.standard_normal((4, linear_op.output_dim)))
    lhs = (linear_op(x) * y).sum(1)
    rhs = (x * linear_op.adjoint(y)).sum(1)
    np.testing.assert_allclose(lhs.detach().numpy(), rhs.detach().numpy(), rtol=1e-10)


@pytest.mark.parametrize("name", sorted(INDEPENDENT_MATRICES))
def test_matches_independent_matrix_and_pinv(name):
    op = LINEAR_OPERATORS[name]()
    A = INDEPENDENT_MATRICES[name](op)
    np.testing.assert_allclose(dense(op), A, atol=1e-12)
    rng = np.random.default_rng(2)
    y = rng.standard_normal((3, op.output_dim))
    expected = np.linalg.lstsq(A, y.T, rcond=None)[0].T
    np.testing.assert_allclose(op.pinv(t64(y)).numpy(), expected, atol=1e-9)


def test_pinv_matches_lstsq_on_singular_blur():
    # The 1-D mean filter [1, 1, 1]/3 on 8 samples is singular, so pinv must pick the
    # minimum-norm solution.
    op = Blur((8, 8), kernel=3)
    A = dense(op)
    assert np.linalg.matrix_rank(A) < 64
    y = np.random.default_rng(3).standard_normal((2, 64))
    expected = np.linalg.lstsq(A, y.T, rcond=None)[0].T
    np.testing.assert_allclose(op.pinv(t64(y)).numpy(), expected, atol=1e-9)


def test_float64_in_float64_out(linear_op):
    x = torch.zeros(2, linear_op.n_features, dtype=torch.float64)
    y = torch.zeros(2, linear_op.output_dim, dtype=torch.float64)
    assert linear_op(x).dtype == torch.float64
    assert linear_op.adjoint(y).dtype == torch.float64
    assert linear_op.pinv(y).dtype == torch.float64
    if not isinstance(linear_op, FunctionOperator):  # fn's own dtype rules apply there
        assert linear_op(x.float()).dtype == torch.float32


def test_state_dict_holds_only_persistent_buffers():
    op = CompressedSensing(6, 4, random_state=0)
    assert set(op.state_dict()) == {"matrix", "matrix_pinv"}
    blur = Blur((4, 4))
    blur.pinv(torch.zeros(1, 16))
    assert set(blur.state_dict()) == {"kernel"}


# Operator-specific references ----------------------------------------------------------


def test_blur_mean_filter_matches_uniform_filter():
    X = np.random.default_rng(4).standard_normal((3, 2, 7, 6))
    op = Blur((2, 7, 6), kernel=3)
    expected = uniform_filter(X, size=(1, 1, 3, 3), mode="constant")
    np.testing.assert_allclose(op(t64(X.reshape(3, -1))).numpy(), expected.reshape(3, -1),
                               atol=1e-12)


def test_blur_kernel_is_a_true_convolution():
    X = np.random.default_rng(5).standard_normal((2, 3, 6, 7))
    op = Blur((3, 6, 7), kernel=KERNEL)
    expected = blur_reference(X, KERNEL)
    np.testing.assert_allclose(op(t64(X.reshape(2, -1))).numpy(), expected.reshape(2, -1),
                               atol=1e-12)


@pytest.mark.parametrize("kernel", [2, 0, np.ones((2, 3)), np.ones(3)])
def test_blur_rejects_even_or_bad_kernels(kernel):
    with pytest.raises(ValueError, match="odd"):
        Blur((5, 5), kernel=kernel)


def test_blur_pinv_size_limit():
    op = Blur((65, 65))
    with pytest.raises(ValueError, match="H\\*W <= 4096"):
        op.pinv(torch.zeros(1, 65 * 65))


def test_inpainting_matches_boolean_indexing():
    X = np.random.default_rng(6).standard_normal((4, 2, 6, 6))
    op = Inpainting((2, 6, 6), box=(1, 2, 4, 5))
    mask = np.ones((6, 6), dtype=bool)
    mask[1:4, 2:5] = False
    np.testing.assert_array_equal(op(t64(X.reshape(4, -1))).numpy(), X[:, :, mask].reshape(4, -1))
    assert op.output_dim == 2 * (36 - 9)
    back = op.adjoint(op(t64(X.reshape(4, -1)))).numpy().reshape(X.shape)
    np.testing.assert_array_equal(back, X * mask)


def test_inpainting_2d_mask_is_shared_by_channels():
    mask = np.random.default_rng(7).random((5, 5)) > 0.5
    op = Inpainting((3, 5, 5), mask=mask)
    X = np.random.default_rng(8).standard_normal((2, 3, 5, 5))
    np.testing.assert_array_equal(op(t64(X.reshape(2, -1))).numpy(), X[:, :, mask].reshape(2, -1))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one"),
        ({"box": (0, 0, 2, 2), "mask": np.ones((4, 4), bool)}, "exactly one"),
        ({"box": (2, 0, 1, 3)}, "0 <= r0 < r1 <= 4"),
        ({"box": (0, 0, 4, 4)}, "no observed"),
        ({"mask": np.ones((4, 4))}, "boolean"),
        ({"mask": np.ones((3, 3), bool)}, "shape"),
    ],
)
def test_inpainting_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Inpainting((4, 4), **kwargs)


def test_random_mask_reproducible_and_rate():
    a = RandomMask((2, 40, 40), p=0.3, random_state=0)
    b = RandomMask((2, 40, 40), p=0.3, random_state=0)
    c = RandomMask((2, 40, 40), p=0.3, random_state=1)
    assert torch.equal(a.indices, b.indices)
    assert not torch.equal(a.indices, c.indices)
    missing = 1 - a.output_dim / a.n_features
    assert abs(missing - 0.3) < 0.05
    kept = np.zeros(a.n_features, bool)
    kept[a.indices.numpy()] = True
    kept = kept.reshape(2, 40, 40)
    np.testing.assert_array_equal(kept[0], kept[1])
    with pytest.raises(ValueError, match="probability"):
        RandomMask((4, 4), p=1.0)


def test_colorization_is_channel_mean():
    X = np.random.default_rng(9).standard_normal((3, 3, 4, 5))
    op = Colorization((3, 4, 5))
    np.testing.assert_allclose(op(t64(X.reshape(3, -1))).numpy(), X.mean(axis=1).reshape(3, -1),
                               atol=1e-12)
    with pytest.raises(ValueError, match="3-channel"):
        Colorization((4, 5))


def test_super_resolution_is_block_mean_and_pinv_upsamples():
    X = np.random.default_rng(10).standard_normal((2, 3, 6, 9))
    op = SuperResolution((3, 6, 9), factor=3)
    expected = X.reshape(2, 3, 2, 3, 3, 3).mean(axis=(3, 5))
    np.testing.assert_allclose(op(t64(X.reshape(2, -1))).numpy(), expected.reshape(2, -1),
                               atol=1e-12)
    up = np.repeat(np.repeat(expected, 3, axis=2), 3, axis=3)
    np.testing.assert_allclose(op.pinv(t64(expected.reshape(2, -1))).numpy(), up.reshape(2, -1),
                               atol=1e-12)
    with pytest.raises(ValueError, match="dividing"):
        SuperResolution((3, 6, 8), factor=3)


def test_compressed_sensing_statistics_and_reproducibility():
    op = CompressedSensing(100, 60, random_state=0)
    A = op.matrix.numpy()
    assert A.shape == (60, 100) and op.input_shape == (100,)
    assert abs(A.var() * 60 - 1) < 0.1
    assert abs(A.mean()) < 0.01
    same = CompressedSensing(100, 60, random_state=0).matrix
    other = CompressedSensing(100, 60, random_state=1).matrix
    assert torch.equal(op.matrix, same)
    assert not torch.equal(op.matrix, other)


def test_compressed_sensing_accepts_image_shape():
    op = CompressedSensing((1, 4, 4), 5, random_state=0)
    assert op.input_shape == (1, 4, 4) and op.n_features == 16 and op.output_dim == 5


def test_tomography_conserves_mass():
    op = LimitedAngleTomography((9, 7), angles=30)
    np.testing.assert_allclose(op.angles, np.linspace(30, 150, 30))
    assert op.n_detectors == int(np.ceil(np.sqrt(2) * 9))
    assert op.output_dim == 30 * op.n_detectors
    X = np.random.default_rng(11).random((3, 63))
    sinogram = op(t64(X)).numpy().reshape(3, 30, op.n_detectors)
    np.testing.assert_allclose(sinogram.sum(-1), np.repeat(X.sum(1, keepdims=True), 30, 1),
                               rtol=1e-10)


def test_tomography_axis_aligned_views():
    op = LimitedAngleTomography((1, 8, 8), angles=[0.0, 90.0])
    X = np.random.default_rng(12).random((8, 8))
    sinogram = op(t64(X.reshape(1, -1))).numpy().reshape(2, op.n_detectors)
    # 12 bins; the 8 pixel centres land on bins 2..9.
    np.testing.assert_allclose(sinogram[0, 2:10], X.sum(0), atol=1e-10)
    np.testing.assert_allclose(sinogram[1, 2:10], X.sum(1)[::-1], atol=1e-10)
    np.testing.assert_allclose(sinogram[:, [0, 1, 10, 11]], 0, atol=1e-10)


def test_tomography_errors():
    with pytest.raises(ValueError, match="single-channel"):
        LimitedAngleTomography((3, 8, 8))
    with pytest.raises(ValueError, match="angles"):
        LimitedAngleTomography((8, 8), angles=[])


def test_matrix_operator_from_dense_sparse_and_linear_operator():
    A = np.random.default_rng(13).standard_normal((6, 12))
    A[A < 0.3] = 0
    ops = [
        MatrixOperator(A, input_shape=(3, 2, 2)),
        MatrixOperator(scipy.sparse.csr_matrix(A), input_shape=(3, 2, 2)),
        MatrixOperator(aslinearoperator(A), input_shape=(3, 2, 2)),
    ]
    x = t64(np.random.default_rng(14).standard_normal((2, 12)))
    y = t64(np.random.default_rng(15).standard_normal((2, 6)))
    for op in ops:
        assert op.input_shape == (3, 2, 2) and op.output_dim == 6
        np.testing.assert_allclose(op(x).numpy(), x.numpy() @ A.T, atol=1e-12)
        for method in ("forward", "adjoint", "pinv"):
            arg = x if method == "forward" else y
            assert torch.equal(getattr(op, method)(arg), getattr(ops[0], method)(arg))
    with pytest.raises(ValueError, match="does not match"):
        MatrixOperator(A, input_shape=(5,))
    with pytest.raises(ValueError, match="finite 2-D"):
        MatrixOperator(np.ones(4))


# FunctionOperator ----------------------------------------------------------------------


def test_function_operator_nonlinear():
    W = torch.as_tensor(W_LIN)
    op = FunctionOperator(lambda x: torch.tanh(x @ W.T.to(x)), (7,))
    assert op.output_dim == 5 and op.is_linear is False
    X = np.random.default_rng(16).standard_normal((3, 7))
    np.testing.assert_allclose(op(t64(X)).numpy(), np.tanh(X @ W_LIN.T), atol=1e-12)
    np.testing.assert_allclose(op.measure(X), np.tanh(X @ W_LIN.T), atol=1e-12)
    with pytest.raises(NotImplementedError, match="linear=True"):
        op.adjoint(torch.zeros(1, 5))
    with pytest.raises(NotImplementedError, match="linear=True"):
        op.pinv(torch.zeros(1, 5))


def test_function_operator_is_differentiable():
    module = torch.nn.Sequential(linear_module(W_LIN), torch.nn.Tanh())
    op = FunctionOperator(module, 7)
    x = torch.zeros(2, 7, dtype=torch.float64, requires_grad=True)
    op(x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), np.tile(W_LIN.sum(0), (2, 1)), atol=1e-12)
    assert dict(op.named_parameters()).keys() == {"fn.0.weight"}


def test_function_operator_linear_adjoint_is_transpose():
    op = FunctionOperator(linear_module(W_LIN), 7, linear=True)
    assert op.is_linear and op.output_dim == 5
    y = np.random.default_rng(17).standard_normal((4, 5))
    np.testing.assert_allclose(op.adjoint(t64(y)).detach().numpy(), y @ W_LIN, atol=1e-12)
    with pytest.raises(ValueError, match="output_dim"):
        FunctionOperator(linear_module(W_LIN), 7, output_dim=4, linear=True)


# measure() and check_measurements() ----------------------------------------------------


def test_measure_shape_dtype_and_noiseless_values():
    op = SuperResolution((1, 4, 4), factor=2)
    X = np.random.default_rng(18).standard_normal((5, 16))
    Y = op.measure(X)
    assert Y.shape == (5, 4) and Y.dtype == np.float64
    np.testing.assert_allclose(Y, X.reshape(5, 2, 2, 2, 2).mean(axis=(2, 4)).reshape(5, 4),
                               atol=1e-12)
    assert op.measure(X.astype(np.float32)).dtype == np.float32


def test_measure_noise_reproducible_with_requested_std():
    op = Denoising(50)
    X = np.zeros((400, 50))
    Y1 = op.measure(X, noise_std=0.3, random_state=0)
    Y2 = op.measure(X, noise_std=0.3, random_state=0)
    Y3 = op.measure(X, noise_std=0.3, random_state=1)
    np.testing.assert_array_equal(Y1, Y2)
    assert not np.array_equal(Y1, Y3)
    assert abs(Y1.std() - 0.3) < 0.01
    assert abs(Y1.mean()) < 0.01


@pytest.mark.parametrize(
    "X, noise_std, match",
    [
        (np.zeros(16), 0.0, "2-D array"),
        (np.full((2, 16), np.nan), 0.0, "NaN"),
        (np.zeros((2, 15)), 0.0, "15 columns but 16"),
        (np.zeros((2, 16)), -0.1, "noise_std must be a finite number >= 0"),
        (np.zeros((0, 16)), 0.0, "no rows"),
        (np.array([["a"] * 16]), 0.0, "real numbers"),
    ],
)
def test_measure_errors(X, noise_std, match):
    with pytest.raises(ValueError, match=match):
        Denoising((1, 4, 4)).measure(X, noise_std=noise_std)


def test_check_measurements():
    op = Inpainting((4, 4), box=(0, 0, 2, 2))
    Y = np.ones((3, 12))
    assert op.check_measurements(Y) is not None
    np.testing.assert_array_equal(op.check_measurements(Y), Y)
    for bad, match in [
        (np.ones(12), "2-D array"),
        (np.ones((3, 16)), "16 columns but 12"),
        (np.full((3, 12), np.inf), "infinite"),
    ]:
        with pytest.raises(ValueError, match=match):
            op.check_measurements(bad)

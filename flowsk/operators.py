"""Forward operators ``y = A(x) + noise`` for inverse problems.

Every operator is a :class:`torch.nn.Module` acting on *flat* batches: an image of
shape ``(C, H, W)`` is flattened in C order to ``n = C*H*W`` features, so
``forward`` maps ``(B, n) -> (B, m)`` and ``adjoint``/``pinv`` map ``(B, m) -> (B, n)``.
Matrices and index sets are stored as float64/long buffers (``.to(device)`` moves
them) and cast to the input's dtype and device on use.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from math import prod

import numpy as np
import scipy.sparse
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike, NDArray
from scipy.sparse.linalg import LinearOperator
from sklearn.utils import check_random_state
from torch import nn

from ._typing import RandomStateLike

__all__ = [
    "Operator",
    "Denoising",
    "Blur",
    "Inpainting",
    "RandomMask",
    "Colorization",
    "CompressedSensing",
    "SuperResolution",
    "LimitedAngleTomography",
    "MatrixOperator",
    "FunctionOperator",
]

#: An int ``n`` or a tuple of positive ints.
Shape = int | tuple[int, ...]

# Largest per-channel pixel count for which Blur materialises its dense pseudo-inverse.
_MAX_BLUR_PINV_PIXELS = 4096


def _as_shape(shape):
    """An int ``n`` or a tuple of positive ints -> tuple."""
    shape = (shape,) if np.ndim(shape) == 0 else tuple(shape)
    try:
        shape = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise ValueError(f"shape must be an int or a tuple of ints, got {shape!r}.") from None
    if not shape or min(shape) < 1:
        raise ValueError(f"shape must contain positive sizes, got {shape!r}.")
    return shape


def _image_shape(shape):
    """``(H, W)`` or ``(C, H, W)`` -> ``(C, H, W)``."""
    shape = _as_shape(shape)
    if len(shape) == 2:
        shape = (1,) + shape
    if len(shape) != 3:
        raise ValueError(f"image_shape must be (H, W) or (C, H, W), got {shape!r}.")
    return shape


def _pinv(matrix):
    """Moore-Penrose pseudo-inverse of an ``(m, n)`` array or tensor: float64 ``(n, m)``."""
    return torch.linalg.pinv(torch.as_tensor(matrix, dtype=torch.float64))


def _apply(x, matrix):
    """Rows of ``x`` times ``matrix^T``: ``(B, k) -> (B, matrix.shape[0])``."""
    return x @ matrix.to(x).T


def _check_array(X, width, name, fix):
    """Validate a 2-D finite numeric array with ``width`` columns."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array of shape (n_samples, {width}), got an array of "
            f"shape {X.shape}; pass a single sample as X.reshape(1, -1)."
        )
    if X.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold real numbers, got dtype {X.dtype}.")
    if X.shape[0] == 0:
        raise ValueError(f"{name} has no rows; pass at least one sample.")
    if not np.isfinite(X).all():
        raise ValueError(f"{name} contains NaN or infinite values; remove or impute them first.")
    if X.shape[1] != width:
        raise ValueError(f"{name} has {X.shape[1]} columns but {width} are expected; {fix}.")
    return X


class Operator(nn.Module):
    """Base class: a forward model acting on flat batches.

    Attributes
    ----------
    input_shape : tuple
        Shape of one unknown, ``(C, H, W)`` for images or ``(n,)``.
    n_features : int
        ``prod(input_shape)``.
    output_dim : int
        Number of measurements ``m``.
    is_linear : bool
    """

    is_linear = True

    def __init__(self, input_shape: Shape, output_dim: int) -> None:
        super().__init__()
        self.input_shape = _as_shape(input_shape)
        self.n_features = prod(self.input_shape)
        self.output_dim = int(output_dim)

    def extra_repr(self) -> str:
        return f"input_shape={self.input_shape}, output_dim={self.output_dim}"

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``A^T y``: ``(B, m) -> (B, n)``."""
        raise NotImplementedError

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        """Minimum-norm least-squares solution ``A^+ y``: ``(B, m) -> (B, n)``."""
        raise NotImplementedError

    def _images(self, x):
        """``(B, n) -> (B, C, H, W)``."""
        return x.reshape(x.shape[0], *self.input_shape)

    def _device(self):
        tensor = next(iter(self.buffers()), None)
        if tensor is None:
            tensor = next(iter(self.parameters()), None)
        return torch.device("cpu") if tensor is None else tensor.device

    def measure(self, X: ArrayLike, noise_std: float = 0.0,
                random_state: RandomStateLike = None) -> NDArray[np.floating]:
        """Simulate measurements ``Y = A(X) + noise_std * N(0, I)``.

        Parameters
        ----------
        X : ndarray of shape (n_samples, n_features)
            Flattened (C order) unknowns.
        noise_std : float, default=0.0
            Standard deviation of the additive Gaussian noise.
        random_state : int, RandomState instance or None
            Seeds the noise.

        Returns
        -------
        Y : ndarray of shape (n_samples, output_dim)
            float64 if ``X`` is float64, float32 otherwise.
        """
        X = _check_array(
            X, self.n_features, "X",
            f"flatten each sample of shape {self.input_shape} in C order, "
            f"e.g. X.reshape(len(X), -1)",
        )
        noise_std = float(noise_std)
        if not (np.isfinite(noise_std) and noise_std >= 0):
            raise ValueError(
                f"noise_std must be a finite number >= 0 (the standard deviation of the "
                f"additive Gaussian noise), got {noise_std}; use 0.0 for noiseless measurements."
            )
        dtype = np.float64 if X.dtype == np.float64 else np.float32
        x = torch.as_tensor(np.ascontiguousarray(X, dtype=dtype), device=self._device())
        with torch.no_grad():
            Y = self(x).cpu().numpy()
        if noise_std > 0:
            rng = check_random_state(random_state)
            with np.errstate(over="ignore"):
                Y = Y + (noise_std * rng.standard_normal(Y.shape)).astype(dtype)
        if not np.isfinite(Y).all():
            raise ValueError(
                f"the measurements overflow {np.dtype(dtype).name}: X or noise_std is too large "
                f"for this operator; rescale X or use float64 input."
            )
        return Y

    def check_measurements(self, Y: ArrayLike) -> np.ndarray:
        """Validate measurements ``Y`` of shape ``(n_samples, output_dim)``; return it."""
        return _check_array(
            Y, self.output_dim, "Y",
            f"pass measurements produced by this operator ({type(self).__name__} with "
            f"output_dim={self.output_dim})",
        )


class Denoising(Operator):
    """Identity ``A = I``; ``input_shape`` is an int ``n`` or a shape tuple."""

    def __init__(self, input_shape: Shape) -> None:
        shape = _as_shape(input_shape)
        super().__init__(shape, prod(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        return y


class Blur(Operator):
    """Per-channel 2-D convolution with zero padding and 'same' output size.

    ``kernel`` is an odd int ``k`` (a ``k x k`` mean filter) or a 2-D array with odd
    sides, applied as a true convolution (as in ``scipy.signal.convolve2d``).
    ``pinv`` materialises the ``(H*W, H*W)`` per-channel matrix and its
    pseudo-inverse on first use; it needs ``H*W <= 4096``.
    """

    def __init__(self, image_shape: tuple[int, ...], kernel: int | ArrayLike = 3) -> None:
        shape = _image_shape(image_shape)
        if np.ndim(kernel) == 0:
            size = operator.index(kernel)
            if size < 1 or size % 2 == 0:
                raise ValueError(f"An int kernel must be a positive odd size, got {size}.")
            kernel = np.full((size, size), 1.0 / size**2)
        kernel = np.asarray(kernel, dtype=np.float64)
        if kernel.ndim != 2 or not all(s % 2 for s in kernel.shape):
            raise ValueError(
                f"kernel must be a 2-D array with odd sides, got shape {kernel.shape}; "
                f"pad it with a row/column of zeros."
            )
        if not np.isfinite(kernel).all():
            raise ValueError("kernel contains NaN or infinite values.")
        super().__init__(shape, prod(shape))
        self.register_buffer("kernel", torch.as_tensor(kernel))
        self.register_buffer("channel_pinv", None, persistent=False)

    def _correlate(self, x, weight):
        C, H, W = self.input_shape
        images = x.reshape(-1, 1, H, W)
        padding = (weight.shape[0] // 2, weight.shape[1] // 2)
        out = F.conv2d(images, weight.to(x)[None, None], padding=padding)
        return out.reshape(x.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._correlate(x, self.kernel.flip(0, 1))

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self._correlate(y, self.kernel)

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        C, H, W = self.input_shape
        if self.channel_pinv is None:
            if H * W > _MAX_BLUR_PINV_PIXELS:
                raise ValueError(
                    f"Blur.pinv materialises an (H*W, H*W) matrix, limited to H*W <= "
                    f"{_MAX_BLUR_PINV_PIXELS}; got {H}x{W}. Use smaller images or an iterative "
                    "solver."
                )
            eye = torch.eye(H * W, dtype=torch.float64, device=self.kernel.device)
            self.channel_pinv = _pinv(self.forward(eye).T)
        return _apply(y.reshape(-1, H * W), self.channel_pinv).reshape(y.shape[0], -1)


class Inpainting(Operator):
    """Keep the observed entries: ``(B, n) -> (B, m)``, ``m`` = number observed.

    Give exactly one of ``box=(r0, c0, r1, c1)`` (rows ``r0:r1``, columns ``c0:c1``
    missing in all channels) or ``mask``, a boolean array of shape ``(C, H, W)`` or
    ``(H, W)`` (shared by all channels), True where observed.
    ``adjoint`` = ``pinv`` scatters back with zeros at missing entries.
    """

    def __init__(self, image_shape: tuple[int, ...],
                 box: tuple[int, int, int, int] | None = None,
                 mask: ArrayLike | None = None) -> None:
        shape = _image_shape(image_shape)
        C, H, W = shape
        if (box is None) == (mask is None):
            raise ValueError("Inpainting needs exactly one of box=(r0, c0, r1, c1) or mask=.")
        if box is not None:
            r0, c0, r1, c1 = (operator.index(b) for b in box)
            if not (0 <= r0 < r1 <= H and 0 <= c0 < c1 <= W):
                raise ValueError(
                    f"box=(r0, c0, r1, c1) must satisfy 0 <= r0 < r1 <= {H} and "
                    f"0 <= c0 < c1 <= {W}, got {tuple(box)}."
                )
            mask = np.ones((H, W), dtype=bool)
            mask[r0:r1, c0:c1] = False
        mask = np.asarray(mask)
        if mask.dtype != bool or mask.shape not in (shape, (H, W)):
            raise ValueError(
                f"mask must be a boolean array of shape {shape} or {(H, W)} (True = observed), "
                f"got dtype {mask.dtype} and shape {mask.shape}; convert with mask.astype(bool)."
            )
        indices = np.flatnonzero(np.broadcast_to(mask, shape))
        if indices.size == 0:
            raise ValueError("The mask leaves no observed entry; keep at least one pixel.")
        super().__init__(shape, indices.size)
        self.register_buffer("indices", torch.as_tensor(indices, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.indices.to(x.device))

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        zeros = y.new_zeros(y.shape[0], self.n_features)
        return zeros.index_copy(1, self.indices.to(y.device), y)

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        return self.adjoint(y)


class RandomMask(Inpainting):
    """Inpainting where each pixel (all channels) is missing with probability ``p``."""

    def __init__(self, image_shape: tuple[int, ...], p: float,
                 random_state: RandomStateLike = None) -> None:
        C, H, W = _image_shape(image_shape)
        if not 0 <= p < 1:
            raise ValueError(f"p is the probability that a pixel is missing and must be in "
                             f"[0, 1), got {p}.")
        observed = check_random_state(random_state).random_sample((H, W)) >= p
        super().__init__((C, H, W), mask=observed)
        self.p = p


class Colorization(Operator):
    """RGB to gray: channel mean, ``(B, 3*H*W) -> (B, H*W)``.

    ``A A^T = I/3``, so ``pinv(y) = 3 A^T y`` copies ``y`` into every channel.
    """

    def __init__(self, image_shape: tuple[int, ...]) -> None:
        C, H, W = _image_shape(image_shape)
        if C != 3:
            raise ValueError(f"Colorization needs 3-channel images (3, H, W), got {(C, H, W)}.")
        super().__init__((C, H, W), H * W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], 3, -1).mean(1)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.pinv(y) / 3

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        return y.repeat(1, 3)


class SuperResolution(Operator):
    """Mean pooling over ``factor x factor`` blocks: ``(B, C*H*W) -> (B, C*(H/f)*(W/f))``.

    Each row of ``A`` has ``f^2`` entries ``1/f^2`` on disjoint supports, so
    ``A A^T = I/f^2``: ``adjoint`` is nearest upsampling divided by ``f^2`` and
    ``pinv = f^2 A^T`` is plain nearest upsampling.
    """

    def __init__(self, image_shape: tuple[int, ...], factor: int) -> None:
        C, H, W = _image_shape(image_shape)
        factor = operator.index(factor)
        if factor < 1 or H % factor or W % factor:
            raise ValueError(
                f"factor must be a positive int dividing the image height and width, got "
                f"factor={factor} for {H}x{W} images; crop or pad the images first."
            )
        super().__init__((C, H, W), C * (H // factor) * (W // factor))
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self._images(x), self.factor).reshape(x.shape[0], -1)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.pinv(y) / self.factor**2

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        C, H, W = self.input_shape
        f = self.factor
        low = y.reshape(y.shape[0], C, H // f, W // f)
        return low.repeat_interleave(f, 2).repeat_interleave(f, 3).reshape(y.shape[0], -1)


class MatrixOperator(Operator):
    """Dense linear operator ``y = A x`` with ``A`` of shape ``(m, n)``.

    ``A`` is a NumPy array, a SciPy sparse matrix or a
    :class:`scipy.sparse.linalg.LinearOperator` (materialised once as ``A @ I``).
    Buffers ``matrix`` ``(m, n)`` and ``matrix_pinv`` ``(n, m)`` are float64.
    ``input_shape`` defaults to ``(n,)``.
    """

    def __init__(self, A: ArrayLike | scipy.sparse.spmatrix | LinearOperator,
                 input_shape: Shape | None = None) -> None:
        if isinstance(A, LinearOperator):
            A = A.matmat(np.eye(A.shape[1]))
        elif scipy.sparse.issparse(A):
            A = A.toarray()
        A = np.asarray(A, dtype=np.float64)
        if A.ndim != 2 or A.size == 0 or not np.isfinite(A).all():
            raise ValueError(f"A must be a non-empty finite 2-D matrix, got shape {A.shape}.")
        shape = _as_shape(A.shape[1] if input_shape is None else input_shape)
        if prod(shape) != A.shape[1]:
            raise ValueError(f"input_shape {shape} does not match the {A.shape[1]} columns of A.")
        super().__init__(shape, A.shape[0])
        self.register_buffer("matrix", torch.as_tensor(A))
        self.register_buffer("matrix_pinv", _pinv(A))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _apply(x, self.matrix)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y @ self.matrix.to(y)

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        return _apply(y, self.matrix_pinv)


class CompressedSensing(MatrixOperator):
    """Gaussian sensing matrix, ``A_ij ~ N(0, 1/m)`` with ``m = n_measurements``.

    ``n_features`` is an int or a shape tuple.
    """

    def __init__(self, n_features: Shape, n_measurements: int,
                 random_state: RandomStateLike = None) -> None:
        shape = _as_shape(n_features)
        m = operator.index(n_measurements)
        if m < 1:
            raise ValueError(f"n_measurements must be a positive int, got {m}.")
        rng = check_random_state(random_state)
        super().__init__(rng.standard_normal((m, prod(shape))) / np.sqrt(m), shape)


def _radon_matrix(H, W, angles, n_detectors):
    """Parallel-beam projection matrix ``(len(angles) * n_detectors, H*W)``.

    Pixel centres (origin at the image centre, y pointing up) are projected onto the
    detector axis ``t = x cos(theta) + y sin(theta)``; each pixel's unit mass is split
    between the two nearest bin centres by linear interpolation, so every projection
    sums to the image sum.
    """
    rows, cols = np.mgrid[:H, :W]
    x = (cols - (W - 1) / 2).ravel()
    y = ((H - 1) / 2 - rows).ravel()
    theta = np.deg2rad(np.asarray(angles, dtype=np.float64))[:, None]
    position = x * np.cos(theta) + y * np.sin(theta) + (n_detectors - 1) / 2
    low = np.floor(position).astype(np.int64)
    frac = position - low
    offset = (np.arange(len(angles)) * n_detectors)[:, None]
    pixel = np.broadcast_to(np.arange(H * W), position.shape)
    matrix = np.zeros((len(angles) * n_detectors, H * W))
    np.add.at(matrix, (offset + low, pixel), 1 - frac)
    np.add.at(matrix, (offset + low + 1, pixel), frac)
    return matrix


class LimitedAngleTomography(MatrixOperator):
    """Parallel-beam Radon transform of single-channel images over a limited range.

    ``angles`` is an array of angles in degrees, or an int ``k`` for ``k`` views evenly
    spaced over 30-150 degrees (endpoints included). The output is the sinogram
    ``(len(angles), n_detectors)`` flattened in C order, with
    ``n_detectors = ceil(sqrt(2) * max(H, W))`` unit-spaced bins. Angle 0 sums over
    rows (projects onto the column axis); angle 90 sums over columns, bins ordered
    from the bottom row to the top row.
    """

    def __init__(self, image_shape: tuple[int, ...], angles: int | ArrayLike = 30) -> None:
        C, H, W = _image_shape(image_shape)
        if C != 1:
            raise ValueError(
                f"LimitedAngleTomography supports single-channel images (1, H, W), got "
                f"{(C, H, W)}; convert to gray or use one operator per channel."
            )
        if np.ndim(angles) == 0:
            angles = np.linspace(30.0, 150.0, operator.index(angles))
        angles = np.asarray(angles, dtype=np.float64)
        if angles.ndim != 1 or angles.size == 0 or not np.isfinite(angles).all():
            raise ValueError(f"angles must be a positive int or a non-empty 1-D array of "
                             f"degrees, got {angles!r}.")
        n_detectors = int(np.ceil(np.sqrt(2) * max(H, W)))
        super().__init__(_radon_matrix(H, W, angles, n_detectors), (C, H, W))
        self.angles = angles
        self.n_detectors = n_detectors


class FunctionOperator(Operator):
    """Wrap a differentiable torch callable ``fn: (B, n) -> (B, m)`` acting row-wise.

    ``fn`` is probed on batches of the dtype/device of its first parameter when it is an
    ``nn.Module`` with parameters, else of the default dtype on CPU: once on zeros to
    infer ``output_dim`` when not given, and, if ``linear=True``, on the identity to
    materialise ``A = fn(I)^T`` for the ``matrix_pinv`` buffer. ``adjoint`` (a
    vector-Jacobian product at zero) and ``pinv`` need ``linear=True``.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], input_shape: Shape,
                 output_dim: int | None = None, linear: bool = False) -> None:
        shape = _as_shape(input_shape)
        n = prod(shape)
        param = next(iter(fn.parameters()), None) if isinstance(fn, nn.Module) else None
        options = {
            "dtype": torch.get_default_dtype() if param is None else param.dtype,
            "device": "cpu" if param is None else param.device,
        }
        with torch.no_grad():
            matrix = fn(torch.eye(n, **options)).T if linear else None
            if output_dim is None:
                output_dim = (matrix.shape[0] if linear
                              else fn(torch.zeros(1, n, **options)).shape[-1])
        super().__init__(shape, output_dim)
        if linear and matrix.shape[0] != self.output_dim:
            raise ValueError(f"fn returns {matrix.shape[0]} outputs but output_dim={output_dim}.")
        self.fn = fn
        self.is_linear = bool(linear)
        self.register_buffer("matrix_pinv", _pinv(matrix) if linear else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def _require_linear(self, method):
        if not self.is_linear:
            raise NotImplementedError(
                f"FunctionOperator.{method} is only defined for linear fn; construct it "
                f"with linear=True if fn is linear."
            )

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        self._require_linear("adjoint")
        with torch.enable_grad():
            x = y.new_zeros(y.shape[0], self.n_features, requires_grad=True)
            return torch.autograd.grad(self.fn(x), x, y, create_graph=True)[0]

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        self._require_linear("pinv")
        return _apply(y, self.matrix_pinv)

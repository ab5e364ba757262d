"""Linear bijections: ActNorm, LU-parametrised invertible 1x1 convolution, the two fused
(Glow's step opening), permutations.

All act on dimension 1 of ``(B, C)`` vectors or ``(B, C, H, W)`` images; the log-det of an
image layer counts every spatial position.
"""
import torch
from torch import nn
from torch.nn import functional as F

from .base import Bijection


def spatial_size(x):
    """Positions per channel of ``(B, C[, H, W])``: 1 for vectors, ``H * W`` for images."""
    return x[0, 0].numel()


def channel_mix(x, w, bias=None):
    """Channel mixing ``(B, C_in[, H, W]) -> (B, C_out[, H, W])``, ``w x + bias`` with ``w``
    ``(C_out, C_in)`` and ``bias`` ``(C_out,)``. Images go through one matrix product over the
    channels-last view (the output is channels-last), which runs faster on CPUs than a 1x1
    convolution (``benchmarks/image_speed.py``)."""
    if x.dim() == 2:
        return F.linear(x, w, bias)
    return F.linear(x.permute(0, 2, 3, 1), w, bias).permute(0, 3, 1, 2)


def _per_channel(v, x):
    """Reshape a ``(C,)`` vector to broadcast against ``x``."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


class ActNorm(Bijection):
    """Per-channel affine ``z = (x - b) * exp(s)``, initialised from the first training batch
    so that its output has zero mean and unit variance. The ``initialized`` buffer is saved
    with the model, so a loaded model never re-initialises. Training-mode calls read the
    buffer (a host synchronisation on a GPU) only until it is seen set."""

    def __init__(self, channels):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))
        self._seen_initialized = False

    @torch.no_grad()
    def _initialize(self, x):
        dims = [0] + list(range(2, x.dim()))
        self.bias.copy_(x.mean(dims))
        self.log_scale.copy_(-torch.log(x.std(dims, unbiased=False) + 1e-6))
        self.initialized.fill_(True)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._seen_initialized = False  # the loaded buffer is read again

    def start(self, x):
        """Initialise from ``x``, the input of the first training call."""
        if self.training and not self._seen_initialized:
            if not bool(self.initialized):
                self._initialize(x)
            self._seen_initialized = True

    def forward(self, x, context=None):
        self.start(x)
        z = (x - _per_channel(self.bias, x)) * _per_channel(self.log_scale.exp(), x)
        logdet = self.log_scale.sum() * spatial_size(x)
        return z, logdet.expand(x.shape[0])

    def inverse(self, z, context=None):
        x = z * _per_channel(torch.exp(-self.log_scale), z) + _per_channel(self.bias, z)
        logdet = -self.log_scale.sum() * spatial_size(z)
        return x, logdet.expand(z.shape[0])


class InvertibleLinear(Bijection):
    """Invertible channel mixing ``W = P L (U + diag(sign * exp(log_s)))`` (Glow's LU 1x1 conv).

    It starts at a random rotation (Glow's choice) or, given ``permutation`` (an ordering of
    ``range(channels)``), at that permutation, which keeps each feature whole: a coupling then
    sees the features' own marginals (half the digits' pixels are exactly 0), which a spline
    fits far better than those of rotated mixtures (``benchmarks/density.py``). Both
    directions are computed from the current weights (the inverse by two triangular solves,
    no matrix inverse), so they agree whatever changed the weights: an optimizer step,
    ``load_state_dict`` or an edit of ``.data``, in either mode.
    The ONNX export, which has no triangular solve, reads the buffer ``weight_inverse``
    instead; ``eval()`` fills it, and :func:`exporters.to_onnx` calls ``eval()`` on the copy
    it exports.
    """

    def __init__(self, channels, generator=None, permutation=None):
        super().__init__()
        if permutation is None:
            start, _ = torch.linalg.qr(torch.randn(channels, channels, generator=generator))
        else:
            order = torch.as_tensor(permutation, dtype=torch.long)
            if not torch.equal(order.sort().values, torch.arange(channels)):
                raise ValueError(f"permutation must order range({channels}), got {permutation}")
            start = torch.eye(channels)[order]
        p, lower, upper = torch.linalg.lu(start)
        diag = torch.diagonal(upper)
        self.register_buffer("perm", p)
        self.register_buffer("sign", torch.sign(diag))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("weight_inverse", torch.eye(channels))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(diag.abs()))

    def _factors(self):
        """The triangular factors ``(L, U)`` of ``W = P L U``."""
        eye = torch.eye(self.lower.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower * self.lower_mask + eye
        # eye * v rather than torch.diag(v): same matrix, and aten::diag has no ONNX export
        upper = self.upper * self.lower_mask.T + eye * (self.sign * self.log_s.exp())
        return lower, upper

    def weight(self):
        """``W`` ``(C, C)``."""
        lower, upper = self._factors()
        return self.perm @ lower @ upper

    def inverse_weight(self):
        """``W^-1 = U^-1 L^-1 P^T`` ``(C, C)`` by two triangular solves."""
        lower, upper = self._factors()
        solve = torch.linalg.solve_triangular
        return solve(upper, solve(lower, self.perm.T, upper=False, unitriangular=True),
                     upper=True)

    def train(self, mode=True):
        if not mode:
            with torch.no_grad():
                self.weight_inverse.copy_(self.inverse_weight())
        return super().train(mode)

    def forward(self, x, context=None):
        logdet = self.log_s.sum() * spatial_size(x)
        return channel_mix(x, self.weight()), logdet.expand(x.shape[0])

    def inverse_matrix(self):
        """``W^-1`` for an inverse pass: the ``weight_inverse`` buffer in an ONNX export, the
        triangular solves otherwise."""
        return self.weight_inverse if torch.onnx.is_in_onnx_export() else self.inverse_weight()

    def inverse(self, z, context=None):
        logdet = -self.log_s.sum() * spatial_size(z)
        return channel_mix(z, self.inverse_matrix()), logdet.expand(z.shape[0])


class ActNormLinear(Bijection):
    """:class:`ActNorm` then :class:`InvertibleLinear` (submodules ``norm`` and ``mix``, each
    with its own start), fused into one affine channel mixing
    ``z = W (exp(s) * (x - b)) = (W diag(exp(s))) x - W (exp(s) * b)``: one matrix product
    and its backward instead of the four element-wise passes over the data that the two
    layers take apart (``benchmarks/image_speed.py``)."""

    def __init__(self, channels, generator=None, permutation=None):
        super().__init__()
        self.norm = ActNorm(channels)
        self.mix = InvertibleLinear(channels, generator, permutation)

    def _logdet(self, x):
        return (self.norm.log_scale.sum() + self.mix.log_s.sum()) * spatial_size(x)

    def forward(self, x, context=None):
        self.norm.start(x)
        w = self.mix.weight() * self.norm.log_scale.exp()
        return channel_mix(x, w, -(w @ self.norm.bias)), self._logdet(x).expand(x.shape[0])

    def inverse(self, z, context=None):
        w_inv = self.mix.inverse_matrix() * torch.exp(-self.norm.log_scale)[:, None]
        return channel_mix(z, w_inv, self.norm.bias), -self._logdet(z).expand(z.shape[0])


class Permutation(Bijection):
    """Fixed permutation of dimension 1 (volume preserving)."""

    def __init__(self, perm):
        super().__init__()
        perm = torch.as_tensor(perm, dtype=torch.long)
        self.register_buffer("perm", perm)
        self.register_buffer("perm_inverse", torch.argsort(perm))

    @classmethod
    def reverse(cls, channels):
        return cls(torch.arange(channels - 1, -1, -1))

    @classmethod
    def swap(cls, channels):
        """Exchange the two halves (NICE's swap, used by Chavez's flow steps)."""
        return cls(torch.roll(torch.arange(channels), channels // 2))

    def forward(self, x, context=None):
        return x.index_select(1, self.perm), x.new_zeros(x.shape[0])

    def inverse(self, z, context=None):
        return z.index_select(1, self.perm_inverse), z.new_zeros(z.shape[0])

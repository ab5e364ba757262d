"""Injective layers and TRUMPET-style injective flows (Kothari et al.).

Direction convention. An injective layer maps a LOW-dimensional input to a HIGH-dimensional
output in the generator direction, which, as everywhere in ``flowsk.nn``, is :meth:`inverse`:

- ``inverse(z) -> (x, logdet)`` widens (latent to data), with
  ``logdet = 0.5 * log det(J^T J)`` per sample, ``J = dx/dz``;
- ``forward(x) -> (z, -logdet)`` narrows with the Tikhonov-regularised left pseudo-inverse
  ``(W^T W + lambda I)^{-1} W^T``; on the range of the layer (and ``lambda = 0``) it is the
  exact inverse.

Because the layers keep the ``forward``/``inverse`` interface they compose with the bijections
in a :class:`~flowsk.nn.base.Chain`.

:class:`InjectiveFlow` is a TRUMPET: an injective part ``g`` (bijective revnet steps, up-squeezes
and injective layers, plus an optional logit at the data end) and a low-dimensional bijective
flow ``h`` with a standard-normal base, ``G = g o h``. Its density on the ``d``-dimensional
range needs ``0.5 log det(J^T J)`` of ``g`` (``J`` of shape ``n x d``), in one of three ways:

- ``"exact"``: ``J`` from ``d`` Jacobian-vector products, then a float64 slogdet;
- ``"stochastic"``: Algorithm 2 of the paper (:func:`stochastic_half_logdet`);
- ``"bound"``: one pass, what :meth:`InjectiveFlow.generate` returns and the solvers
  optimise. It sums eq. (6)'s layer-wise terms ``0.5 log det(J_k^T J_k)`` over the layers of
  ``g`` before the logit, and adds the logit's term over the tangent space (below).

The layer-wise sum. Appendix B.1 of the paper states ``log det(J^T J) <= sum_k log det(J_k^T
J_k)``. Its interlacing step only bounds the compressed data-side factor by the *top*
``d`` eigenvalues, so the inequality is guaranteed when no Jacobian on the data side of an
injective layer has a singular value below 1, and can fail otherwise (``J_2 = e_1``,
``J_1 = diag(a, b)`` with ``b < 1`` gives ``a^2 > a^2 b^2``). It is exact when the layers on
the data side of each injective layer are isometries -- e.g. a single injective layer at the
data end after any low-dimensional bijection (eq. 12), or rotations and identity couplings.
Square layers on the data side of an injective layer are counted over all their directions
where only the ``d`` tangent ones matter, so after training the sum can be tens of nats off
(``benchmarks/injective.py`` measures it): a proxy, not a bound.

The logit. With ``J = D M`` (``D`` the diagonal Jacobian of the logit's inverse, ``M = Q R``
the Jacobian of the layers before it, ``Q`` an orthonormal basis of the tangent space),
``0.5 log det(J^T J) = 0.5 log det(M^T M) + 0.5 log det(Q^T D^2 Q)``: the logit acts on the
``d`` tangent directions only, not on all ``n`` coordinates (``sum_i log D_ii`` would count
every pixel, saturated background pixels most). By Poincare's separation theorem the ``k``-th
eigenvalue of ``Q^T D^2 Q`` is at most the ``k``-th largest of ``D^2``, so the bound takes the
sum of the ``d`` largest log-slopes of the logit: an upper bound on its term (so its
log-density is a lower bound), equal to it when the tangent space is spanned by the ``d``
coordinates of largest slope, and one pass.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

from .base import Bijection, Chain, Flow, standard_normal_log_prob
from .builders import image_step, vector_step
from .linear import InvertibleLinear, channel_mix, spatial_size
from .multiscale import Logit, Reshape, Squeeze

ACTIVATIONS = ("linear", "relu")
LOGDET_METHODS = ("bound", "exact", "stochastic")


def _orthonormal_columns(rows, cols, generator=None):
    """A random ``(rows, cols)`` matrix with orthonormal columns (``rows >= cols``)."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=generator))
    return q * torch.sign(torch.diagonal(r))


class Injection(Bijection):
    """Base of the injective layers: ``inverse`` widens (generator), ``forward`` is a left
    pseudo-inverse. Only invertible on the range of ``inverse``."""


class InjectiveLinear(Injection):
    """Linear injective layer ``x = W z`` with ``W`` of shape ``(out_features, in_features)``.

    Acts on dimension 1: a dense layer on vectors ``(B, C)`` and an injective 1x1 convolution
    on images ``(B, C, H, W)`` (``C = in_features`` channels in, ``out_features`` out; the
    log-det then counts every pixel). ``out_features >= in_features``.

    ``forward`` applies the Tikhonov-regularised left pseudo-inverse
    ``W^+ = (W^T W + regularization * I)^{-1} W^T``. In eval mode ``W^+`` and
    ``0.5 log det(W^T W)`` are cached as buffers (computed in float64), so generation and
    projection need no matrix inverse or factorisation and the layer exports to ONNX; in
    training mode both are computed from the current weight. The weight starts with
    orthonormal columns (``W^T W = I``).
    """

    def __init__(self, in_features, out_features, regularization=1e-6, generator=None):
        super().__init__()
        if not 1 <= in_features <= out_features:
            raise ValueError(f"an injective layer needs 1 <= in_features <= out_features, got "
                             f"{in_features} -> {out_features}")
        if regularization < 0:
            raise ValueError(f"regularization must be >= 0, got {regularization}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.regularization = float(regularization)
        self.weight = nn.Parameter(self._init_weight(generator))
        rows = self.weight.shape[1]
        self.register_buffer("weight_pinv", torch.zeros(rows, self.weight.shape[0]))
        self.register_buffer("half_logdet", torch.zeros(()))
        self._refresh_cache()

    def _init_weight(self, generator):
        return _orthonormal_columns(self.out_features, self.in_features, generator)

    # -- weight-derived quantities ---------------------------------------------------------
    def pseudo_inverse(self, weight=None):
        """``(W^T W + lambda I)^{-1} W^T``, differentiable in ``W``."""
        w = self.weight if weight is None else weight
        gram = w.T @ w
        if self.regularization:
            gram = gram + self.regularization * torch.eye(
                gram.shape[0], dtype=w.dtype, device=w.device)
        return torch.linalg.solve(gram, w.T)

    def weight_half_logdet(self, weight=None):
        """``0.5 log det(W^T W) = sum_i log s_i(W)`` via a QR factorisation."""
        w = self.weight if weight is None else weight
        r = torch.linalg.qr(w, mode="reduced")[1]
        return torch.log(torch.diagonal(r).abs()).sum()

    @torch.no_grad()
    def _refresh_cache(self):
        w = self.weight.detach().double()
        self.weight_pinv.copy_(self.pseudo_inverse(w))
        self.half_logdet.copy_(self.weight_half_logdet(w))

    def train(self, mode=True):
        if not mode:
            self._refresh_cache()
        return super().train(mode)

    def _pinv_and_logdet(self):
        if self.training:
            return self.pseudo_inverse(), self.weight_half_logdet()
        return self.weight_pinv, self.half_logdet

    # -- the layer ---------------------------------------------------------------------------
    def inverse(self, z, context=None):
        """Generator direction ``(B, in[, H, W]) -> (B, out[, H, W])``."""
        half_logdet = self.weight_half_logdet() if self.training else self.half_logdet
        logdet = half_logdet * spatial_size(z)
        return channel_mix(z, self.weight), logdet.expand(z.shape[0])

    def forward(self, x, context=None):
        """Pseudo-inverse ``(B, out[, H, W]) -> (B, in[, H, W])``."""
        pinv, half_logdet = self._pinv_and_logdet()
        logdet = -half_logdet * spatial_size(x)
        return channel_mix(x, pinv), logdet.expand(x.shape[0])

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"regularization={self.regularization:g}")


class InjectiveReLULinear(InjectiveLinear):
    """ReLU injective layer of the paper: ``x = ReLU([W; -W] z)``, ``W`` of shape
    ``(out_features / 2, in_features)``, so ``out_features`` must be even and at least
    ``2 * in_features``.

    Exactly one of each pair ``(w_i z, -w_i z)`` passes the ReLU, so ``[I, -I] x = W z`` and
    the left inverse is ``z = W^+ [I, -I] x``; ``J^T J = W^T W``, hence the same log-det as
    the linear variant. Works on vectors and (as a 1x1 convolution) on images.
    """

    def __init__(self, in_features, out_features, regularization=1e-6, generator=None):
        if out_features % 2 or out_features < 2 * in_features:
            raise ValueError(f"the ReLU injective layer needs an even out_features >= 2 * "
                             f"in_features, got {in_features} -> {out_features}")
        super().__init__(in_features, out_features, regularization, generator)

    def _init_weight(self, generator):
        return _orthonormal_columns(self.out_features // 2, self.in_features, generator)

    def inverse(self, z, context=None):
        half_logdet = self.weight_half_logdet() if self.training else self.half_logdet
        logdet = half_logdet * spatial_size(z)
        wz = channel_mix(z, self.weight)
        return F.relu(torch.cat([wz, -wz], 1)), logdet.expand(z.shape[0])

    def forward(self, x, context=None):
        pinv, half_logdet = self._pinv_and_logdet()
        half = x.shape[1] // 2
        logdet = -half_logdet * spatial_size(x)
        return channel_mix(x[:, :half] - x[:, half:], pinv), logdet.expand(x.shape[0])


class Flatten(Bijection):
    """``(B, *shape) -> (B, prod(shape))`` in the data-to-latent direction (a reversed
    :class:`~flowsk.nn.multiscale.Reshape`)."""

    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x, context=None):
        return x.reshape(x.shape[0], -1), x.new_zeros(x.shape[0])

    def inverse(self, z, context=None):
        return z.reshape(z.shape[0], *self.shape), z.new_zeros(z.shape[0])


def injective_layer(in_features, out_features, activation="linear", regularization=1e-6,
                    generator=None):
    """An injective layer ``in -> out`` (generator direction). ``activation="relu"`` gives the
    ReLU variant where its shape constraint allows it and the linear variant elsewhere."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation == "relu" and out_features % 2 == 0 and out_features >= 2 * in_features:
        return InjectiveReLULinear(in_features, out_features, regularization, generator)
    return InjectiveLinear(in_features, out_features, regularization, generator)


# -- the injective flow ------------------------------------------------------------------------
class InjectiveFlow(nn.Module):
    """A TRUMPET ``G = g o h``: flat latent ``(B, latent_dim)`` to flat data ``(B, n_features)``.

    Parameters
    ----------
    injective : Chain
        ``g^+`` in the data-to-latent order, flat ``(B, n_features)`` to ``(B, latent_dim)``;
        holds the injective layers.
    bijective : Chain
        ``h^{-1}`` on ``(B, latent_dim)``, the low-dimensional flow.
    n_features, latent_dim : int
    logit : Logit or None
        Bijection at the data end for bounded data.

    Mirrors :class:`~flowsk.nn.base.Flow`: ``inverse(z) -> (x, logdet)`` is the generator
    (``logdet`` the one-pass ``"bound"`` of the module docstring, standing in for
    ``0.5 log det(J^T J)``), ``forward(x) -> (z, logdet)`` the left pseudo-inverse with the
    negated bound,
    ``generate(z) -> (x, log p(x))``, ``log_prob(x)``, and ``project(x) = G(G^+(x))`` onto
    the range.
    """

    def __init__(self, injective, bijective, n_features, latent_dim, logit=None):
        super().__init__()
        self.logit = logit
        self.injective = injective
        self.bijective = bijective
        self.n_features = int(n_features)
        self.latent_dim = int(latent_dim)
        self.data_range = None if logit is None else (logit.lo, logit.hi)

    # -- the parts -------------------------------------------------------------------------
    @property
    def latent_flow(self):
        """``h`` as a :class:`~flowsk.nn.base.Flow` on ``(B, latent_dim)`` (shares weights)."""
        return Flow(self.bijective, self.latent_dim)

    def encode_manifold(self, x, context=None):
        """``g^+``: ``(B, n_features) -> (z' (B, latent_dim), logdet)`` (the bound)."""
        logdet = x.new_zeros(x.shape[0])
        if self.logit is not None:
            x = self.logit(x)[0]
            logdet = -self.logit_tangent_bound(x)
        z, ld = self.injective(x, context)
        return z, logdet + ld

    def decode_manifold(self, z, context=None):
        """``g``: ``(B, latent_dim) -> (x (B, n_features), logdet)`` (the bound)."""
        x, logdet = self.injective.inverse(z, context)
        if self.logit is not None:
            logdet = logdet + self.logit_tangent_bound(x)
            x = self.logit.inverse(x)[0]
        return x, logdet

    def logit_tangent_bound(self, t):
        """The bound's logit term at pre-logit values ``t (B, n_features)``: the sum of the
        ``latent_dim`` largest log-slopes of the logit's inverse, ``(B,)`` (an upper bound on
        ``0.5 log det(Q^T D^2 Q)``, see the module docstring)."""
        return self.logit.inverse_log_slope(t).topk(self.latent_dim, dim=1).values.sum(1)

    # -- Flow's interface ------------------------------------------------------------------
    def forward(self, x, context=None):
        z, logdet = self.encode_manifold(x, context)
        z, ld = self.bijective(z, context)
        return z, logdet + ld

    def inverse(self, z, context=None):
        z, logdet = self.bijective.inverse(z, context)
        x, ld = self.decode_manifold(z, context)
        return x, logdet + ld

    def generate(self, z, context=None):
        """``(B, d) -> (x (B, n), log p(x) (B,))`` in one generator pass, with the one-pass
        ``"bound"`` for the log-det (see the module docstring): what ``map`` and
        ``likelihood`` optimise."""
        x, logdet = self.inverse(z, context)
        return x, standard_normal_log_prob(z) - logdet

    clip = Flow.clip

    def decode(self, z, context=None):
        """The signals ``G(z)`` clipped to ``data_range``: ``(B, d) -> (B, n)``."""
        return self.clip(self.inverse(z, context)[0])

    def project(self, x, context=None):
        """``G(G^+(x))``, clipped to ``data_range``: the projection of ``(B, n_features)`` onto
        the range."""
        z, _ = self.encode_manifold(x, context)
        return self.clip(self.decode_manifold(z, context)[0])

    def log_prob(self, x, context=None, logdet="bound", n_probes=16, n_terms=20,
                 n_power_iterations=20, generator=None):
        """``(B, n) -> (B,)`` log-density of the projection of ``x`` on the manifold, eq. (2).

        ``logdet``: ``"bound"`` one pass of ``G^+`` from ``x`` (what ``iflow-l`` optimises;
        see the module docstring for when it is exact); ``"exact"`` the slogdet of the full
        Jacobian of ``g`` at the projection (``latent_dim`` Jacobian-vector products);
        ``"stochastic"`` the truncated Neumann series with Hutchinson probes (Algorithm 2; see
        :func:`stochastic_half_logdet`). The log-det of ``h`` is exact in every case.
        """
        if logdet not in LOGDET_METHODS:
            raise ValueError(f"logdet must be one of {LOGDET_METHODS}, got {logdet!r}")
        if logdet == "bound":
            z, ld = self.forward(x, context)
            return standard_normal_log_prob(z) + ld
        z_manifold, _ = self.encode_manifold(x, context)
        z, ld_h = self.bijective(z_manifold, context)
        if logdet == "exact":
            half = self.exact_half_logdet(z_manifold, context)
        else:
            half = self.stochastic_half_logdet(z_manifold, context, n_probes=n_probes,
                                               n_terms=n_terms,
                                               n_power_iterations=n_power_iterations,
                                               generator=generator)
        return standard_normal_log_prob(z) + ld_h - half.to(z.dtype)

    # -- log det(J_g^T J_g) ----------------------------------------------------------------
    def manifold_map(self, context=None):
        """``g`` as a function ``(B, latent_dim) -> (B, n_features)`` (the smooth map whose
        Jacobian the log-dets describe)."""
        return lambda z: self.decode_manifold(z, context)[0]

    def exact_half_logdet(self, z, context=None, max_entries=2**25):
        """``0.5 log det(J_g^T J_g)`` at ``z`` ``(B, latent_dim)``, exact (float64 slogdet),
        in chunks of at most ``max_entries`` Jacobian entries. Returns ``(B,)``."""
        rows = max(1, max_entries // (self.n_features * self.latent_dim))
        parts = []
        for i in range(0, len(z), rows):
            part_context = None if context is None else context[i:i + rows]
            jac = jacobian(self.manifold_map(part_context), z[i:i + rows])
            parts.append(0.5 * torch.linalg.slogdet(_gram(jac))[1])
        return torch.cat(parts) if parts else z.new_zeros(0, dtype=torch.float64)

    def stochastic_half_logdet(self, z, context=None, **kwargs):
        """Algorithm 2 estimate of ``0.5 log det(J_g^T J_g)`` at ``z``; see
        :func:`stochastic_half_logdet`."""
        return stochastic_half_logdet(self.manifold_map(context), z, **kwargs)


def _gram(jac):
    jac = jac.double()
    return jac.transpose(1, 2) @ jac


class _Linearization:
    """Jacobian products of a batch-wise ``fn: (B, d) -> (B, n)`` at ``z``, from one retained
    graph: ``jvp(u) = J u`` by the double-backward trick and ``vjp(y) = J^T y``."""

    def __init__(self, fn, z):
        with torch.enable_grad():
            self.z = z.detach().requires_grad_(True)
            self.y = fn(self.z)
            self.w = torch.zeros_like(self.y, requires_grad=True)
            self.gz = torch.autograd.grad(self.y, self.z, self.w, create_graph=True)[0]

    def jvp(self, u):
        with torch.enable_grad():
            return torch.autograd.grad(self.gz, self.w, u, retain_graph=True)[0].detach()

    def vjp(self, v):
        with torch.enable_grad():
            return torch.autograd.grad(self.y, self.z, v, retain_graph=True)[0].detach()

    def gram(self, u):
        """``J^T J u``."""
        return self.vjp(self.jvp(u))


def jacobian(fn, z):
    """Per-sample Jacobian ``(B, n, d)`` of a batch-wise ``fn: (B, d) -> (B, n)`` (each sample
    depending only on its own input), by ``d`` Jacobian-vector products."""
    lin = _Linearization(fn, z)
    eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
    return torch.stack([lin.jvp(eye[i].expand_as(z)) for i in range(z.shape[1])], 2)


def stochastic_half_logdet(fn, z, n_probes=16, n_terms=20, n_power_iterations=20,
                           generator=None, max_rows=4096):
    """Estimate ``0.5 log det(J^T J)`` per sample of a batch-wise ``fn: (B, d) -> (B, n)``.

    Algorithm 2 of Kothari et al.: with ``beta = 0.9 / lambda_max(J^T J)`` (power iteration,
    ``n_power_iterations`` steps),
    ``log det(J^T J) = -sum_k tr((I - beta J^T J)^k) / k - d log beta``, the series truncated
    after ``n_terms`` terms and each trace estimated by Hutchinson's estimator averaged over
    ``n_probes`` Rademacher vectors. Every product is one Jacobian-vector and one
    vector-Jacobian product; probes are evaluated together, ``max_rows`` rows per pass.
    The truncation bias is ``sum_{k > n_terms} tr(A^k) / k`` with ``A = I - beta J^T J``: small
    when ``J^T J`` is well conditioned (exactly zero up to ``0.1^n_terms`` when ``J`` is a
    multiple of an isometry). Returns ``(B,)``.
    """
    if min(n_probes, n_terms, n_power_iterations, max_rows) < 1:
        raise ValueError("n_probes, n_terms, n_power_iterations and max_rows must be >= 1")
    z = z.detach()
    b, d = z.shape
    tiny = torch.finfo(z.dtype).tiny

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=z.dtype).to(z.device)

    gram = _Linearization(fn, z).gram
    u = randn(b, d)
    u = u / u.norm(dim=1, keepdim=True).clamp_min(tiny)
    lam = u.new_ones(b)
    for _ in range(n_power_iterations):
        u = gram(u)
        lam = u.norm(dim=1)
        u = u / lam.clamp_min(tiny)[:, None]
    beta = 0.9 / lam.clamp_min(tiny)

    total = z.new_zeros(b)
    per_pass = max(1, max_rows // b)
    done = 0
    while done < n_probes:
        m = min(per_pass, n_probes - done)
        gram_m = gram if m == 1 else _Linearization(fn, z.repeat(m, 1)).gram
        beta_m = beta.repeat(m)[:, None]
        v = torch.where(randn(m * b, d) < 0, -1.0, 1.0).to(z.dtype)
        w, acc = v, z.new_zeros(m * b)
        for k in range(1, n_terms + 1):
            w = w - beta_m * gram_m(w)
            acc = acc - (w * v).sum(1) / k
        total = total + acc.reshape(m, b).sum(0)
        done += m
    logdet = total / n_probes - d * torch.log(beta)
    return 0.5 * logdet


# -- builders ----------------------------------------------------------------------------------
def _check_shapes(n_features, latent_dim, image_shape):
    if not 1 <= latent_dim < n_features:
        raise ValueError(f"latent_dim must satisfy 1 <= latent_dim < n_features, got "
                         f"latent_dim={latent_dim} with n_features={n_features}")
    if image_shape is not None:
        shape = tuple(int(s) for s in image_shape)
        if len(shape) != 3 or math.prod(shape) != n_features:
            raise ValueError(f"image_shape {tuple(image_shape)} does not match "
                             f"n_features={n_features}")


def _image_levels(image_shape, latent_dim):
    """Plan of the image stages, data-to-latent: a list of ``(squeeze, (c, h, w), c_new)``."""
    c, h, w = image_shape
    plan = []
    while c * h * w > latent_dim:
        squeeze = h % 2 == 0 and w % 2 == 0
        c2, h2, w2 = (4 * c, h // 2, w // 2) if squeeze else (c, h, w)
        c_new = max(c2 // 2, -(-latent_dim // (h2 * w2)))
        if not squeeze and (c2 < 2 or c_new >= c2):
            break
        plan.append((squeeze, (c2, h2, w2), c_new))
        c, h, w = c_new, h2, w2
    return plan, (c, h, w)


def build_injective_flow(n_features, latent_dim, *, image_shape=None, activation="linear",
                         coupling="affine", n_steps=2, n_latent_steps=4, hidden_features=64,
                         data_range=None, regularization=1e-6, random_state=0):
    """A TRUMPET :class:`InjectiveFlow` from ``latent_dim`` to ``n_features``.

    Data-to-latent layout. Images ``(C, H, W)``: levels of [squeeze (when H and W are even),
    ``n_steps`` Glow steps (ActNorm, LU 1x1 conv, CNN coupling), injective 1x1 convolution
    that halves the channels] -- i.e. in the generator direction an injective step doubles the
    channels and an up-squeeze trades them for resolution -- while the halved size stays
    ``>= latent_dim``; the last level takes ``ceil(latent_dim / (H W))`` channels. Whatever is
    left is flattened and reduced with dense injective layers. Vectors: ``n_steps`` MLP-coupling
    steps, then dense injective layers that halve the width, with ``n_steps`` steps between.
    The low-dimensional flow ``h`` has ``n_latent_steps`` MLP-coupling steps.

    ``random_state`` (int) seeds the initial weights of the injective layers and the random
    rotations; conditioner weights come from torch's global generator.
    """
    _check_shapes(n_features, latent_dim, image_shape)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    generator = torch.Generator().manual_seed(int(random_state))
    layers = []
    size = n_features
    if image_shape is not None:
        image_shape = tuple(int(s) for s in image_shape)
        plan, shape = _image_levels(image_shape, latent_dim)
        if plan:
            layers.append(Reshape(image_shape))
            for squeeze, (c, h, w), c_new in plan:
                if squeeze:
                    layers.append(Squeeze())
                if c >= 2:
                    for _ in range(n_steps):
                        layers += image_step("glow", (c, h, w), coupling, hidden_features,
                                             generator)
                if c_new < c:
                    layers.append(injective_layer(c_new, c, activation, regularization,
                                                  generator))
            layers.append(Flatten(shape))
            size = math.prod(shape)
    if size == n_features and n_steps:  # vectors, or images no level could handle
        # A rotation first: ActNorm initialises per feature from data, and a constant feature
        # (an always-black pixel) would get a huge scale; rotated features are never constant.
        layers.append(InvertibleLinear(size, generator))
        for _ in range(n_steps):
            layers += vector_step(size, coupling, hidden_features, generator=generator)
    while size > latent_dim:
        new = max(latent_dim, -(-size // 2))
        layers.append(injective_layer(new, size, activation, regularization, generator))
        if new > latent_dim:
            for _ in range(n_steps):
                layers += vector_step(new, coupling, hidden_features, generator=generator)
        size = new
    bijective = []
    for _ in range(n_latent_steps):
        bijective += vector_step(latent_dim, coupling, hidden_features, generator=generator)
    logit = Logit(data_range) if data_range is not None else None
    return InjectiveFlow(Chain(*layers), Chain(*bijective), n_features, latent_dim, logit)

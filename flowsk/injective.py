"""InjectiveFlowPrior: a TRUMPET injective flow as a scikit-learn density estimator."""
from __future__ import annotations

import copy
import numbers
from typing import Literal, NoReturn

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from sklearn.utils.validation import check_is_fitted

from ._training import train
from ._typing import Coupling, DataRange, Device, ImageShape, OnNonfinite, RandomStateLike
from ._validation import check_choice, check_finite_output, check_int, is_real
from .nn.coupling import TRANSFORMS
from .nn.injective import ACTIVATIONS, LOGDET_METHODS, build_injective_flow
from .prior import BaseFlowEstimator


class InjectiveFlowPrior(BaseFlowEstimator):
    """Injective normalizing-flow prior (TRUMPET, Kothari et al.) on flat data.

    The generator ``G = g o h`` maps a ``latent_dim``-dimensional standard normal through a
    low-dimensional flow ``h`` and an injective network ``g`` that widens to ``n_features``;
    its range is a ``latent_dim``-dimensional manifold. ``G`` has an exact left inverse on its
    range (Tikhonov-regularised pseudo-inverses of the injective layers), so
    ``project(X) = G(G^+(X))`` is a fast projection onto the manifold.

    ``fit`` has two phases: the injective part ``g`` minimises ``||x - g(g^+(x))||^2`` (MSE
    phase), then ``h`` is fitted by maximum likelihood on the pre-images ``g^+(x)`` (ML phase).

    Parameters
    ----------
    image_shape : (C, H, W) or None
        Images use injective 1x1 convolutions, up-squeezes and Glow steps; None gives dense
        injective layers and MLP-coupling steps for vector data.
    latent_dim : int or None
        Dimension of the latent space, ``< n_features``. None means ``n_features // 2``.
    activation : {"linear", "relu"}
        Variant of the injective layers; ``"relu"`` falls back to linear where the ReLU
        layer's shape constraint (``out >= 2 * in``, even) does not hold.
    coupling : {"affine", "additive", "spline", "robust-spline"}
    n_steps : int
        Bijective revnet steps at each stage of the injective part.
    n_latent_steps : int
        Steps (>= 1) of the low-dimensional flow ``h``, the part the ML phase fits.
    hidden_features : int
        Width of the conditioner networks.
    data_range : (lo, hi) or None
        Bounded data: a logit layer at the data end keeps samples in range.
    regularization : float
        Tikhonov parameter ``lambda`` of the pseudo-inverses ``(W^T W + lambda I)^{-1} W^T``.
        On the range, ``G^+(G(z))`` misses ``z`` by about ``lambda / s_min(W)^2``.
    logdet : {"auto", "exact", "stochastic", "bound"}
        How ``score_samples`` computes ``0.5 log det(J^T J)`` of ``g``: the exact slogdet of the
        Jacobian (``latent_dim`` Jacobian-vector products per sample), Algorithm 2's
        stochastic estimate (truncated Neumann series + Hutchinson, ``n_probes`` probes,
        ``n_terms`` terms: about ``2 n_probes n_terms`` products), or the one-pass bound
        (layer-wise terms plus the logit's tangent term; tens of nats off after training, see
        :mod:`flowsk.nn.injective`). ``"auto"`` is ``"exact"`` when ``latent_dim <= n_probes
        * n_terms`` (then no more costly than the estimate, and without its error) and
        ``"stochastic"`` otherwise. The solvers always use the bound: ``map`` and
        ``likelihood`` through the generator, ``iflow-l`` through ``G^+``.
    max_epochs : int
        Epoch budget of each training phase (early stopping usually ends them sooner).
    batch_size, learning_rate, weight_decay, validation_fraction, n_iter_no_change
        The training loop: Adam, early stopping on a validation split shared by both phases.
    on_nonfinite : {"raise", "warn"}
    device : "auto", "cpu", "cuda", ...
    random_state : int, RandomState or None
    verbose : int

    Attributes
    ----------
    flow_ : flowsk.nn.injective.InjectiveFlow
    n_features_in_ : int
    latent_dim_ : int
    history_ : dict
        ``train_loss``/``val_loss`` of the ML phase (negative log-likelihood of the pre-images
        per sample) and ``mse_train_loss``/``mse_val_loss`` of the MSE phase (squared
        reconstruction error per sample).
    best_epoch_, mse_best_epoch_ : int
    latent_covariance_ : sklearn.covariance.EmpiricalCovariance
        Mean and covariance of the training data's latent codes, for
        :func:`flowsk.metrics.ood_score`.
    training_range_ : (float, float)
        Smallest and largest value of the training data.
    device_ : torch.device
    """

    def __init__(self, image_shape: ImageShape | None = None, latent_dim: int | None = None,
                 activation: Literal["linear", "relu"] = "linear",
                 coupling: Coupling = "affine", n_steps: int = 2, n_latent_steps: int = 4,
                 hidden_features: int = 64, data_range: DataRange | None = None,
                 regularization: float = 1e-6,
                 logdet: Literal["auto", "exact", "stochastic", "bound"] = "auto",
                 n_probes: int = 16, n_terms: int = 20, max_epochs: int = 40,
                 batch_size: int = 64, learning_rate: float = 3e-3, weight_decay: float = 0.0,
                 validation_fraction: float = 0.1, n_iter_no_change: int = 10,
                 on_nonfinite: OnNonfinite = "raise", device: Device = "auto",
                 random_state: RandomStateLike = None, verbose: int = 0) -> None:
        self.image_shape = image_shape
        self.latent_dim = latent_dim
        self.activation = activation
        self.coupling = coupling
        self.n_steps = n_steps
        self.n_latent_steps = n_latent_steps
        self.hidden_features = hidden_features
        self.data_range = data_range
        self.regularization = regularization
        self.logdet = logdet
        self.n_probes = n_probes
        self.n_terms = n_terms
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.on_nonfinite = on_nonfinite
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # -- validation -------------------------------------------------------------------------
    def _check_params(self):
        self._check_common_params()
        if self.latent_dim is not None and (not isinstance(self.latent_dim, numbers.Integral)
                                            or self.latent_dim < 1):
            raise ValueError(f"latent_dim must be a positive int or None, "
                             f"got {self.latent_dim!r}")
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("coupling", self.coupling, TRANSFORMS)
        for name, low in (("n_steps", 0), ("n_latent_steps", 1), ("hidden_features", 1),
                          ("n_probes", 1), ("n_terms", 1)):
            check_int(name, getattr(self, name), low)
        if not is_real(self.regularization, 0):
            raise ValueError(f"regularization must be finite and >= 0, "
                             f"got {self.regularization!r}")
        check_choice("logdet", self.logdet, ("auto", *LOGDET_METHODS))

    def _resolve_latent_dim(self, n_features):
        d = n_features // 2 if self.latent_dim is None else int(self.latent_dim)
        if n_features < 2 or not 1 <= d < n_features:
            raise ValueError(f"latent_dim must be smaller than the number of features: got "
                             f"latent_dim={self.latent_dim} with n_features={n_features}; "
                             "an injective flow needs latent_dim < n_features (and "
                             "n_features >= 2)")
        return d

    # -- fitting ----------------------------------------------------------------------------
    @staticmethod
    def _mse_loss(g, batch):
        z, _ = g.encode_manifold(batch)
        x, _ = g.decode_manifold(z)
        return ((batch - x) ** 2).sum(1).mean()

    @staticmethod
    def _nll_loss(h, batch):
        return -h.log_prob(batch).mean()

    def _build_flow(self, n_features, seed):
        """The untrained flow on ``n_features``; ``seed`` (int) seeds its random layers."""
        return build_injective_flow(
            n_features, self._resolve_latent_dim(n_features), image_shape=self.image_shape,
            activation=self.activation, coupling=self.coupling, n_steps=self.n_steps,
            n_latent_steps=self.n_latent_steps, hidden_features=self.hidden_features,
            data_range=self.data_range, regularization=self.regularization,
            random_state=seed)

    def _fit(self, X, rng):
        self.flow_ = self._build_flow(X.shape[1], rng.randint(2**31 - 1)).to(self.device_)
        self.latent_dim_ = self.flow_.latent_dim
        data = self._tensor(X)
        options = {"batch_size": self.batch_size, "learning_rate": self.learning_rate,
                   "weight_decay": self.weight_decay,
                   "validation_fraction": self.validation_fraction,
                   "n_iter_no_change": self.n_iter_no_change, "verbose": self.verbose}
        # Both phases draw the same validation split: each gets a copy of the same stream.
        split_rng = copy.deepcopy(rng)
        manifold = _Manifold(self.flow_)
        mse_history, self.mse_best_epoch_ = train(
            manifold, self._mse_loss, data, max_epochs=self.max_epochs, rng=split_rng,
            desc="InjectiveFlowPrior (MSE)", **options)
        self.flow_.eval()
        with torch.no_grad():
            pre_images = torch.cat([self.flow_.encode_manifold(data[i:i + 4096])[0]
                                    for i in range(0, len(data), 4096)])
        history, self.best_epoch_ = train(
            self.flow_.latent_flow, self._nll_loss, pre_images, max_epochs=self.max_epochs,
            rng=copy.deepcopy(rng), desc="InjectiveFlowPrior (ML)", **options)
        self.history_ = {"train_loss": history["train_loss"], "val_loss": history["val_loss"],
                         "mse_train_loss": mse_history["train_loss"],
                         "mse_val_loss": mse_history["val_loss"]}
        self.flow_.eval()

    # -- public methods -----------------------------------------------------------------------
    def _logdet_method(self):
        """The method ``score_samples`` uses: ``logdet`` with ``"auto"`` resolved."""
        check_is_fitted(self)
        if self.logdet != "auto":
            return self.logdet
        return "exact" if self.latent_dim_ <= self.n_probes * self.n_terms else "stochastic"

    def score_samples(self, X: ArrayLike) -> NDArray[np.float64]:
        """Log-density of the projection of each sample on the ``latent_dim``-dimensional
        manifold, nats: ``(n, n_features) -> (n,)``, eq. (2) of the paper with the ``logdet``
        method. A density on the manifold, not on ``R^n_features``: not comparable with a
        bijective prior's ``score_samples``. The stochastic estimator's probes are seeded from
        ``random_state`` (0 unless it is an int), so repeated calls agree."""
        method = self._logdet_method()
        X = self._validate(X)
        generator = torch.Generator().manual_seed(
            0 if not isinstance(self.random_state, numbers.Integral) else
            int(self.random_state))
        return check_finite_output(self._map(lambda x: self.flow_.log_prob(
            x, logdet=method, n_probes=self.n_probes, n_terms=self.n_terms,
            generator=generator), X), self.on_nonfinite, "log-likelihoods")

    def bits_per_dim(self, X: ArrayLike, n_bits: int | None = None) -> NoReturn:
        """Not defined: ``score_samples`` is a density on a ``latent_dim``-dimensional
        manifold, and bits per dimension of ``R^n_features`` would compare it with densities
        of a different dimension."""
        raise NotImplementedError(
            "bits_per_dim compares densities on R^n_features; an InjectiveFlowPrior's "
            "score_samples is a density on its latent_dim-dimensional manifold")

    def project(self, X: ArrayLike) -> NDArray[np.floating]:
        """Projection ``G(G^+(x))`` onto the range: ``(n, n_features) -> (n, n_features)``."""
        check_is_fitted(self)
        X = self._validate(X)
        P = self._map(self.flow_.project, X, X.dtype)
        return check_finite_output(P, self.on_nonfinite, "projections")

    def reconstruction_error(self, X: ArrayLike) -> NDArray[np.float64]:
        """Relative error ``||x - G(G^+(x))|| / ||x||`` per sample: ``(n,)``."""
        check_is_fitted(self)
        X = self._validate(X)
        P = self.project(X)
        return np.linalg.norm(X - P, axis=1) / np.maximum(np.linalg.norm(X, axis=1),
                                                          np.finfo(float).tiny)


class _Manifold(torch.nn.Module):
    """The trainable part of the MSE phase: ``g`` (and the data-end logit) of a flow."""

    def __init__(self, flow):
        super().__init__()
        self.logit = flow.logit
        self.injective = flow.injective
        self._flow = [flow]  # not a submodule: its low-dimensional flow stays untouched

    def encode_manifold(self, x):
        return self._flow[0].encode_manifold(x)

    def decode_manifold(self, z):
        return self._flow[0].decode_manifold(z)

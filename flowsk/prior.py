"""FlowPrior: a normalizing flow as a scikit-learn density estimator and transformer."""
from __future__ import annotations

import copy
import numbers
from typing import TypeVar

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from scipy.linalg import pinvh
from sklearn.base import BaseEstimator, DensityMixin, TransformerMixin
from sklearn.covariance import EmpiricalCovariance
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from ._training import as_tensor, resolve_device, train
from ._typing import (
    Architecture,
    Coupling,
    DataRange,
    Device,
    ImageShape,
    OnNonfinite,
    RandomStateLike,
)
from ._validation import (
    check_choice,
    check_finite_output,
    check_float32_range,
    check_int,
    is_real,
)
from .metrics import bits_per_dim
from .nn.builders import ARCHITECTURES, IMAGE_ARCHITECTURES, build_flow
from .nn.coupling import TRANSFORMS

_CHUNK = 4096
_MAX_BINS = 100
#: FlowPrior's settings for ``None``, per architecture family and coupling. ``affine`` and
#: ``spline`` were chosen on a validation split of the digits (``python benchmarks/density.py
#: --select``, results/density_select.json); ``additive`` and ``robust-spline`` take the
#: affine settings; ``maf`` takes the size of zuko's NSF in the density benchmark. Vector
#: (``mlp``) flows are small-data models that overfit quickly, image flows share their
#: convolution weights over space.
_MLP = {"n_steps": 8, "hidden_features": 128, "learning_rate": 6e-4, "weight_decay": 1.0}
_IMAGE = {"n_steps": 4, "hidden_features": 32, "learning_rate": 1e-3, "weight_decay": 1e-4}
_MAF = {"n_steps": 5, "hidden_features": 128, "learning_rate": 1e-3, "weight_decay": 1e-3}
_AUTO = {
    "mlp": {"affine": _MLP, "additive": _MLP, "robust-spline": {**_MLP, "bound": 3.0},
            "spline": {**_MLP, "hidden_features": 64, "n_bins": 8, "bound": 5.0,
                       "spline_affine": False}},
    "image": {"affine": _IMAGE, "additive": _IMAGE, "robust-spline": {**_IMAGE, "bound": 3.0},
              "spline": {**_IMAGE, "n_bins": 8, "bound": 5.0, "spline_affine": False}},
    "maf": {"affine": _MAF, "additive": _MAF, "robust-spline": {**_MAF, "bound": 3.0},
            "spline": {**_MAF, "n_bins": 8, "bound": 5.0, "spline_affine": False}},
}


def dequantize(batch: torch.Tensor, width: float,
               data_range: DataRange | None = None) -> torch.Tensor:
    """``batch (B, D)`` plus uniform noise of ``width`` centred on each value, reflected back
    into ``data_range`` at its bounds (clamping would put a point mass on the bounds, which a
    flow can fit with an unbounded likelihood)."""
    batch = batch + width * (torch.rand_like(batch) - 0.5)
    if data_range is None:
        return batch
    lo, hi = data_range
    batch = torch.where(batch < lo, 2 * lo - batch, batch)
    batch = torch.where(batch > hi, 2 * hi - batch, batch)
    return batch.clamp(lo, hi)  # only for width > hi - lo


_Estimator = TypeVar("_Estimator", bound="BaseFlowEstimator")


class BaseFlowEstimator(DensityMixin, TransformerMixin, BaseEstimator):
    """Shared machinery of the flow priors: validation, device, batching, pickling.

    Subclasses implement ``_check_params()`` and ``_fit(X, rng)`` (which sets ``flow_`` and
    ``history_``/``best_epoch_``) and may extend the public methods.
    """

    # -- validation -------------------------------------------------------------------------
    def _setting(self, name):
        """The value training uses for parameter ``name``."""
        return getattr(self, name)

    def _check_common_params(self):
        if self.image_shape is not None:
            shape = tuple(self.image_shape) if np.ndim(self.image_shape) == 1 else ()
            if len(shape) != 3 or not all(isinstance(s, numbers.Integral) and s > 0
                                          for s in shape):
                raise ValueError(f"image_shape must be (C, H, W) positive ints, "
                                 f"got {self.image_shape!r}")
        if self.data_range is not None:
            pair = tuple(self.data_range) if np.ndim(self.data_range) == 1 else ()
            if len(pair) != 2 or not all(map(is_real, pair)) or not pair[0] < pair[1]:
                raise ValueError(f"data_range must be (lo, hi) finite with lo < hi, "
                                 f"got {self.data_range!r}")
        for name in ("max_epochs", "batch_size", "n_iter_no_change"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.verbose, numbers.Integral):
            raise TypeError(f"verbose must be an int, got {self.verbose!r}")
        learning_rate = self._setting("learning_rate")
        if not (is_real(learning_rate) and learning_rate > 0):
            raise ValueError(f"learning_rate must be finite and > 0, got {learning_rate!r}")
        weight_decay = self._setting("weight_decay")
        if not is_real(weight_decay, 0):
            raise ValueError(f"weight_decay must be finite and >= 0, got {weight_decay!r}")
        if not (isinstance(self.validation_fraction, numbers.Real)
                and 0 <= self.validation_fraction < 1):
            raise ValueError(f"validation_fraction must be in [0, 1), "
                             f"got {self.validation_fraction!r}")
        check_choice("on_nonfinite", self.on_nonfinite, ("raise", "warn"))

    def _validate(self, X, reset=False):
        X = validate_data(self, X, reset=reset, dtype=[np.float64, np.float32])
        check_float32_range(X, "X")
        if reset:
            if len(X) < 2:
                raise ValueError(f"{type(self).__name__} needs at least 2 samples, "
                                 f"got {len(X)} sample")
            if self.image_shape is not None and np.prod(self.image_shape) != X.shape[1]:
                raise ValueError(f"image_shape {tuple(self.image_shape)} has "
                                 f"{int(np.prod(self.image_shape))} values but X has "
                                 f"{X.shape[1]} features")
        if self.data_range is not None:
            lo, hi = self.data_range
            if X.min() < lo or X.max() > hi:
                raise ValueError(f"X has values in [{X.min():.4g}, {X.max():.4g}], outside "
                                 f"data_range={tuple(self.data_range)}; rescale X or set "
                                 "data_range=None")
        return X

    def _validate_latent(self, Z):
        check_is_fitted(self)
        Z = check_float32_range(check_array(Z, dtype=[np.float64, np.float32]), "Z")
        if Z.shape[1] != self.flow_.latent_dim:
            raise ValueError(f"Z has {Z.shape[1]} features, expected the latent dimension "
                             f"{self.flow_.latent_dim}")
        return Z

    # -- torch plumbing ---------------------------------------------------------------------
    def _tensor(self, A):
        return as_tensor(A, self.device_)

    def _map(self, fn, A, out_dtype=np.float64):
        """Apply ``fn: tensor -> tensor`` to ``A`` in chunks, without gradients."""
        outs = []
        with torch.no_grad():
            for start in range(0, len(A), _CHUNK):
                outs.append(fn(self._tensor(A[start:start + _CHUNK])).cpu().numpy())
        shape = outs[0].shape[1:] if outs else (0,)
        return np.concatenate(outs).astype(out_dtype) if outs else np.empty((0, *shape))

    def fit(self: _Estimator, X: ArrayLike, y: ArrayLike | None = None) -> _Estimator:
        """Fit the flow by maximum likelihood on ``X`` ``(n_samples, n_features)``."""
        self._check_params()
        X = self._validate(X, reset=True)
        rng = check_random_state(self.random_state)
        self.device_ = resolve_device(self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.randint(2**31 - 1))
            self._fit(X, rng)
        self.flow_.requires_grad_(False)
        self.training_range_ = (float(X.min()), float(X.max()))
        self.latent_covariance_ = self._latent_covariance(X)
        return self

    def _latent_covariance(self, X):
        """:class:`~sklearn.covariance.EmpiricalCovariance` of the finite latent codes of
        ``X``'s rows, accumulated in float64 chunk by chunk (never all codes at once)."""
        shift, count, s1, s2, finite_rows = None, 0, 0.0, 0.0, []
        for start in range(0, len(X), _CHUNK):
            Z = self._map(lambda x: self.flow_(x)[0], X[start:start + _CHUNK])
            finite = np.isfinite(Z).all(1)
            finite_rows.append(finite)
            Z = Z[finite]
            if shift is None and len(Z):
                shift = Z.mean(0)  # sums of shifted codes: no cancellation in the covariance
            if len(Z):
                Z -= shift
                count, s1, s2 = count + len(Z), s1 + Z.sum(0), s2 + Z.T @ Z
        # one value per row, NaN where its code is not finite
        check_finite_output(np.where(np.concatenate(finite_rows), 0.0, np.nan)[:, None],
                            self.on_nonfinite, "latent codes of the training data")
        if not count:
            raise FloatingPointError("no training sample has a finite latent code")
        mean = s1 / count
        covariance = s2 / count - np.outer(mean, mean)
        # what EmpiricalCovariance().fit(Z) sets, from the accumulated moments
        reference = EmpiricalCovariance()
        reference.location_, reference.covariance_ = shift + mean, covariance
        reference.precision_ = pinvh(covariance, check_finite=False)
        reference.n_features_in_ = len(mean)
        return reference

    # -- density estimator ------------------------------------------------------------------
    def score_samples(self, X: ArrayLike) -> NDArray[np.float64]:
        """Log-density of each sample, nats: ``(n, n_features) -> (n,)``."""
        check_is_fitted(self)
        X = self._validate(X)
        return check_finite_output(self._map(self.flow_.log_prob, X), self.on_nonfinite,
                                   "log-likelihoods")

    def score(self, X: ArrayLike, y: ArrayLike | None = None) -> float:
        """Mean log-likelihood of ``X`` in nats per sample."""
        return float(np.mean(self.score_samples(X)))

    def bits_per_dim(self, X: ArrayLike, n_bits: int | None = None) -> float:
        """Mean negative log-likelihood of ``X`` in bits per dimension.

        ``n_bits`` (needs ``data_range``): the data hold ``2**n_bits`` levels over
        ``data_range``, and the result is in the image-flow convention (8-bit images: the
        density on [0, 256)); see :func:`flowsk.metrics.bits_per_dim`.
        """
        width = 1.0
        if n_bits is not None:
            if self.data_range is None:
                raise ValueError("bits_per_dim with n_bits needs a prior with data_range")
            width = float(self.data_range[1] - self.data_range[0])
        return bits_per_dim(self.score(X), self.n_features_in_, n_bits=n_bits,
                            data_range=width)

    def sample(self, n_samples: int = 1, temperature: float = 1.0,
               random_state: RandomStateLike = None) -> NDArray[np.float64]:
        """Draw ``(n_samples, n_features)`` samples with latent ``N(0, temperature^2 I)``."""
        check_is_fitted(self)
        if not isinstance(n_samples, numbers.Integral) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
        if not is_real(temperature, 0):
            raise ValueError(f"temperature must be finite and >= 0, got {temperature!r}")
        rng = check_random_state(random_state)
        Z = temperature * rng.standard_normal((n_samples, self.flow_.latent_dim))
        X = self._map(self.flow_.decode, Z)
        return check_finite_output(X, self.on_nonfinite, "samples")

    def transform(self, X: ArrayLike) -> NDArray[np.floating]:
        """Latent codes ``z = f(x)``: ``(n, n_features) -> (n, latent_dim)``."""
        check_is_fitted(self)
        X = self._validate(X)
        Z = self._map(lambda x: self.flow_(x)[0], X, X.dtype)
        return check_finite_output(Z, self.on_nonfinite, "latent codes")

    def inverse_transform(self, Z: ArrayLike) -> NDArray[np.floating]:
        """Generate ``x = G(z)``: ``(n, latent_dim) -> (n, n_features)``."""
        Z = self._validate_latent(Z)
        X = self._map(self.flow_.decode, Z, Z.dtype)
        return check_finite_output(X, self.on_nonfinite, "generated signals")

    def ood_features(self, X: ArrayLike) -> tuple[NDArray[np.floating], EmpiricalCovariance]:
        """Latent codes of ``X`` and the fitted ``latent_covariance_`` of the training codes,
        for :func:`flowsk.metrics.ood_score`: ``(n, n_features) -> ((n, latent_dim),
        EmpiricalCovariance)``."""
        return self.transform(X), self.latent_covariance_

    # -- scikit-learn contract --------------------------------------------------------------
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        tags.non_deterministic = False
        return tags

    def __getstate__(self):
        state = self.__dict__.copy()
        if "flow_" in state and self.device_.type != "cpu":
            state["flow_"] = copy.deepcopy(self.flow_).cpu()
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if "flow_" in state:
            if self.device_.type == "cuda" and not torch.cuda.is_available():
                self.device_ = torch.device("cpu")
            self.flow_.to(self.device_)


class FlowPrior(BaseFlowEstimator):
    """Normalizing-flow prior on flat data ``(n_samples, n_features)``.

    Parameters
    ----------
    image_shape : (C, H, W) or None
        How the flat features unflatten (C order). Needed by the image architectures.
    architecture : {"mlp", "glow", "realnvp", "chavez", "maf"} or None
        None picks "glow" when ``image_shape`` is given, else "mlp". ``"maf"`` (masked
        autoregressive, for vectors) is for density estimation only: it scores in one pass
        but samples and generates in one pass per feature, far too slow for the latent-space
        solvers of :class:`~flowsk.InverseSolver`.
    coupling : {"affine", "additive", "spline", "robust-spline"}
        The coupling's element-wise transform: Glow's affine (log-scale soft-clamped to
        (-3, 3)), NICE's additive, a rational-quadratic spline (Durkan et al.) or Hong et al.'s
        two-bin spline plus shift, whose inverse cannot explode.
    n_bins : int or None
        Bins of the ``"spline"`` coupling (None: 8).
    bound : float or None
        Half-width of the box ``[-bound, bound]`` in which the spline couplings act; outside
        it they are the identity (plus the shift of ``"robust-spline"``). None: 5 for
        ``"spline"``, 3 for ``"robust-spline"``.
    spline_affine : bool or None
        ``"spline"`` only: a conditional shift and scale (Glow's affine) in front of each
        spline, which moves each value into the spline's box. None: False.
    n_levels : int
        Multiscale levels (image architectures).
    n_steps : int or None
        Flow steps (per level for image architectures). None: the default of the architecture
        and coupling (``flowsk.prior._AUTO``): 8 for ``mlp``, 4 for images, 5 for ``maf``.
    hidden_features : int or None
        Width of the conditioner networks. None: 128 for ``mlp`` (64 with ``"spline"``), 32
        for images, 128 for ``maf``.
    data_range : (lo, hi) or None
        Bounded data: a logit layer at the data end keeps samples in range.
    dequantize : float
        Width of the uniform noise, centred on each value and reflected at the bounds of
        ``data_range``, added to every training and validation batch (0 for continuous data).
    max_epochs, batch_size, learning_rate, weight_decay, validation_fraction, n_iter_no_change
        The training loop: AdamW (``weight_decay`` decoupled, on the weights of linear and
        convolution layers only), early stopping on the validation split (one learning-rate
        cut by 10 at the first plateau). ``learning_rate`` None: 6e-4 for ``mlp``, 1e-3 for
        images and ``maf``; ``weight_decay`` None: 1.0 for ``mlp``, 1e-4 for
        images, 1e-3 for ``maf``.
    on_nonfinite : {"raise", "warn"}
        What to do when a generated sample is not finite.
    device : "auto", "cpu", "cuda", ...
    random_state : int, RandomState or None
    verbose : int
        > 0 shows a progress bar, > 1 logs every epoch.

    Attributes
    ----------
    flow_ : flowsk.nn.base.Flow
    n_features_in_ : int
    history_ : dict with "train_loss" and "val_loss" (negative log-likelihood per sample), one
        entry per epoch run (NaN for an epoch that diverged and was undone)
    best_epoch_ : int
        Index into ``history_`` of the epoch whose weights were kept.
    latent_covariance_ : sklearn.covariance.EmpiricalCovariance
        Mean and covariance of the training data's latent codes, for
        :func:`flowsk.metrics.ood_score`.
    training_range_ : (float, float)
        Smallest and largest value of the training data (the PSNR peak of
        :meth:`InverseSolver.score` when ``data_range`` is None).
    device_ : torch.device
    """

    def __init__(self, image_shape: ImageShape | None = None,
                 architecture: Architecture | None = None, coupling: Coupling = "affine",
                 n_bins: int | None = None, bound: float | None = None,
                 spline_affine: bool | None = None, n_levels: int = 2,
                 n_steps: int | None = None, hidden_features: int | None = None,
                 data_range: DataRange | None = None, dequantize: float = 0.0,
                 max_epochs: int = 200, batch_size: int = 64,
                 learning_rate: float | None = None, weight_decay: float | None = None,
                 validation_fraction: float = 0.1, n_iter_no_change: int = 15,
                 on_nonfinite: OnNonfinite = "raise", device: Device = "auto",
                 random_state: RandomStateLike = None, verbose: int = 0) -> None:
        self.image_shape = image_shape
        self.architecture = architecture
        self.coupling = coupling
        self.n_bins = n_bins
        self.bound = bound
        self.spline_affine = spline_affine
        self.n_levels = n_levels
        self.n_steps = n_steps
        self.hidden_features = hidden_features
        self.data_range = data_range
        self.dequantize = dequantize
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

    def _architecture(self):
        if self.architecture is None:
            return "mlp" if self.image_shape is None else "glow"
        return self.architecture

    def _setting(self, name):
        value = getattr(self, name)
        if value is None:
            arch = self._architecture()
            family = arch if arch in _AUTO else "image"
            return _AUTO[family].get(self.coupling, {}).get(name)
        return value

    def _check_params(self):
        # architecture and coupling first: the defaults of the other settings depend on them
        arch = self._architecture()
        if arch not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {arch!r}")
        if arch in IMAGE_ARCHITECTURES and self.image_shape is None:
            raise ValueError(f"architecture={arch!r} needs image_shape=(C, H, W); "
                             "use architecture='mlp' for vector data")
        check_choice("coupling", self.coupling, TRANSFORMS)
        self._check_common_params()
        for name in ("n_levels", "n_steps", "hidden_features"):
            value = self._setting(name)
            if not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.n_bins is not None:
            check_int("n_bins", self.n_bins, 1)
            if self.n_bins > _MAX_BINS:
                raise ValueError(f"n_bins must be at most {_MAX_BINS} (each bin keeps a "
                                 f"minimal width), got {self.n_bins!r}")
        if self.bound is not None and not (is_real(self.bound) and self.bound > 0):
            raise ValueError(f"bound must be finite and > 0, got {self.bound!r}")
        if not isinstance(self.spline_affine, (bool, np.bool_, type(None))):
            raise TypeError(f"spline_affine must be True, False or None, "
                            f"got {self.spline_affine!r}")
        if not is_real(self.dequantize, 0):
            raise ValueError(f"dequantize must be finite and >= 0, got {self.dequantize!r}")

    def _loss(self, flow, batch):
        # training and validation batches alike, so early stopping sees the training objective
        if self.dequantize > 0:
            batch = dequantize(batch, self.dequantize, self.data_range)
        return -flow.log_prob(batch).mean()

    def _build_flow(self, n_features, seed):
        """The untrained flow on ``n_features``; ``seed`` (int) seeds its random layers."""
        options = {"n_bins": self._setting("n_bins"), "bound": self._setting("bound"),
                   "affine": bool(self._setting("spline_affine"))}
        return build_flow(
            n_features, image_shape=self.image_shape, architecture=self._architecture(),
            coupling=self.coupling, coupling_options=options, n_levels=self.n_levels,
            n_steps=self._setting("n_steps"),
            hidden_features=self._setting("hidden_features"), data_range=self.data_range,
            random_state=seed)

    def _fit(self, X, rng):
        self.flow_ = self._build_flow(X.shape[1], rng.randint(2**31 - 1)).to(self.device_)
        self.history_, self.best_epoch_ = train(
            self.flow_, self._loss, X, max_epochs=self.max_epochs,
            batch_size=self.batch_size, learning_rate=self._setting("learning_rate"),
            weight_decay=self._setting("weight_decay"),
            validation_fraction=self.validation_fraction,
            n_iter_no_change=self.n_iter_no_change, rng=rng, verbose=self.verbose,
            desc="FlowPrior")

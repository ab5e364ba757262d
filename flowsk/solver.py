"""InverseSolver: reconstruct signals from measurements with a fitted flow prior."""
from __future__ import annotations

import copy
import numbers
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from sklearn.base import BaseEstimator, clone
from sklearn.covariance import EmpiricalCovariance
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_array, check_is_fitted

from ._training import resolve_device
from ._typing import Device, OnNonfinite, RandomStateLike
from ._validation import check_choice, check_finite_output, check_float32_range
from .methods import METHODS
from .methods.base import Problem
from .methods.variational import amortized_context
from .metrics import psnr
from .operators import Operator
from .prior import BaseFlowEstimator

_HYPERPARAMETERS = ("gamma", "alpha", "beta", "sigma", "init", "init_std", "n_iter",
                    "learning_rate", "n_restarts", "n_samples")
#: Rows solved together. Block ``k`` of a call (rows ``k * BLOCK_SIZE`` up to the next block)
#: draws its random numbers from a torch generator seeded with ``block_seed(seed, k)``, where
#: ``seed`` is one draw from ``random_state`` per call. So a row's result does not depend on
#: how the rows are split into calls, as long as each part starts at a multiple of
#: ``BLOCK_SIZE`` (``flowsk_dask`` chunks Dask arrays of measurements that way).
BLOCK_SIZE = 1024


def block_seed(seed: int, block: int) -> int:
    """The torch seed of row block ``block`` of a call with base seed ``seed``: the first word
    of ``numpy.random.SeedSequence([seed, block])``."""
    return int(np.random.SeedSequence([seed, block]).generate_state(1)[0])


def _check_hyperparameter(name, value):
    if name == "init":
        return
    if name in ("n_iter", "n_restarts", "n_samples"):
        ok = isinstance(value, numbers.Integral) and value >= 1
        need = "a positive int"
    elif name in ("sigma", "learning_rate"):
        ok = isinstance(value, numbers.Real) and np.isfinite(value) and value > 0
        need = "> 0"
    else:
        ok = isinstance(value, numbers.Real) and np.isfinite(value) and value >= 0
        need = ">= 0"
    if not ok:
        raise ValueError(f"{name} must be {need}, got {value!r}")


class InverseSolver(BaseEstimator):
    """Solve ``y = A(x) + noise`` for ``x`` with a fitted flow prior.

    Parameters
    ----------
    prior : fitted FlowPrior or InjectiveFlowPrior
        Shared, never refitted: ``clone`` (and so ``GridSearchCV``) keeps the same prior.
    operator : flowsk.operators.Operator
        The forward model; its ``n_features`` must match the prior's.
    method : str
        One of ``flowsk.methods.METHODS``.
    gamma, alpha, beta, sigma, init, init_std, n_iter, learning_rate, n_restarts, n_samples
        Hyperparameters shared by all methods; None takes the method's default, and setting
        one the method does not read is an error. ``n_samples`` is the number of posterior
        draws behind ``predict`` for posterior methods.
    method_params : dict or None
        Further method-specific settings (see each method's ``defaults``).
    device : None, "auto", "cpu", "cuda"
        None runs where the prior lives.
    random_state : int, RandomState or None
    on_nonfinite : {"raise", "warn"}
        What to do when a reconstruction is not finite.
    verbose : int

    Attributes (after ``fit``)
    --------------------------
    n_features_in_ : int, width of ``Y``
    model_ : what an amortized method trained (None otherwise)
    """

    def __init__(self, prior: BaseFlowEstimator, operator: Operator, method: str = "glowip", *,
                 gamma: float | None = None, alpha: float | None = None,
                 beta: float | None = None, sigma: float | None = None, init: str | None = None,
                 init_std: float | None = None, n_iter: int | None = None,
                 learning_rate: float | None = None, n_restarts: int | None = None,
                 n_samples: int | None = None, method_params: dict[str, Any] | None = None,
                 device: Device | None = None, random_state: RandomStateLike = None,
                 on_nonfinite: OnNonfinite = "raise", verbose: int = 0) -> None:
        self.prior = prior
        self.operator = operator
        self.method = method
        self.gamma = gamma
        self.alpha = alpha
        self.beta = beta
        self.sigma = sigma
        self.init = init
        self.init_std = init_std
        self.n_iter = n_iter
        self.learning_rate = learning_rate
        self.n_restarts = n_restarts
        self.n_samples = n_samples
        self.method_params = method_params
        self.device = device
        self.random_state = random_state
        self.on_nonfinite = on_nonfinite
        self.verbose = verbose

    def __sklearn_clone__(self):
        params = {k: (v if k in ("prior", "operator") else clone(v, safe=False))
                  for k, v in self.get_params(deep=False).items()}
        return type(self)(**params)

    # -- set-up -----------------------------------------------------------------------------
    def _method(self):
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; valid methods: "
                             f"{', '.join(sorted(METHODS))}")
        return METHODS[self.method]()

    def _params(self, method):
        params = dict(method.defaults)
        for name in _HYPERPARAMETERS:
            value = getattr(self, name)
            if value is None:
                continue
            if name not in params:
                used = [h for h in _HYPERPARAMETERS if h in params]
                raise ValueError(f"method {self.method!r} does not use {name}; it reads "
                                 f"{', '.join(used) or 'no shared hyperparameters'}")
            _check_hyperparameter(name, value)
            params[name] = value
        extra = self.method_params or {}
        if not isinstance(extra, dict):
            raise TypeError(f"method_params must be a dict or None, got {extra!r}")
        unknown = sorted(set(extra) - set(params) - set(_HYPERPARAMETERS))
        if unknown:
            raise ValueError(f"method {self.method!r} has no settings {unknown}; it reads "
                             f"{sorted(params)}")
        params.update(extra)
        return params

    def _check_prior_operator(self, method):
        check_is_fitted(self.prior, msg="the prior is not fitted: call prior.fit(X) before "
                                        "building an InverseSolver")
        if not isinstance(self.operator, Operator):
            raise TypeError(f"operator must be a flowsk.operators.Operator (wrap a matrix in "
                            f"MatrixOperator, a torch callable in FunctionOperator), got "
                            f"{type(self.operator).__name__}")
        n = self.prior.n_features_in_
        if self.operator.n_features != n:
            raise ValueError(f"the operator acts on {self.operator.n_features} features but "
                             f"the prior models {n}: build the operator for the prior's "
                             "image_shape")
        method.check_prior(self.prior)

    def _seed(self):
        """The base seed of one call, drawn from ``random_state``."""
        return int(check_random_state(self.random_state).randint(2**31 - 1))

    def _problem(self, method, seed=None):
        """The method's :class:`Problem`; its generator is seeded with ``seed`` (None: a
        fresh draw from ``random_state``)."""
        self._check_prior_operator(method)
        check_choice("on_nonfinite", self.on_nonfinite, ("raise", "warn"))
        device = self.prior.device_ if self.device is None else resolve_device(self.device)
        flow = self.prior.flow_
        if next(iter(flow.buffers()), torch.empty(0, device=device)).device != device:
            flow = copy.deepcopy(flow).to(device)
        operator = copy.deepcopy(self.operator).to(device=device, dtype=torch.float32)
        return Problem(flow=flow, operator=operator, params=self._params(method),
                        generator=torch.Generator(device).manual_seed(
                            self._seed() if seed is None else seed),
                        data_range=self.prior.data_range,
                        model=getattr(self, "model_", None), verbose=self.verbose)

    def _run(self, fn, Y, problem, seed, first_block):
        """``fn(problem, y)`` on each block of ``Y``, the first being block ``first_block``."""
        device = problem.generator.device
        outs = []
        for block, start in enumerate(range(0, len(Y), BLOCK_SIZE), first_block):
            problem.generator.manual_seed(block_seed(seed, block))
            y = torch.as_tensor(np.asarray(Y[start:start + BLOCK_SIZE], np.float32),
                                device=device)
            outs.append(fn(problem, y).detach().cpu().numpy().astype(np.float64))
        return np.concatenate(outs)

    # -- estimator API ----------------------------------------------------------------------
    def fit(self, Y: ArrayLike, X: ArrayLike | None = None) -> InverseSolver:
        """Check the set-up and train what the method needs (amortized methods).

        ``Y``: measurements ``(n_obs, m)``; ``X``: matching signals ``(n_obs, n_features)``,
        used by amortized methods when given (else they simulate pairs from the prior).
        """
        method = self._method()
        problem = self._problem(method)
        Y = self._measurements(Y)
        if X is not None:
            X = check_array(X, dtype=np.float64, input_name="X")
            if X.shape != (len(Y), self.prior.n_features_in_):
                raise ValueError(f"X must be the signals of Y, of shape ({len(Y)}, "
                                 f"{self.prior.n_features_in_}), got {X.shape}")
        self.n_features_in_ = Y.shape[1]
        self.model_ = method.fit(problem, Y, X) if method.needs_fit else None
        return self

    def _measurements(self, Y):
        """``Y`` checked: a 2-D finite real array with the operator's ``output_dim`` columns."""
        Y = check_array(Y, dtype=[np.float64, np.float32], input_name="Y")
        return check_float32_range(self.operator.check_measurements(Y), "Y")

    def _ready(self, method, seed):
        if method.needs_fit:
            check_is_fitted(self, "model_", msg=f"method {self.method!r} is trained by fit(Y); "
                                                "call fit before predict")
        return self._problem(method, seed)

    def predict(self, Y: ArrayLike, return_std: bool = False
                ) -> NDArray[np.float64] | tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Reconstruct ``(n_obs, m) -> (n_obs, n_features)``.

        Posterior methods return the mean of ``n_samples`` draws and, with
        ``return_std=True``, also the per-feature posterior std. Rows are solved in blocks
        of ``BLOCK_SIZE``, each with its own seed (see ``BLOCK_SIZE``).
        """
        return self._predict(Y, return_std, self._seed(), 0)

    def _predict(self, Y, return_std, seed, first_block):
        """``predict`` of rows that start at block ``first_block``, base seed ``seed``."""
        method = self._method()
        problem = self._ready(method, seed)
        Y = self._measurements(Y)
        if method.posterior:
            S = self._run(lambda p, y: method.sample(p, y, p.params["n_samples"]), Y, problem,
                          seed, first_block)
            check_finite_output(S, self.on_nonfinite, "posterior samples")
            mean = S.mean(1)
            return (mean, S.std(1)) if return_std else mean
        if return_std:
            raise ValueError(f"method {self.method!r} gives a point estimate; return_std "
                             f"needs a posterior method ({', '.join(_posterior_methods())})")
        X = self._run(method.predict, Y, problem, seed, first_block)
        return check_finite_output(X, self.on_nonfinite, "reconstructions")

    def sample_posterior(self, Y: ArrayLike, n_samples: int = 32) -> NDArray[np.float64]:
        """Posterior draws ``(n_obs, m) -> (n_obs, n_samples, n_features)``, seeded per row
        block as ``predict``."""
        return self._sample_posterior(Y, n_samples, self._seed(), 0)

    def _sample_posterior(self, Y, n_samples, seed, first_block):
        method = self._method()
        if not method.posterior:
            raise ValueError(f"method {self.method!r} gives a point estimate; sample_posterior "
                             f"needs a posterior method ({', '.join(_posterior_methods())})")
        _check_hyperparameter("n_samples", n_samples)
        problem = self._ready(method, seed)
        Y = self._measurements(Y)
        S = self._run(lambda p, y: method.sample(p, y, n_samples), Y, problem, seed,
                      first_block)
        return check_finite_output(S, self.on_nonfinite, "posterior samples")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = False  # X (the signals) is optional in fit
        tags.target_tags.multi_output = True  # each target is a signal (n_obs, n_features)
        tags.target_tags.single_output = False
        tags.non_deterministic = False  # with an int random_state
        return tags

    def ood_features(self, Y: ArrayLike) -> tuple[NDArray[np.float32], EmpiricalCovariance]:
        """Encoder features ``g(y)`` of a fitted ``amortized-vi`` solver and the fitted
        covariance of those of its training measurements, for
        :func:`flowsk.metrics.ood_score`: ``(n, m) -> ((n, m), EmpiricalCovariance)``."""
        if self.method != "amortized-vi":
            raise ValueError(f"ood_features needs method='amortized-vi' (an encoder of y), "
                             f"got {self.method!r}")
        check_is_fitted(self, "model_", msg="the solver is not fitted: call fit(Y) first")
        Y = self._measurements(Y)
        model = self.model_
        device = next(model.parameters()).device
        with torch.no_grad():
            features = amortized_context(model, torch.as_tensor(Y, dtype=torch.float32,
                                                                device=device))
        return features.cpu().numpy(), model.feature_covariance

    def score(self, Y: ArrayLike, X: ArrayLike) -> float:
        """Mean PSNR (dB) of ``predict(Y)`` against the true signals ``X``.

        The peak is fixed by the prior, never by ``X``, so that the scores of different folds
        (``GridSearchCV``) are comparable: the width of the prior's ``data_range``, or without
        one the range of its training data (``prior.training_range_``).
        """
        X_hat = self.predict(Y)
        lo, hi = (self.prior.data_range if self.prior.data_range is not None
                  else self.prior.training_range_)
        return float(np.mean(psnr(X, X_hat, data_range=hi - lo)))


def _posterior_methods():
    return sorted(name for name, m in METHODS.items() if m.posterior)


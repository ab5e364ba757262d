"""InverseSolver: reconstruct signals from measurements with a fitted flow prior."""
import copy
import numbers

import numpy as np
import torch
from sklearn.base import BaseEstimator, clone
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_array, check_is_fitted

from ._training import resolve_device
from ._validation import check_choice, check_finite_output, check_float32_range
from .methods import METHODS
from .methods.base import Problem
from .methods.variational import amortized_context
from .metrics import psnr
from .operators import Operator

_HYPERPARAMETERS = ("gamma", "alpha", "beta", "sigma", "init", "init_std", "n_iter",
                    "learning_rate", "n_restarts", "n_samples")
_CHUNK = 1024


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

    def __init__(self, prior, operator, method="glowip", *, gamma=None, alpha=None, beta=None,
                 sigma=None, init=None, init_std=None, n_iter=None, learning_rate=None,
                 n_restarts=None, n_samples=None, method_params=None, device=None,
                 random_state=None, on_nonfinite="raise", verbose=0):
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

    def _problem(self, method):
        self._check_prior_operator(method)
        check_choice("on_nonfinite", self.on_nonfinite, ("raise", "warn"))
        device = self.prior.device_ if self.device is None else resolve_device(self.device)
        flow = self.prior.flow_
        if next(iter(flow.buffers()), torch.empty(0, device=device)).device != device:
            flow = copy.deepcopy(flow).to(device)
        operator = copy.deepcopy(self.operator).to(device=device, dtype=torch.float32)
        seed = check_random_state(self.random_state).randint(2**31 - 1)
        return Problem(flow=flow, operator=operator, params=self._params(method),
                        generator=torch.Generator(device).manual_seed(int(seed)),
                        data_range=self.prior.data_range,
                        model=getattr(self, "model_", None), verbose=self.verbose)

    def _run(self, fn, Y, problem):
        device = problem.generator.device
        outs = []
        for start in range(0, len(Y), _CHUNK):
            y = torch.as_tensor(np.asarray(Y[start:start + _CHUNK], np.float32), device=device)
            outs.append(fn(problem, y).detach().cpu().numpy().astype(np.float64))
        return np.concatenate(outs)

    # -- estimator API ----------------------------------------------------------------------
    def fit(self, Y, X=None):
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

    def _ready(self, method):
        if method.needs_fit:
            check_is_fitted(self, "model_", msg=f"method {self.method!r} is trained by fit(Y); "
                                                "call fit before predict")
        return self._problem(method)

    def predict(self, Y, return_std=False):
        """Reconstruct ``(n_obs, m) -> (n_obs, n_features)``.

        Posterior methods return the mean of ``n_samples`` draws and, with
        ``return_std=True``, also the per-feature posterior std.
        """
        method = self._method()
        problem = self._ready(method)
        Y = self._measurements(Y)
        if method.posterior:
            S = self._run(lambda p, y: method.sample(p, y, p.params["n_samples"]), Y, problem)
            check_finite_output(S, self.on_nonfinite, "posterior samples")
            mean = S.mean(1)
            return (mean, S.std(1)) if return_std else mean
        if return_std:
            raise ValueError(f"method {self.method!r} gives a point estimate; return_std "
                             f"needs a posterior method ({', '.join(_posterior_methods())})")
        X = self._run(method.predict, Y, problem)
        return check_finite_output(X, self.on_nonfinite, "reconstructions")

    def sample_posterior(self, Y, n_samples=32):
        """Posterior draws ``(n_obs, m) -> (n_obs, n_samples, n_features)``."""
        method = self._method()
        if not method.posterior:
            raise ValueError(f"method {self.method!r} gives a point estimate; sample_posterior "
                             f"needs a posterior method ({', '.join(_posterior_methods())})")
        _check_hyperparameter("n_samples", n_samples)
        problem = self._ready(method)
        Y = self._measurements(Y)
        S = self._run(lambda p, y: method.sample(p, y, n_samples), Y, problem)
        return check_finite_output(S, self.on_nonfinite, "posterior samples")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = False  # X (the signals) is optional in fit
        tags.target_tags.multi_output = True  # each target is a signal (n_obs, n_features)
        tags.target_tags.single_output = False
        tags.non_deterministic = False  # with an int random_state
        return tags

    def ood_features(self, Y):
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

    def score(self, Y, X):
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


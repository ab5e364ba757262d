"""Bad input everywhere: every public estimator, operator and metric, fed odd shapes, dtypes,
NaN/inf, empty arrays, huge values and wrong parameter types, either raises a clear error
(ValueError, TypeError, NotFittedError, or FloatingPointError for a non-finite result) or
returns a finite result of the documented shape."""
import functools
import warnings

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.base import clone

from flowsk import FlowPrior, InjectiveFlowPrior, InverseSolver
from flowsk import operators as ops
from flowsk.datasets import make_mixing_toy
from flowsk.metrics import bits_per_dim, inf_rate, ood_score, psnr, ssim

N = 4  # features of every test problem: images (1, 2, 2)
SETTINGS = settings(max_examples=25, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
FEW = settings(SETTINGS, max_examples=10)  # for tests that fit a flow per example
CLEAR = (ValueError, TypeError, FloatingPointError)  # NotFittedError is a ValueError

floats = st.floats(allow_nan=True, allow_infinity=True, width=64)
dtypes = st.sampled_from([np.float64, np.float32, np.int64, np.bool_, np.complex128, "<U2"])
odd_values = st.one_of(st.none(), st.booleans(), st.integers(-2, 3), floats,
                       st.text(max_size=2), st.lists(st.integers(0, 3), max_size=3),
                       st.just(np.array([1.0, 2.0])))


@st.composite
def arrays(draw, width=N):
    """Arrays mostly of the expected width, with odd rows, dtypes, NaN/inf, huge values."""
    shape = draw(st.one_of(
        st.tuples(st.integers(0, 3), st.just(width)),
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)))
    dtype = draw(dtypes)
    kind = np.dtype(dtype).kind
    if kind in "fc":
        elements = st.one_of(floats, st.sampled_from([0.0, 0.5, 1.0, 1e30, -1e300]))
        return draw(hnp.arrays(dtype, shape, elements=elements))
    return draw(hnp.arrays(dtype, shape))


def clear_or_done(fn, *args, **kwargs):
    """Call ``fn``: its result, or None after a clear error (one with a message)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)
    except CLEAR as exc:
        assert str(exc), f"{type(exc).__name__} without a message"
        return None


def clear_or_finite(fn, *args, **kwargs):
    """Call ``fn``: a clear error, or a finite result (returned)."""
    out = clear_or_done(fn, *args, **kwargs)
    if out is not None:
        assert np.isfinite(np.asarray(out, dtype=np.float64)).all()
    return out


def is_good(X, width=N):
    """Whether ``X`` is a valid finite ``(n >= 1, width)`` float32-range array (any width for
    ``width=None``)."""
    X = np.asarray(X)
    return (X.ndim == 2 and X.shape[0] >= 1 and X.shape[1] == (width or X.shape[1])
            and X.dtype.kind in "biuf"
            and bool(np.isfinite(X).all()) and np.abs(X).max() <= np.finfo(np.float32).max)


# -- fitted estimators, built once ----------------------------------------------------------
TINY = dict(n_steps=1, hidden_features=4, max_epochs=1, batch_size=8, device="cpu",
            random_state=0)


@functools.lru_cache(None)
def data():
    return np.random.RandomState(0).uniform(0.1, 0.9, (24, N))


@functools.lru_cache(None)
def fitted():
    torch.manual_seed(0)
    prior = FlowPrior(**TINY).fit(data())
    injective = InjectiveFlowPrior(latent_dim=2, n_latent_steps=1, **TINY).fit(data())
    op = ops.Denoising(N)
    point = InverseSolver(prior, op, method="glowip", n_iter=2, random_state=0)
    amortized = InverseSolver(prior, op, method="amortized-vi", random_state=0, method_params=dict(
        n_simulations=64, n_iter=1, n_steps=1, hidden_features=4)).fit(op.measure(data()))
    return prior, injective, point, amortized


def operators():
    shape = (1, 2, 2)
    return [ops.Denoising(N), ops.Blur(shape), ops.Inpainting(shape, box=(0, 0, 1, 1)),
            ops.RandomMask(shape, 0.5, random_state=1), ops.Colorization((3, 2, 2)),
            ops.CompressedSensing(N, 3, random_state=0), ops.SuperResolution(shape, 2),
            ops.LimitedAngleTomography(shape, 3), ops.MatrixOperator(np.eye(N)[:3] + 0.1),
            ops.FunctionOperator(lambda x: x[:, :2] * 2, N, linear=True)]


# -- estimators: arrays ------------------------------------------------------------------------
@SETTINGS
@given(X=arrays())
def test_priors_on_bad_arrays(X):
    prior, injective, _, _ = fitted()
    for est in (prior, injective):
        n = len(X) if np.ndim(X) == 2 else 0
        for method, shape in (("score_samples", (n,)), ("transform", (n, est.flow_.latent_dim)),
                              ("score", ())):
            out = clear_or_finite(getattr(est, method), X)
            if out is not None:
                assert is_good(X) and np.shape(out) == shape
        Z = clear_or_finite(est.inverse_transform, X[:, :est.flow_.latent_dim]
                            if np.ndim(X) == 2 else X)
        assert Z is None or Z.shape == (len(X), N)
    out = clear_or_finite(injective.project, X)
    assert out is None or (is_good(X) and out.shape == np.shape(X))


@FEW
@given(X=arrays())
def test_prior_fit_on_bad_arrays(X):
    for est in (FlowPrior(**TINY), InjectiveFlowPrior(latent_dim=2, n_latent_steps=1, **TINY)):
        if clear_or_done(est.fit, X) is not None:
            assert is_good(X, width=None) and len(X) >= 2
            assert np.isfinite(est.score_samples(X)).all()


@SETTINGS
@given(Y=arrays())
def test_solvers_on_bad_arrays(Y):
    _, _, point, amortized = fitted()
    for solver in (point, amortized):
        out = clear_or_finite(solver.predict, Y)
        assert out is None or (is_good(Y) and out.shape == (len(Y), N))
    out = clear_or_finite(amortized.sample_posterior, Y, 2)
    assert out is None or out.shape == (len(Y), 2, N)
    clear_or_finite(point.score, Y, Y)
    clear_or_done(clone(amortized).fit, Y)


# -- estimators: parameters -----------------------------------------------------------------
PRIOR_PARAMS = ["image_shape", "architecture", "coupling", "n_levels", "n_steps",
                "hidden_features", "data_range", "dequantize", "max_epochs", "batch_size",
                "learning_rate", "weight_decay", "validation_fraction", "n_iter_no_change",
                "on_nonfinite", "device", "random_state", "verbose"]
INJECTIVE_PARAMS = ["latent_dim", "activation", "n_latent_steps", "regularization", "logdet",
                    "n_probes", "n_terms"]


@FEW
@given(name=st.sampled_from(PRIOR_PARAMS + INJECTIVE_PARAMS), value=odd_values)
def test_prior_parameters_of_wrong_type(name, value):
    for est in (FlowPrior(**TINY), InjectiveFlowPrior(latent_dim=2, n_latent_steps=1, **TINY)):
        if name in est.get_params():
            est.set_params(**{name: value})
            if clear_or_done(est.fit, data()) is not None:
                clear_or_finite(est.score_samples, data())


@SETTINGS
@given(n_samples=odd_values, temperature=odd_values, random_state=odd_values)
def test_sample_arguments_of_wrong_type(n_samples, temperature, random_state):
    prior, injective, _, _ = fitted()
    for est in (prior, injective):
        out = clear_or_finite(est.sample, n_samples, temperature, random_state)
        assert out is None or out.shape == (n_samples, N)


SOLVER_PARAMS = ["method", "gamma", "alpha", "beta", "sigma", "init", "init_std", "n_iter",
                 "learning_rate", "n_restarts", "n_samples", "method_params", "device",
                 "random_state", "on_nonfinite", "operator"]


@SETTINGS
@given(name=st.sampled_from(SOLVER_PARAMS), value=odd_values,
       method=st.sampled_from(["pinv", "glowip", "likelihood"]))
def test_solver_parameters_of_wrong_type(name, value, method):
    prior = fitted()[0]
    solver = InverseSolver(prior, ops.Denoising(N), method=method, n_iter=2)
    if name == "n_iter" and isinstance(value, int) and value > 0:
        value = min(value, 3)
    solver.set_params(**{name: value})
    Y = data()[:3]
    out = clear_or_finite(solver.predict, Y)
    assert out is None or out.shape == (3, N)


def test_unfitted_estimators_say_so():
    for est in (FlowPrior(), InjectiveFlowPrior()):
        for method in ("transform", "score_samples", "inverse_transform"):
            with pytest.raises(ValueError, match="not fitted"):
                getattr(est, method)(data())
    with pytest.raises(ValueError, match="not fitted"):
        InverseSolver(FlowPrior(), ops.Denoising(N)).predict(data())
    with pytest.raises(ValueError, match="fit"):
        clone(fitted()[3]).predict(data())


# -- operators -------------------------------------------------------------------------------
@SETTINGS
@given(X=arrays(), noise_std=st.one_of(odd_values, st.floats(0, 1e300)),
       which=st.integers(0, 9))
def test_operators_on_bad_arrays(X, noise_std, which):
    op = operators()[which]
    if op.n_features != N:  # Colorization works on 3 channels
        X = np.concatenate([X] * 3, -1) if np.ndim(X) == 2 else X
    Y = clear_or_finite(op.measure, X, noise_std, 0)
    if Y is not None:
        assert Y.shape == (len(X), op.output_dim)
    out = clear_or_finite(op.check_measurements, X[:, :op.output_dim] if np.ndim(X) == 2 else X)
    if out is not None:
        assert out.shape[1] == op.output_dim


@SETTINGS
@given(x=hnp.arrays(np.float64, st.tuples(st.integers(1, 3), st.just(N)),
                    elements=st.floats(-1e3, 1e3)), which=st.integers(0, 9))
def test_operators_are_finite_and_adjoint_on_good_tensors(x, which):
    op = operators()[which].double()
    x = torch.as_tensor(np.concatenate([x] * (op.n_features // N), -1))
    y = op(x)
    assert y.shape == (len(x), op.output_dim) and torch.isfinite(y).all()
    v = torch.as_tensor(np.random.RandomState(0).standard_normal(y.shape))
    lhs, rhs = (y * v).sum(), (x * op.adjoint(v)).sum()
    assert torch.isclose(lhs, rhs, rtol=1e-9, atol=1e-9 * float(x.abs().max() + 1))
    assert torch.isfinite(op.pinv(v)).all()


@SETTINGS
@given(arg=odd_values, which=st.sampled_from(["Blur", "Inpainting", "RandomMask",
                                               "CompressedSensing", "SuperResolution",
                                               "LimitedAngleTomography", "MatrixOperator",
                                               "Denoising"]))
def test_operator_constructors_with_wrong_types(arg, which):
    shape = (1, 2, 2)
    build = {"Blur": lambda a: ops.Blur(shape, a), "Inpainting": lambda a: ops.Inpainting(shape, a),
             "RandomMask": lambda a: ops.RandomMask(shape, a),
             "CompressedSensing": lambda a: ops.CompressedSensing(N, a),
             "SuperResolution": lambda a: ops.SuperResolution(shape, a),
             "LimitedAngleTomography": lambda a: ops.LimitedAngleTomography(shape, a),
             "MatrixOperator": ops.MatrixOperator, "Denoising": ops.Denoising}[which]
    op = clear_or_done(build, arg)
    if op is None:
        return
    x = torch.rand(2, op.n_features, dtype=torch.float64)
    assert torch.isfinite(op.double()(x)).all()


# -- metrics ---------------------------------------------------------------------------------
@SETTINGS
@given(A=arrays(), B=arrays(), data_range=st.one_of(odd_values, st.floats(1e-3, 10)))
def test_image_metrics_on_bad_arrays(A, B, data_range):
    try:
        out = psnr(A, B, data_range=data_range)
    except CLEAR as exc:
        assert str(exc)
    else:
        same = np.all(np.asarray(A, float) == np.asarray(B, float), axis=-1)
        assert np.array_equal(np.isinf(out), np.atleast_1d(same)) and not np.isnan(out).any()
    out = clear_or_finite(ssim, A, B, (1, 2, 2), data_range=data_range)
    assert out is None  # 2x2 images are too small for SSIM: always a clear error
    A4, B4 = (np.tile(M, (1, 4)) if np.ndim(M) == 2 else M for M in (A, B))
    clear_or_finite(ssim, A4, B4, (1, 4, 4), data_range=data_range)


@SETTINGS
@given(ll=st.one_of(odd_values, arrays()), n_features=odd_values)
def test_bits_per_dim_on_bad_input(ll, n_features):
    out = clear_or_finite(bits_per_dim, ll, n_features)
    assert out is None or np.shape(out) == np.shape(ll)


@SETTINGS
@given(X=arrays(), n_draws=odd_values, temperature=odd_values)
def test_robustness_metrics_on_bad_input(X, n_draws, temperature):
    prior, injective, point, amortized = fitted()
    for est in (prior, injective, amortized):
        out = clear_or_done(ood_score, est, X)  # inf where the features overflow
        assert out is None or (out.shape == (len(X),) and (out >= 0).all())
        out = clear_or_finite(inf_rate, est, X, n_draws=n_draws, temperature=temperature)
        assert out is None or 0 <= out <= 1
    out = clear_or_finite(inf_rate, prior, n_draws=n_draws, temperature=temperature)
    assert out is None or 0 <= out <= 1
    with pytest.raises(ValueError, match="amortized-vi"):
        ood_score(point, data())


@SETTINGS
@given(n_samples=odd_values, shift=odd_values, noise=odd_values)
def test_make_mixing_toy_on_bad_input(n_samples, shift, noise):
    out = clear_or_finite(make_mixing_toy, n_samples, shift, noise)
    assert out is None or out[0].shape == out[1].shape == (n_samples, 2)

"""Input handling everywhere, as properties. Valid and invalid cases are generated apart: every
public estimator, operator and metric returns a finite result of the documented shape on valid
input, and raises the documented error on invalid input -- ValueError (NotFittedError is one),
TypeError where the docstring says so, FloatingPointError for a result that overflows."""
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
F32_MAX = float(np.finfo(np.float32).max)


# -- arrays -----------------------------------------------------------------------------------
@st.composite
def valid_arrays(draw, width=N, min_rows=1, bound=10.0):
    """2-D ``(1..5, width)`` arrays of a real dtype with finite values in ``[-bound, bound]``:
    what every array argument accepts."""
    shape = (draw(st.integers(min_rows, 5)), width)
    dtype = draw(st.sampled_from([np.float64, np.float32, np.int64, np.bool_]))
    kind = np.dtype(dtype).kind
    if kind == "f":
        elements = st.floats(-bound, bound, width=np.dtype(dtype).itemsize * 8)
    elif kind == "i":
        elements = st.integers(-int(bound), int(bound))
    else:
        elements = st.booleans()
    return draw(hnp.arrays(dtype, shape, elements=elements))


INVALID_KINDS = ("not 2-D", "wrong width", "no rows", "NaN or inf", "beyond float32",
                 "complex", "text")


@st.composite
def invalid_arrays(draw, width=N, kinds=INVALID_KINDS):
    """``(kind, X)``: an array with one defect of ``kind``."""
    kind = draw(st.sampled_from(kinds))
    n = draw(st.integers(1, 4))
    finite = st.floats(-10, 10)
    if kind == "not 2-D":
        shape = draw(st.sampled_from([(), (width,), (n, width, 2), (1, 1, 1, width)]))
        return kind, draw(hnp.arrays(np.float64, shape, elements=finite))
    if kind == "wrong width":
        other = draw(st.integers(1, 6).filter(lambda w: w != width))
        return kind, draw(hnp.arrays(np.float64, (n, other), elements=finite))
    if kind == "no rows":
        return kind, np.zeros((0, width))
    if kind == "complex":
        return kind, draw(hnp.arrays(np.complex128, (n, width),
                                     elements=st.complex_numbers(max_magnitude=10)))
    if kind == "text":
        letters = st.text(alphabet="abcxyz", min_size=1, max_size=2)
        return kind, draw(hnp.arrays("<U2", (n, width), elements=letters))
    X = draw(hnp.arrays(np.float64, (n, width), elements=finite))
    bad = (st.sampled_from([np.nan, np.inf, -np.inf]) if kind == "NaN or inf" else
           st.floats(1e39, 1e300).map(lambda v: draw(st.sampled_from([v, -v]))))
    X[draw(st.integers(0, n - 1)), draw(st.integers(0, width - 1))] = draw(bad)
    return kind, X


@st.composite
def overflowing_arrays(draw, width=N):
    """Valid arrays (float64, within the float32 range) holding a huge value, where a flow's
    result may overflow."""
    X = draw(valid_arrays(width).map(lambda a: a.astype(np.float64)))
    X[draw(st.integers(0, len(X) - 1)), draw(st.integers(0, width - 1))] = draw(
        st.floats(1e20, F32_MAX))
    return X


def raises(error, fn, *args, **kwargs):
    """Assert ``fn(*args, **kwargs)`` raises ``error`` with a message; return the message."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error) as info:
            fn(*args, **kwargs)
    assert str(info.value), f"{type(info.value).__name__} without a message"
    return str(info.value)


def finite(out, shape):
    """Assert ``out`` is finite with ``shape``; return it."""
    out = np.asarray(out, dtype=np.float64)
    assert out.shape == shape and np.isfinite(out).all(), (out.shape, shape)
    return out


def finite_or_overflow(fn, *args, shape):
    """A finite result of ``shape``, or a FloatingPointError naming the non-finite values."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fn(*args)
    except FloatingPointError as exc:
        assert "non-finite" in str(exc)
        return
    finite(out, shape)


# -- fitted estimators, built once ----------------------------------------------------------
TINY = dict(n_steps=1, hidden_features=4, max_epochs=1, batch_size=8, device="cpu",
            random_state=0)
INJECTIVE = dict(latent_dim=2, n_latent_steps=1, **TINY)


@functools.lru_cache(None)
def data():
    return np.random.RandomState(0).uniform(0.1, 0.9, (24, N))


@functools.lru_cache(None)
def fitted():
    torch.manual_seed(0)
    prior = FlowPrior(**TINY).fit(data())
    injective = InjectiveFlowPrior(**INJECTIVE).fit(data())
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
@given(X=valid_arrays(), Z=valid_arrays(bound=5.0))
def test_priors_on_valid_arrays(X, Z):
    prior, injective, _, _ = fitted()
    n = len(X)
    for est in (prior, injective):
        d = est.flow_.latent_dim
        finite(est.score_samples(X), (n,))
        finite(est.score(X), ())
        finite(est.transform(X), (n, d))
        finite(est.inverse_transform(Z[:, :d]), (len(Z), N))
    finite(injective.project(X), (n, N))
    finite(injective.reconstruction_error(X), (n,))


@SETTINGS
@given(case=invalid_arrays(), draw=st.data())
def test_priors_on_invalid_arrays(case, draw):
    _, X = case
    prior, injective, _, _ = fitted()
    for est in (prior, injective):
        for method in ("score_samples", "score", "transform"):
            raises(ValueError, getattr(est, method), X)
        _, Z = draw.draw(invalid_arrays(width=est.flow_.latent_dim))
        raises(ValueError, est.inverse_transform, Z)
    raises(ValueError, injective.project, X)


@SETTINGS
@given(X=overflowing_arrays(), Z=overflowing_arrays())
def test_priors_on_overflowing_arrays(X, Z):
    prior, injective, _, _ = fitted()
    for est in (prior, injective):
        d = est.flow_.latent_dim
        finite_or_overflow(est.score_samples, X, shape=(len(X),))
        finite_or_overflow(est.transform, X, shape=(len(X), d))
        finite_or_overflow(est.inverse_transform, Z[:, :d], shape=(len(Z), N))
    finite_or_overflow(injective.project, X, shape=(len(X), N))


@FEW
@given(X=st.integers(1, 5).flatmap(lambda w: valid_arrays(width=w, min_rows=2)))
def test_prior_fit_on_valid_arrays(X):
    n, width = X.shape
    flow = FlowPrior(**TINY).fit(X)
    finite(flow.score_samples(X), (n,))
    finite(flow.sample(3, random_state=0), (3, width))
    injective = InjectiveFlowPrior(**INJECTIVE)
    if width <= INJECTIVE["latent_dim"]:
        assert "latent_dim must be smaller" in raises(ValueError, injective.fit, X)
        return
    injective.fit(X)
    finite(injective.score_samples(X), (n,))
    finite(injective.project(X), (n, width))


@FEW
@given(case=invalid_arrays(kinds=tuple(k for k in INVALID_KINDS if k != "wrong width"))
       | valid_arrays(min_rows=1).map(lambda X: ("one row", X[:1])))
def test_prior_fit_on_invalid_arrays(case):
    kind, X = case
    for est in (FlowPrior(**TINY), InjectiveFlowPrior(**INJECTIVE)):
        message = raises(ValueError, est.fit, X)
        if kind == "one row":
            assert "at least 2 samples" in message
        assert not hasattr(est, "flow_")


@SETTINGS
@given(Y=valid_arrays())
def test_solvers_on_valid_arrays(Y):
    _, _, point, amortized = fitted()
    n = len(Y)
    for solver in (point, amortized):
        finite(solver.predict(Y), (n, N))
    finite(amortized.sample_posterior(Y, 2), (n, 2, N))
    mean, std = amortized.predict(Y, return_std=True)
    finite(mean, (n, N)), finite(std, (n, N))
    finite(point.score(Y, data()[:n]), ())
    assert clone(amortized).fit(Y).model_ is not None


@SETTINGS
@given(case=invalid_arrays())
def test_solvers_on_invalid_arrays(case):
    _, Y = case
    _, _, point, amortized = fitted()
    for solver in (point, amortized):
        raises(ValueError, solver.predict, Y)
    raises(ValueError, amortized.sample_posterior, Y, 2)
    raises(ValueError, clone(amortized).fit, Y)


# -- estimators: parameters -----------------------------------------------------------------
def _ints(low, high, none_ok=False):
    """(valid, invalid) strategies of an int parameter ``>= low`` (valid up to ``high``)."""
    valid = st.integers(low, high)
    invalid = st.one_of(st.integers(low - 4, low - 1),
                        st.sampled_from([1.5, "2", [1], np.array([1.0, 2.0]), float("nan")]))
    if none_ok:
        return valid | st.none(), invalid
    return valid, invalid | st.none()


def _reals(low, high, strict=False, none_ok=False):
    """(valid, invalid) strategies of a real parameter ``>= low`` (``> low`` when
    ``strict``), valid up to ``high``."""
    valid = st.floats(low, high, exclude_min=strict)
    below = st.floats(max_value=low, exclude_max=not strict, allow_nan=False,
                      allow_infinity=False, min_value=low - 10)
    invalid = st.one_of(below, st.sampled_from([np.nan, np.inf, "0.1", [0.1]]))
    if none_ok:
        return valid | st.none(), invalid
    return valid, invalid | st.none()


def _choices(*choices):
    odd = st.one_of(st.text(max_size=4).filter(lambda s: s not in choices), st.integers(),
                    st.none(), st.just(list(choices[:1])))
    return st.sampled_from(choices), odd


RANDOM_STATES = (st.sampled_from([None, 0, 2**31 - 1]) | st.integers(0, 10).map(
    np.random.RandomState), st.sampled_from(["x", -1, 1.5, [1, 2, -3]]))


def _shared_params(injective):
    """(valid, invalid, text of the error) of the parameters both priors have; FlowPrior takes
    None for "the architecture's default" of some, and n_steps=0 only fits an injective one."""
    auto = not injective
    return {
        # FlowPrior is fitted with n_levels=1, so (1, 2, 2) images can be squeezed
        "image_shape": (st.sampled_from([None, (1, 2, 2), [1, 2, 2]]),
                        st.sampled_from([(1, 2), (0, 2, 2), (1, 2, 3), (1.0, 2, 2), "122", 4]),
                        "image_shape"),
        "coupling": (*_choices("affine", "additive", "spline", "robust-spline"), "coupling"),
        "n_steps": (*_ints(0 if injective else 1, 2, none_ok=auto), "n_steps"),
        "hidden_features": (*_ints(1, 6, none_ok=auto), "hidden_features"),
        "data_range": (st.sampled_from([None, (0, 1), (-1.0, 2.0), [0.1, 0.9],
                                        np.array([0, 1])]),
                       st.sampled_from([(1, 0), (0, 0), (0.5, 0.6), (0,), (np.nan, 1),
                                        (0, np.inf), "ab", 1]), "data_range"),
        "max_epochs": (*_ints(1, 2), "max_epochs"),
        "batch_size": (*_ints(1, 30), "batch_size"),
        "learning_rate": (st.floats(1e-4, 1e-2) | (st.none() if auto else st.nothing()),
                          _reals(0, 1, strict=True, none_ok=auto)[1], "learning_rate"),
        "weight_decay": (*_reals(0, 1e-2, none_ok=auto), "weight_decay"),
        "validation_fraction": (st.floats(0, 0.5),
                                st.sampled_from([-0.1, 1, 1.5, np.nan, "0.1", None]),
                                "validation_fraction"),
        "n_iter_no_change": (*_ints(1, 20), "n_iter_no_change"),
        "on_nonfinite": (*_choices("raise", "warn"), "on_nonfinite"),
        "device": (st.sampled_from(["cpu", "auto", torch.device("cpu")]),
                   st.sampled_from(["tpu", 3.5, "cpu:x"]), "device"),
        "random_state": (*RANDOM_STATES, "seed"),
        "verbose": (st.just(0), st.sampled_from(["x", 1.5, None]), "verbose"),
    }


PARAMS = {
    FlowPrior: {
        **_shared_params(injective=False),
        "architecture": (st.sampled_from([None, "mlp"]),  # image architectures need image_shape
                         st.one_of(st.text(max_size=4).filter(lambda s: s != "mlp"),
                                   st.integers(),
                                   st.sampled_from(["glow", "realnvp", "chavez", ["mlp"]])),
                         "architecture"),
        "n_levels": (*_ints(1, 2), "n_levels"),
        "dequantize": (*_reals(0, 0.1), "dequantize"),
    },
    InjectiveFlowPrior: {
        **_shared_params(injective=True),
        "latent_dim": (st.sampled_from([None, 1, 2, 3]),
                       st.sampled_from([0, -1, 4, 5, 2.5, "2"]), "latent_dim"),
        "activation": (*_choices("linear", "relu"), "activation"),
        "n_latent_steps": (*_ints(1, 2), "n_latent_steps"),
        "regularization": (*_reals(0, 1e-3), "regularization"),
        "logdet": (*_choices("auto", "exact", "stochastic", "bound"), "logdet"),
        "n_probes": (*_ints(1, 4), "n_probes"),
        "n_terms": (*_ints(1, 5), "n_terms"),
    },
}
BASE = {FlowPrior: {**TINY, "n_levels": 1}, InjectiveFlowPrior: INJECTIVE}


def _param_cases(invalid):
    """``(estimator class, name, value)`` with a valid (or invalid) value of ``name``."""
    return st.sampled_from([FlowPrior, InjectiveFlowPrior]).flatmap(
        lambda cls: st.sampled_from(sorted(PARAMS[cls])).flatmap(
            lambda name: st.tuples(st.just(cls), st.just(name),
                                   PARAMS[cls][name][1 if invalid else 0])))


@FEW
@given(case=_param_cases(invalid=False))
def test_prior_parameters_valid(case):
    cls, name, value = case
    est = cls(**BASE[cls]).set_params(**{name: value}).fit(data())
    finite(est.score_samples(data()), (len(data()),))
    finite(est.sample(2, random_state=0), (2, N))


@SETTINGS
@given(case=_param_cases(invalid=True))
def test_prior_parameters_invalid(case):
    cls, name, value = case
    est = cls(**BASE[cls]).set_params(**{name: value})
    error = TypeError if name == "verbose" else ValueError
    assert PARAMS[cls][name][2] in raises(error, est.fit, data()).lower()
    assert not hasattr(est, "flow_")


@SETTINGS
@given(n_samples=st.integers(1, 5), temperature=st.floats(0, 2),
       random_state=RANDOM_STATES[0])
def test_sample_arguments_valid(n_samples, temperature, random_state):
    prior, injective, _, _ = fitted()
    for est in (prior, injective):
        finite(est.sample(n_samples, temperature, random_state), (n_samples, N))


@SETTINGS
@given(case=st.one_of(
    st.tuples(st.just("n_samples"), _ints(1, 5)[1]),
    st.tuples(st.just("temperature"), _reals(0, 2)[1]),
    st.tuples(st.just("random_state"), RANDOM_STATES[1])))
def test_sample_arguments_invalid(case):
    name, value = case
    prior, injective, _, _ = fitted()
    kwargs = {"n_samples": 2, "temperature": 1.0, "random_state": 0, name: value}
    for est in (prior, injective):
        message = raises(ValueError, est.sample, **kwargs).lower()
        assert (name if name != "random_state" else "seed") in message


SOLVER_METHODS = ("pinv", "glowip", "likelihood", "map")
SOLVER_PARAMS = {
    "gamma": _reals(0, 1), "alpha": _reals(0, 1), "beta": _reals(0, 1),
    "sigma": (st.floats(1e-3, 1), _reals(0, 1, strict=True)[1]),
    "init": _choices("zeros", "normal"), "init_std": _reals(0, 1),
    "n_iter": _ints(1, 3), "learning_rate": (st.floats(1e-3, 0.1), _reals(0, 1, True)[1]),
    "n_restarts": _ints(1, 2), "n_samples": _ints(1, 3),
}


@SETTINGS
@given(method=st.sampled_from(SOLVER_METHODS), draw=st.data())
def test_solver_hyperparameters(method, draw):
    """Valid values of a hyperparameter the method reads give finite reconstructions; any
    value of one it does not read, and invalid values of one it reads, raise ValueError."""
    name = draw.draw(st.sampled_from(sorted(SOLVER_PARAMS)))
    valid = draw.draw(st.booleans())
    value = draw.draw(SOLVER_PARAMS[name][0 if valid else 1].filter(lambda v: v is not None))
    params = {} if method == "pinv" else {"n_iter": 2}  # pinv reads no hyperparameter
    solver = InverseSolver(fitted()[0], ops.Denoising(N), method=method,
                           **{**params, name: value})
    if valid and name in solver._method().defaults:
        finite(solver.predict(data()[:3]), (3, N))
    else:
        assert name in raises(ValueError, solver.predict, data()[:3])


OTHER_SOLVER_PARAMS = {
    # (valid, invalid, error, text of the error)
    "method": ([m for m in SOLVER_METHODS], ["x", 3, None, "Glowip"], ValueError,
               "unknown method"),
    "method_params": ([None, {}], ["x", [("n_iter", 2)]], TypeError, "method_params"),
    "device": ([None, "cpu", "auto"], ["tpu", 3.5], ValueError, "device"),
    "random_state": ([None, 0, np.random.RandomState(0)], ["x", -1, 1.5], ValueError, "seed"),
    "on_nonfinite": (["raise", "warn"], ["x", 1, None], ValueError, "on_nonfinite"),
    "operator": ([ops.Denoising(N), ops.Blur((1, 2, 2)), ops.SuperResolution((1, 2, 2), 2)],
                 [np.eye(N), None, lambda x: x], TypeError, "operator must be"),
}


@pytest.mark.parametrize("name", sorted(OTHER_SOLVER_PARAMS))
def test_solver_settings(name):
    prior = fitted()[0]
    valid, invalid, error, text = OTHER_SOLVER_PARAMS[name]
    for value in valid:
        solver = InverseSolver(prior, ops.Denoising(N), method="glowip", n_iter=2,
                               random_state=0).set_params(**{name: value})
        if solver.method == "pinv":
            solver.set_params(n_iter=None)
        Y = solver.operator.measure(data()[:3])
        finite(solver.predict(Y), (3, N))
    for value in invalid:
        solver = InverseSolver(prior, ops.Denoising(N), method="glowip", n_iter=2)
        message = raises(error, solver.set_params(**{name: value}).predict, data()[:3])
        assert text in message.lower()
    if name == "method_params":  # a dict naming a setting the method does not have
        solver = InverseSolver(prior, ops.Denoising(N), method_params={"foo": 1})
        assert "no settings" in raises(ValueError, solver.predict, data()[:3])
    if name == "operator":  # an operator for another number of features
        solver = InverseSolver(prior, ops.Denoising(N + 1))
        assert "acts on 5 features" in raises(ValueError, solver.predict, data()[:3])


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
def _width(op):
    return op.n_features // N  # Colorization works on 3 channels


@SETTINGS
@given(which=st.integers(0, 9), draw=st.data())
def test_operators_on_valid_arrays(which, draw):
    op = operators()[which]
    X = draw.draw(valid_arrays(width=op.n_features, bound=1e3))
    noise_std = draw.draw(st.floats(0, 1))
    Y = finite(op.measure(X, noise_std, 0), (len(X), op.output_dim))
    np.testing.assert_array_equal(op.check_measurements(Y), Y)


@SETTINGS
@given(which=st.integers(0, 9), draw=st.data())
def test_operators_on_invalid_arrays(which, draw):
    op = operators()[which]
    kinds = tuple(k for k in INVALID_KINDS if k != "beyond float32")  # float64 is computed
    _, X = draw.draw(invalid_arrays(width=op.n_features, kinds=kinds))
    raises(ValueError, op.measure, X, 0.1, 0)
    _, Y = draw.draw(invalid_arrays(width=op.output_dim, kinds=kinds))
    raises(ValueError, op.check_measurements, Y)
    X = np.full((2, op.n_features), 0.5, dtype=np.float32)
    noise = draw.draw(st.sampled_from([-1.0, np.nan, np.inf, "x", 1e300]))  # 1e300 overflows
    raises(ValueError, op.measure, X, noise, 0)


@SETTINGS
@given(x=hnp.arrays(np.float64, st.tuples(st.integers(1, 3), st.just(N)),
                    elements=st.floats(-1e3, 1e3)), which=st.integers(0, 9))
def test_operators_are_finite_and_adjoint_on_good_tensors(x, which):
    op = operators()[which].double()
    x = torch.as_tensor(np.concatenate([x] * _width(op), -1))
    y = op(x)
    assert y.shape == (len(x), op.output_dim) and torch.isfinite(y).all()
    v = torch.as_tensor(np.random.RandomState(0).standard_normal(y.shape))
    lhs, rhs = (y * v).sum(), (x * op.adjoint(v)).sum()
    assert torch.isclose(lhs, rhs, rtol=1e-9, atol=1e-9 * float(x.abs().max() + 1))
    assert torch.isfinite(op.pinv(v)).all()


SHAPE = (1, 2, 2)
CONSTRUCTORS = {
    # (build from one argument, valid arguments, invalid arguments)
    "Blur": (lambda a: ops.Blur(SHAPE, a),
             [1, 3, 5, np.ones((3, 3)) / 9, np.arange(3.0)[None]],
             [0, 2, -1, "x", None, 1.5, np.ones((2, 3)), np.full((3, 3), np.nan),
              np.ones(3)]),
    "Inpainting": (lambda a: ops.Inpainting(SHAPE, a),
                   [(0, 0, 1, 1), (0, 0, 2, 1), [1, 1, 2, 2]],
                   [(0, 0, 2, 2), (1, 1, 1, 2), (0, 0, 3, 1), (0, 0, 1), "x", 1.5,
                    (0.0, 0, 1, 1)]),
    "RandomMask": (lambda a: ops.RandomMask(SHAPE, a, random_state=1),
                   [0.0, 0.3, 0.7], [-0.1, 1.0, 2, np.nan, "x", None, 0.99]),
    "CompressedSensing": (lambda a: ops.CompressedSensing(N, a), [1, 3, 8],
                          [0, -1, 1.5, "3", None]),
    "SuperResolution": (lambda a: ops.SuperResolution(SHAPE, a), [1, 2],
                        [0, 3, -2, 1.5, "2", None]),
    "LimitedAngleTomography": (lambda a: ops.LimitedAngleTomography(SHAPE, a),
                               [1, 3, [0.0, 45.0], np.array([90.0])],
                               [0, [], [np.nan], np.ones((2, 2)), "x", 1.5]),
    "MatrixOperator": (ops.MatrixOperator, [np.eye(N), np.ones((2, N)), [[1.0, 2.0]]],
                       [np.zeros((0, N)), np.full((2, 2), np.inf), np.ones(3), "ab", None]),
    "Denoising": (ops.Denoising, [N, (2, 2), SHAPE], [0, -1, (2, 0), 1.5, "x", ()]),
}


@pytest.mark.parametrize("which", sorted(CONSTRUCTORS))
def test_operator_constructors(which):
    """Valid arguments build a finite operator; invalid ones raise ValueError (TypeError for
    a non-integer where an int is needed)."""
    build, valid, invalid = CONSTRUCTORS[which]
    for arg in valid:
        op = build(arg)
        x = torch.rand(2, op.n_features, dtype=torch.float64)
        y = op.double()(x)
        assert y.shape == (2, op.output_dim) and torch.isfinite(y).all()
    for arg in invalid:
        raises((ValueError, TypeError), build, arg)


# -- metrics ---------------------------------------------------------------------------------
@SETTINGS
@given(A=valid_arrays(bound=1e3), draw=st.data())
def test_image_metrics_on_valid_arrays(A, draw):
    B = draw.draw(hnp.arrays(np.float64, A.shape, elements=st.floats(-1e3, 1e3))
                  | st.just(A.copy()))
    data_range = draw.draw(st.floats(1e-3, 10))
    out = psnr(A, B, data_range=data_range)
    same = np.all(np.asarray(A, float) == np.asarray(B, float), axis=1)
    assert out.shape == (len(A),) and not np.isnan(out).any()
    assert np.array_equal(np.isinf(out), same)  # inf only for a perfect reconstruction
    A16, B16 = np.tile(A, (1, 4)), np.tile(B, (1, 4))
    finite(ssim(A16, B16, (1, 4, 4), data_range=data_range), (len(A),))


@SETTINGS
@given(case=invalid_arrays(kinds=("no rows", "NaN or inf", "complex", "text")),
       data_range=st.sampled_from([0.0, -1.0, np.nan, np.inf, "1", None, True]))
def test_image_metrics_on_invalid_input(case, data_range):
    """Metrics take one row as a 1-D array and any width, but not empty, non-finite or
    non-real arrays, arrays of two shapes, or a data_range that is not a number > 0."""
    _, A = case
    B = np.zeros((2, N))
    raises(ValueError, psnr, A, A)
    raises(ValueError, ssim, np.tile(A, (1, 4)) if A.ndim == 2 else A, np.zeros((2, 16)),
           (1, 4, 4))
    raises(ValueError, psnr, B, np.zeros((2, N + 1)))
    raises(ValueError, psnr, np.zeros((2, 2, N)), np.zeros((2, 2, N)))
    raises(ValueError, psnr, B, B, data_range=data_range)
    raises(ValueError, ssim, np.zeros((2, 16)), np.zeros((2, 16)), (1, 4, 4),
           data_range=data_range)
    assert "too small" in raises(ValueError, ssim, B, B, SHAPE)  # 2x2 images: no SSIM window


@SETTINGS
@given(ll=st.floats(-1e6, 1e6) | hnp.arrays(np.float64, hnp.array_shapes(max_dims=2),
                                             elements=st.floats(-1e6, 1e6)),
       n_features=st.integers(1, 100))
def test_bits_per_dim_valid(ll, n_features):
    finite(bits_per_dim(ll, n_features), np.shape(ll))


@SETTINGS
@given(ll=st.sampled_from([np.nan, np.inf, "x", None, np.array([1.0, np.nan]), 1j]),
       n_features=st.sampled_from([0, -1, 1.5, "4", None, True]))
def test_bits_per_dim_invalid(ll, n_features):
    raises(ValueError, bits_per_dim, ll, 4)
    raises(ValueError, bits_per_dim, -1.0, n_features)


@SETTINGS
@given(X=valid_arrays(), Y=valid_arrays(), n_draws=st.integers(1, 4),
       temperature=st.floats(0, 2))
def test_robustness_metrics_on_valid_input(X, Y, n_draws, temperature):
    prior, injective, point, amortized = fitted()
    for est in (prior, injective):
        out = ood_score(est, X)
        assert out.shape == (len(X),) and (out >= 0).all() and np.isfinite(out).all()
        assert 0 <= inf_rate(est, X) <= 1
        assert 0 <= inf_rate(est, n_draws=n_draws, temperature=temperature) <= 1
    out = ood_score(amortized, Y)
    assert out.shape == (len(Y),) and np.isfinite(out).all()
    assert 0 <= inf_rate(amortized, Y, n_draws=n_draws) <= 1


@SETTINGS
@given(case=invalid_arrays(), temperature=st.sampled_from([-1.0, np.nan, np.inf, "1", None]))
def test_robustness_metrics_on_invalid_input(case, temperature):
    _, X = case
    prior, injective, point, amortized = fitted()
    for est in (prior, injective, amortized):
        raises(ValueError, ood_score, est, X)
        raises(ValueError, inf_rate, est, X)
    raises(ValueError, inf_rate, prior, temperature=temperature)
    raises(ValueError, inf_rate, amortized, data(), temperature=0.5)
    assert "amortized-vi" in raises(ValueError, ood_score, point, data())
    raises(TypeError, ood_score, np.eye(2), data())


@SETTINGS
@given(n_samples=st.integers(1, 50),
       shift=st.tuples(st.floats(-5, 5), st.floats(-5, 5)) | st.just(np.array([0.8, -0.8])),
       noise=st.floats(0, 1))
def test_make_mixing_toy_valid(n_samples, shift, noise):
    X, Y = make_mixing_toy(n_samples, shift, noise, random_state=0)
    finite(X, (n_samples, 2)), finite(Y, (n_samples, 2))
    assert np.abs(X).max() <= 1


@SETTINGS
@given(case=st.one_of(
    st.tuples(st.just("n_samples"), st.sampled_from([0, -3, 1.5, "10", None, True])),
    st.tuples(st.just("shift"), st.sampled_from([(0.0,), (1, 2, 3), (np.nan, 0), "ab",
                                                 (1j, 0)])),
    st.tuples(st.just("noise"), st.sampled_from([-0.1, np.inf, np.nan, "0.1", None, True]))))
def test_make_mixing_toy_invalid(case):
    name, value = case
    assert name in raises(ValueError, make_mixing_toy, **{name: value})

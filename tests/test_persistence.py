"""``flowsk.save`` / ``flowsk.load``: exact round trips of priors, solvers and operators, loading
without CUDA, and one clear error for every kind of bad file."""
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import flowsk
from flowsk import FlowPrior, InjectiveFlowPrior, InverseSolver, ModelFileError
from flowsk import operators as ops
from flowsk.datasets import load_digit_images

SHAPE = (1, 8, 8)
SMALL = {"max_epochs": 2, "batch_size": 32, "random_state": 0, "device": "cpu"}
PRIORS = {
    "mlp-affine": lambda: FlowPrior(architecture="mlp", coupling="affine", n_steps=2,
                                    hidden_features=16, data_range=(0, 1), dequantize=1 / 16,
                                    **SMALL),
    "glow-spline": lambda: FlowPrior(image_shape=SHAPE, architecture="glow", coupling="spline",
                                     n_steps=1, hidden_features=8, data_range=(0.0, 1.0),
                                     dequantize=1 / 16, **SMALL),
    "realnvp-additive": lambda: FlowPrior(image_shape=SHAPE, architecture="realnvp",
                                          coupling="additive", n_steps=1, hidden_features=8,
                                          **SMALL),
    "chavez-robust-spline": lambda: FlowPrior(image_shape=SHAPE, architecture="chavez",
                                              coupling="robust-spline", n_steps=1,
                                              hidden_features=8, **SMALL),
    "injective-dense": lambda: InjectiveFlowPrior(latent_dim=8, n_steps=1, n_latent_steps=2,
                                                  hidden_features=16, logdet="exact", **SMALL),
    "injective-conv-relu": lambda: InjectiveFlowPrior(
        image_shape=SHAPE, latent_dim=8, activation="relu", coupling="spline", n_steps=1,
        n_latent_steps=2, hidden_features=8, data_range=(0, 1), **SMALL),
}


@pytest.fixture(scope="module")
def X():
    return load_digit_images()[0][:240]


def _perturb(module, seed=1):
    """Move every weight well off its trained value (a prior trained for two epochs is nearly
    the identity, where a weight that fails to load could go unnoticed), then refresh the
    inverses cached in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return module.train().eval()


@pytest.fixture(scope="module", params=sorted(PRIORS))
def prior(request, X):
    est = PRIORS[request.param]().fit(X[:100])
    _perturb(est.flow_)
    return est


@pytest.fixture(scope="module")
def mlp_prior(X):
    est = PRIORS["mlp-affine"]().fit(X[:100])
    _perturb(est.flow_)
    return est


@pytest.fixture(scope="module")
def good_file(mlp_prior, tmp_path_factory):
    return flowsk.save(mlp_prior, tmp_path_factory.mktemp("good") / "prior.flowsk")


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key].cpu(), sb[key].cpu()), key


def _assert_same_covariance(a, b):
    for attr in ("location_", "covariance_", "precision_"):
        np.testing.assert_array_equal(getattr(a, attr), getattr(b, attr))


# -- round trips ---------------------------------------------------------------------------------
def test_prior_round_trip_is_exact(prior, X, tmp_path):
    path = flowsk.save(prior, tmp_path / "prior.flowsk")
    state = torch.get_rng_state()
    loaded = flowsk.load(path)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is untouched
    assert type(loaded) is type(prior) and loaded.get_params() == prior.get_params()
    X_test = X[200:]
    np.testing.assert_array_equal(loaded.score_samples(X_test), prior.score_samples(X_test))
    Z = prior.transform(X_test)
    np.testing.assert_array_equal(loaded.transform(X_test), Z)
    np.testing.assert_array_equal(loaded.inverse_transform(Z), prior.inverse_transform(Z))
    np.testing.assert_array_equal(loaded.sample(6, temperature=0.8, random_state=3),
                                  prior.sample(6, temperature=0.8, random_state=3))
    if isinstance(prior, InjectiveFlowPrior):
        np.testing.assert_array_equal(loaded.project(X_test), prior.project(X_test))
        assert (loaded.latent_dim_, loaded.mse_best_epoch_) == (prior.latent_dim_,
                                                                prior.mse_best_epoch_)
    assert loaded.history_ == prior.history_ and loaded.best_epoch_ == prior.best_epoch_
    assert loaded.n_features_in_ == prior.n_features_in_ and loaded.device_ == prior.device_
    assert loaded.training_range_ == prior.training_range_
    _assert_same_covariance(loaded.latent_covariance_, prior.latent_covariance_)
    _assert_same_state(loaded.flow_, prior.flow_)
    assert not loaded.flow_.training
    assert not any(p.requires_grad for p in loaded.flow_.parameters())


def test_a_loaded_prior_refits_like_the_original(X, tmp_path):
    est = PRIORS["mlp-affine"]().fit(X[:100])
    loaded = flowsk.load(flowsk.save(est, tmp_path / "prior.flowsk"))
    loaded.fit(X[:100])
    np.testing.assert_array_equal(loaded.score_samples(X[200:]), est.score_samples(X[200:]))


def test_history_with_nan_and_feature_names_round_trip(mlp_prior, tmp_path):
    import pandas as pd
    columns = [f"pixel{i}" for i in range(64)]
    est = PRIORS["mlp-affine"]().set_params(max_epochs=1)
    est.fit(pd.DataFrame(load_digit_images()[0][:50], columns=columns))
    est.history_["val_loss"][0] = float("nan")  # an epoch that diverged and was undone
    loaded = flowsk.load(flowsk.save(est, tmp_path / "prior.flowsk"))
    assert np.isnan(loaded.history_["val_loss"][0])
    assert loaded.history_["train_loss"] == est.history_["train_loss"]
    assert list(loaded.feature_names_in_) == columns


@pytest.fixture(scope="module")
def amortized(mlp_prior, X):
    operator = ops.Inpainting(SHAPE, box=(2, 2, 6, 6))
    solver = InverseSolver(mlp_prior, operator, method="amortized-vi", sigma=0.1, n_samples=8,
                           method_params={"coupling": "robust-spline", "n_iter": 3,
                                          "n_simulations": 1000, "n_steps": 2,
                                          "hidden_features": 16},
                           random_state=0)
    solver.fit(operator.measure(X[:20], noise_std=0.05, random_state=0))
    _perturb(solver.model_)
    return solver


def test_amortized_solver_round_trip_is_exact(amortized, X, tmp_path):
    path = flowsk.save(amortized, tmp_path / "solver.flowsk")
    loaded = flowsk.load(path)
    assert type(loaded.operator) is ops.Inpainting and type(loaded.prior) is FlowPrior
    params, expected = loaded.get_params(deep=False), amortized.get_params(deep=False)
    assert {k: v for k, v in params.items() if k not in ("prior", "operator")} == {
        k: v for k, v in expected.items() if k not in ("prior", "operator")}
    Y = amortized.operator.measure(X[200:210], noise_std=0.05, random_state=1)
    mean, std = amortized.predict(Y, return_std=True)
    loaded_mean, loaded_std = loaded.predict(Y, return_std=True)
    np.testing.assert_array_equal(loaded_mean, mean)
    np.testing.assert_array_equal(loaded_std, std)
    np.testing.assert_array_equal(loaded.sample_posterior(Y, 5), amortized.sample_posterior(Y, 5))
    features, cov = amortized.ood_features(Y)
    loaded_features, loaded_cov = loaded.ood_features(Y)
    np.testing.assert_array_equal(loaded_features, features)
    _assert_same_covariance(loaded_cov, cov)
    _assert_same_state(loaded.model_, amortized.model_)
    _assert_same_state(loaded.prior.flow_, amortized.prior.flow_)


def _operators():
    rng = np.random.RandomState(0)
    return {
        "Denoising": ops.Denoising(SHAPE),
        "Blur": ops.Blur(SHAPE, kernel=rng.rand(3, 5)),
        "Inpainting": ops.Inpainting(SHAPE, mask=rng.rand(8, 8) > 0.4),
        "RandomMask": ops.RandomMask(SHAPE, 0.3, random_state=0),
        "SuperResolution": ops.SuperResolution(SHAPE, 2),
        "MatrixOperator": ops.MatrixOperator(rng.randn(20, 64), SHAPE),
        "CompressedSensing": ops.CompressedSensing(SHAPE, 16, random_state=0),
        "LimitedAngleTomography": ops.LimitedAngleTomography(SHAPE, angles=[10.0, 47.5, 120.0]),
        "Colorization": ops.Colorization((3, 4, 4)),
    }


@pytest.fixture(scope="module")
def color_prior():
    X = np.random.RandomState(0).rand(100, 48)
    return FlowPrior(n_steps=1, hidden_features=8, data_range=(0, 1), max_epochs=1,
                     device="cpu", random_state=0).fit(X)


@pytest.mark.parametrize("name", sorted(_operators()))
def test_solver_operators_round_trip(name, mlp_prior, color_prior, tmp_path):
    operator = _operators()[name]
    prior = color_prior if name == "Colorization" else mlp_prior
    solver = InverseSolver(prior, operator, method="glowip", n_iter=3, random_state=0)
    solver.fit(np.zeros((1, operator.output_dim)))
    loaded = flowsk.load(flowsk.save(solver, tmp_path / "solver.flowsk"))
    op = loaded.operator
    assert type(op) is type(operator)
    assert (op.input_shape, op.output_dim) == (operator.input_shape, operator.output_dim)
    for attr in ("p", "factor", "angles", "n_detectors"):
        np.testing.assert_array_equal(getattr(op, attr, None), getattr(operator, attr, None))
    _assert_same_state(op, operator)
    x = torch.rand(4, operator.n_features, dtype=torch.float64)
    assert torch.equal(op(x), operator(x))
    assert torch.equal(op.pinv(operator(x)), operator.pinv(operator(x)))
    X = prior.sample(3, random_state=0)
    Y = operator.measure(X, noise_std=0.01, random_state=0)
    np.testing.assert_array_equal(loaded.predict(Y), solver.predict(Y))
    assert loaded.score(Y, X) == solver.score(Y, X)


def test_a_parameter_the_file_lacks_takes_its_default(good_file, tmp_path):
    def drop(spec):
        assert spec["params"].pop("batch_size") == 32
    loaded = flowsk.load(_rewrite(good_file, tmp_path / "older.flowsk", edit_spec=drop))
    assert loaded.batch_size == FlowPrior().batch_size == 64


def test_unfitted_solver_round_trip(mlp_prior, tmp_path):
    solver = InverseSolver(mlp_prior, ops.Denoising(SHAPE), method="likelihood", alpha=0.5)
    loaded = flowsk.load(flowsk.save(solver, tmp_path / "solver.flowsk"))
    assert not hasattr(loaded, "n_features_in_") and loaded.alpha == 0.5


def test_header_is_readable_without_flowsk(good_file):
    with safe_open(good_file, framework="pt") as handle:
        meta = handle.metadata()
        names = set(handle.keys())
    assert (meta["format"], meta["format_version"]) == ("flowsk", "2")
    assert meta["flowsk_version"] == flowsk.__version__
    spec = json.loads(meta["estimator"])
    assert spec["class"] == "FlowPrior" and spec["params"]["data_range"] == [0, 1]
    assert spec["fitted"]["n_features_in_"] == 64
    assert "latent_covariance_.covariance_" in names and "history_.train_loss" in names


# -- devices -------------------------------------------------------------------------------------
def test_a_model_saved_from_cuda_loads_on_the_cpu(mlp_prior, X, tmp_path, monkeypatch):
    """What a GPU-fitted prior writes (``device="cuda"``, ``device_`` cuda) loads on a machine
    without CUDA: on the CPU, with the parameter kept as the user set it."""
    est = flowsk.load(flowsk.save(mlp_prior, tmp_path / "copy.flowsk"))
    est.set_params(device="cuda")
    est.device_ = torch.device("cuda:0")
    path = flowsk.save(est, tmp_path / "cuda.flowsk")
    with safe_open(path, framework="pt") as handle:
        assert json.loads(handle.metadata()["estimator"])["fitted"]["device_"] == "cuda:0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loaded = flowsk.load(path)
    assert loaded.device_ == torch.device("cpu") and loaded.device == "cuda"
    assert all(t.device.type == "cpu" for t in loaded.flow_.state_dict().values())
    np.testing.assert_array_equal(loaded.score_samples(X[200:]),
                                  mlp_prior.score_samples(X[200:]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fitted_prior_loads_in_a_process_without_cuda(X, tmp_path):
    est = PRIORS["mlp-affine"]().set_params(device="cuda").fit(X[:100])
    path = flowsk.save(est, tmp_path / "cuda.flowsk")
    np.save(tmp_path / "X.npy", X[200:])
    script = textwrap.dedent("""
        import sys, numpy as np, flowsk
        est = flowsk.load(sys.argv[1])
        assert est.device_.type == "cpu"
        np.save(sys.argv[3], est.score_samples(np.load(sys.argv[2])))
    """)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(Path.cwd())}
    subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "X.npy"),
                    str(tmp_path / "out.npy")], check=True, env=env, timeout=300)
    reference = flowsk.load(path)
    reference.flow_.cpu()
    reference.device_ = torch.device("cpu")
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), reference.score_samples(X[200:]))


# -- what cannot be saved ------------------------------------------------------------------------
def test_save_errors(mlp_prior, tmp_path):
    path = tmp_path / "never.flowsk"
    with pytest.raises(NotFittedError):
        flowsk.save(FlowPrior(), path)
    with pytest.raises(TypeError, match="joblib"):
        flowsk.save(make_pipeline(StandardScaler()), path)
    est = flowsk.load(flowsk.save(mlp_prior, tmp_path / "copy.flowsk"))
    with pytest.raises(ValueError, match="random_state"):
        flowsk.save(est.set_params(random_state=np.random.RandomState(0)), path)
    operator = ops.FunctionOperator(lambda x: 2 * x, SHAPE)
    with pytest.raises(TypeError, match="FunctionOperator"):
        flowsk.save(InverseSolver(mlp_prior, operator), path)
    with pytest.raises(OSError, match="cannot write"):
        flowsk.save(mlp_prior, tmp_path / "no such folder" / "prior.flowsk")
    assert not path.exists()


# -- bad files -----------------------------------------------------------------------------------
def _rewrite(src, dst, edit_tensors=None, edit_meta=None, edit_spec=None):
    """Copy the model file ``src`` to ``dst`` with its tensors, header or estimator JSON
    edited in place by the given functions."""
    with safe_open(src, framework="pt") as handle:
        meta = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_spec:
        spec = json.loads(meta["estimator"])
        edit_spec(spec)
        meta["estimator"] = json.dumps(spec)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, dst, metadata=meta)
    return dst


def _first_flow_tensor(tensors):
    return next(k for k in sorted(tensors) if k.startswith("flow_.") and tensors[k].dim() == 1
                and tensors[k].is_floating_point())


def _set(key, value):
    def edit(d):
        d[key] = value
    return edit


def _set_param(key, value):
    def edit(spec):
        spec["params"][key] = value
    return edit


def _truncate(n_bytes):
    def make(src, dst):
        dst.write_bytes(src.read_bytes()[:n_bytes(len(src.read_bytes()))])
        return dst
    return make


def _reshape_one(tensors):
    key = _first_flow_tensor(tensors)
    tensors[key] = torch.zeros(len(tensors[key]) + 1)


def _to_double(tensors):
    key = _first_flow_tensor(tensors)
    tensors[key] = tensors[key].double()


def _drop_one(tensors):
    del tensors[_first_flow_tensor(tensors)]


def _fitted(key, value):
    def edit(spec):
        spec["fitted"][key] = value
    return edit


BAD_FILES = {
    "truncated data": (_truncate(lambda n: n - 100), "truncated"),
    "truncated header": (_truncate(lambda n: 6), "truncated"),
    "empty": (_truncate(lambda n: 0), "truncated"),
    "wrong shape": (lambda s, d: _rewrite(s, d, edit_tensors=_reshape_one), "shape"),
    "wrong dtype": (lambda s, d: _rewrite(s, d, edit_tensors=_to_double), "dtype"),
    "missing tensor": (lambda s, d: _rewrite(s, d, edit_tensors=_drop_one), "missing"),
    "extra tensor": (lambda s, d: _rewrite(s, d, edit_tensors=_set("flow_.x", torch.zeros(2))),
                     "unexpected tensors"),
    "unknown format version": (lambda s, d: _rewrite(s, d, edit_meta=_set("format_version",
                                                                          "1")),
                               "unknown format version '1'"),
    "newer flowsk": (lambda s, d: _rewrite(s, d, edit_meta=_set("flowsk_version", "99.0.0")),
                     "newer than this flowsk"),
    "not flowsk's header": (lambda s, d: _rewrite(s, d, edit_meta=lambda m: m.clear()),
                            "not a flowsk model file"),
    "header not JSON": (lambda s, d: _rewrite(s, d, edit_meta=_set("estimator", "{prior")),
                        "not JSON"),
    "parameter of the wrong type": (lambda s, d: _rewrite(s, d, edit_spec=_set_param(
        "n_steps", "2")), "n_steps must be a positive int"),
    "data_range of the wrong type": (lambda s, d: _rewrite(s, d, edit_spec=_set_param(
        "data_range", ["0", "1"])), "data_range"),
    "random_state of the wrong type": (lambda s, d: _rewrite(s, d, edit_spec=_set_param(
        "random_state", "0")), "random_state must be an int"),
    "unknown parameter": (lambda s, d: _rewrite(s, d, edit_spec=_set_param("depth", 3)),
                          "FlowPrior has no parameters \\['depth'\\]"),
    "fitted value of the wrong type": (lambda s, d: _rewrite(s, d, edit_spec=_fitted(
        "n_features_in_", 64.0)), "n_features_in_ must be int"),
    "bad training range": (lambda s, d: _rewrite(s, d, edit_spec=_fitted(
        "training_range_", [1.0, 0.0])), "training_range_ must be"),
    "unknown class": (lambda s, d: _rewrite(s, d, edit_spec=_set("class", "Evil")),
                      "unknown estimator class 'Evil'"),
    "a pickle": (lambda s, d: joblib.dump(flowsk.load(s), d) and d, "is a pickle"),
    "torch.save": (lambda s, d: torch.save({"w": torch.zeros(2)}, d) or d, "is a pickle"),
}


@pytest.mark.filterwarnings("error")  # the error and nothing else: no warning either
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_raise_one_clear_error(case, good_file, tmp_path):
    make, words = BAD_FILES[case]
    path = make(good_file, tmp_path / "bad.flowsk")
    with pytest.raises(ModelFileError, match=words) as info:
        flowsk.load(path)
    assert str(path) in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__ | (
        info.value.__context__ is None)  # one error, not a chain


@pytest.mark.filterwarnings("error")
def test_bad_solver_files(amortized, tmp_path):
    good = flowsk.save(amortized, tmp_path / "solver.flowsk")

    def bad_indices(tensors):
        tensors["operator.indices"] = tensors["operator.indices"] + 1000

    def solver_param(spec):
        spec["params"]["method_params"]["n_steps"] = "two"

    def operator_class(spec):
        spec["params"]["operator"]["class"] = "FunctionOperator"

    def nested_solver(spec):
        spec["params"]["prior"] = json.loads(json.dumps(spec))

    cases = [(dict(edit_tensors=bad_indices), "cannot rebuild the Inpainting"),
             (dict(edit_tensors=_set("model_.y_mean", torch.zeros(3))), "model_.y_mean"),
             (dict(edit_spec=solver_param), "n_steps"),
             (dict(edit_spec=operator_class), "unknown operator class 'FunctionOperator'"),
             (dict(edit_spec=_set_param("n_iter", -1)), "n_iter"),
             (dict(edit_spec=nested_solver), "prior: unknown estimator class 'InverseSolver'")]
    for i, (edits, words) in enumerate(cases):
        path = _rewrite(good, tmp_path / f"bad{i}.flowsk", **edits)
        with pytest.raises(ModelFileError, match=words):
            flowsk.load(path)


class _Payload:
    """A pickle that creates a file when it is unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_pickle_is_never_unpickled(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "model.flowsk"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ModelFileError, match="pickle"):
        flowsk.load(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the file is live: unpickling it runs its code
    assert marker.exists()

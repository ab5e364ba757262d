"""ONNX export: parity with PyTorch for every part, architecture and coupling; deployment
without PyTorch; metadata; errors."""
import functools
import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _reference import assert_float32_accurate
from sklearn.exceptions import NotFittedError

import flowsk
from exporters import FORBIDDEN_OPS, available_parts, check_onnx, op_types, read_metadata, to_onnx
from exporters.onnx import _cpu_copy, _get_part
from flowsk import FlowPrior
from flowsk.methods.variational import amortized_context
from flowsk.nn.coupling import Coupling
from flowsk.operators import Inpainting

ARCHITECTURES = ["mlp", "glow", "realnvp", "chavez"]
COUPLINGS = ["affine", "additive", "spline", "robust-spline"]
PARTS = ["decoder", "encoder", "log_prob"]
BATCHES = (1, 7, 300)
TOL = 1e-4
# Every fitted model below has each parameter moved by this much times a standard normal draw:
# one epoch from zero-initialised output layers leaves couplings (splines most) near the
# identity, where export errors in the transforms could not show.
PERTURBATION = 0.3
# ... and then every coupling moves its transformed half by at least this much somewhere.
MIN_COUPLING_MOVE = 0.1
# The matrix below runs the image architectures with one level (squeeze, steps, no split) to
# stay fast; these add multiscale splits (two and three levels, 1x1 maps at the last level)
# and unbounded data (no logit layer, spline tails in use).
EXTRA = [
    pytest.param("mlp", "spline", None, (1, 4, 4), 2, id="mlp-spline-unbounded"),
    pytest.param("glow", "additive", None, (1, 4, 4), 2, id="glow-additive-unbounded-2levels"),
    pytest.param("realnvp", "robust-spline", None, (1, 4, 4), 2,
                 id="realnvp-robust-unbounded-2levels"),
    pytest.param("chavez", "affine", (0.0, 1.0), (1, 4, 4), 2, id="chavez-affine-2levels"),
    pytest.param("glow", "affine", (0.0, 1.0), (1, 8, 8), 3, id="glow-8x8-3levels"),
]
HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()


def _data(image_shape, seed=0):
    rng = np.random.RandomState(seed)
    X = rng.beta(2.0, 3.0, (40, int(np.prod(image_shape))))
    X[0, :3] = 0.0, 1.0, 0.5  # values on the bounds of data_range too
    return X


def _config(architecture, coupling, data_range=(0.0, 1.0), image_shape=(1, 4, 4), n_levels=1):
    return architecture, coupling, data_range, image_shape, n_levels


def _prior(*args):
    """A tiny fitted prior (see ``_config`` for the arguments), fitted once per configuration."""
    return _fit(*_config(*args))


def _perturb(module, seed=0):
    """Add ``PERTURBATION`` standard normal noise to every parameter of ``module`` (in eval
    mode, which refreshes the cached LU inverses and pseudo-inverses)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(PERTURBATION * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module.eval()


def coupling_moves(module, run):
    """The largest ``|output - input|`` of each coupling layer of ``module`` run forward
    (data to latent) during ``run()``; a coupling that moves its input forward does so in
    its inverse too (the inverse of a non-identity map)."""
    moves = []
    hooks = [m.register_forward_hook(
        lambda layer, inputs, output: moves.append((output[0] - inputs[0]).abs().max().item()))
        for m in module.modules() if isinstance(m, Coupling)]
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    assert moves, "no coupling layer ran"
    return moves


@functools.cache
def _fit(architecture, coupling, data_range, image_shape, n_levels):
    est = FlowPrior(image_shape=image_shape, architecture=architecture, coupling=coupling,
                    n_levels=n_levels, n_steps=1, hidden_features=8, data_range=data_range,
                    max_epochs=1, batch_size=16, random_state=0, device="cpu",
                    on_nonfinite="warn").fit(_data(image_shape))
    _perturb(est.flow_)
    return est


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def exported(export_dir):
    """``exported(part, *prior_args) -> (estimator, path)``, each file written once."""
    cache = {}

    def get(part, *args):
        args = _config(*args)
        if (part, args) not in cache:
            est = _prior(*args)
            path = export_dir / ("-".join(map(str, (part, *args))).replace(" ", "") + ".onnx")
            assert to_onnx(est, path, part=part) == path
            cache[part, args] = est, path
        return cache[part, args]

    return get


def _assert_parity(est, path, part):
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert not op_types(model) & FORBIDDEN_OPS
    batch_dims = [inp.type.tensor_type.shape.dim[0].dim_param for inp in model.graph.input]
    assert batch_dims == ["batch"] * len(batch_dims)
    spec = _get_part(est, part)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    module = _cpu_copy(spec.module(est))
    rng = np.random.RandomState(1)
    outputs, batches = [], []
    for n in BATCHES:  # each batch size runs on its own; the accuracy is judged on them all
        inputs = spec.sample_inputs(est, n, rng)
        (got,) = session.run(None, dict(zip(spec.input_names, inputs)))
        assert got.shape[0] == n
        outputs.append(got)
        batches.append(inputs)
    inputs = [torch.from_numpy(np.concatenate(parts)) for parts in zip(*batches)]
    assert_float32_accurate(np.concatenate(outputs), module, inputs, TOL)


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_parity_every_architecture_and_coupling(exported, architecture, coupling, part):
    est, path = exported(part, architecture, coupling)
    _assert_parity(est, path, part)


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("architecture, coupling, data_range, image_shape, n_levels", EXTRA)
def test_parity_unbounded_and_deeper_multiscale(exported, architecture, coupling, data_range,
                                                image_shape, n_levels, part):
    est, path = exported(part, architecture, coupling, data_range, image_shape, n_levels)
    _assert_parity(est, path, part)


ALL_PRIORS = ([_config(a, c) for a in ARCHITECTURES for c in COUPLINGS]
              + [p.values for p in EXTRA])


@pytest.mark.parametrize("config", ALL_PRIORS, ids=lambda c: "-".join(map(str, c)))
def test_exported_priors_are_far_from_the_identity(config):
    """The perturbation bends the flows whose parity the tests check: every coupling moves the
    transformed half of its input by at least MIN_COUPLING_MOVE on the data."""
    est = _prior(*config)
    x = torch.tensor(_data(config[3], seed=1), dtype=torch.float32)
    assert min(coupling_moves(est.flow_, lambda: est.flow_(x))) > MIN_COUPLING_MOVE


@pytest.mark.parametrize("part", PARTS)
def test_check_onnx_reports_small_error(exported, part):
    """check_onnx reports the largest difference on the inputs it draws, and the file is as
    accurate as PyTorch's float32 evaluation there."""
    est, path = exported(part, "glow", "spline")
    spec = _get_part(est, part)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    module = _cpu_copy(spec.module(est))
    for n in BATCHES:
        err = check_onnx(path, est, n_samples=n, random_state=0)
        inputs = spec.sample_inputs(est, n, np.random.RandomState(0))
        (got,) = session.run(None, dict(zip(spec.input_names, inputs)))
        with torch.no_grad():
            ref = module(*map(torch.from_numpy, inputs)).numpy()
        assert isinstance(err, float) and err == pytest.approx(np.abs(got - ref).max(), rel=1e-6)
        assert_float32_accurate(got, module, list(map(torch.from_numpy, inputs)), TOL)


def test_lu_convolution_exports_without_inverse_or_det(exported):
    """glow's 1x1 convolutions run their cached inverse: no Inverse/Det op in any part."""
    for part in PARTS:
        _, path = exported(part, "glow", "affine")
        ops = op_types(path)
        assert "Conv" in ops
        assert not ops & {"Inverse", "Det", "NonZero", "Compress"}, (part, ops)


def test_metadata_round_trip(exported):
    est, path = exported("decoder", "glow", "affine")
    meta = read_metadata(path)
    assert meta["part"] == "decoder"
    assert meta["estimator"] == "FlowPrior"
    assert meta["image_shape"] == [1, 4, 4]
    assert meta["data_range"] == [0.0, 1.0]
    assert meta["latent_dim"] == est.flow_.latent_dim == 16
    assert meta["n_features"] == 16
    assert meta["inputs"] == ["z"] and meta["outputs"] == ["x"]
    assert meta["flowsk_version"] == flowsk.__version__
    # the same, read by onnxruntime alone
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    raw = session.get_modelmeta().custom_metadata_map
    assert {k: json.loads(v) for k, v in raw.items()} == meta
    _, path = exported("log_prob", "mlp", "spline", None, (1, 4, 4), 2)
    meta = read_metadata(path)
    assert meta["part"] == "log_prob" and meta["data_range"] is None
    assert meta["outputs"] == ["log_prob"]


def test_export_leaves_estimator_untouched(tmp_path):
    est = _prior("glow", "affine")
    before = est.sample(5, random_state=0)
    state = {k: v.clone() for k, v in est.flow_.state_dict().items()}
    training = [m.training for m in est.flow_.modules()]
    to_onnx(est, tmp_path / "encoder.onnx", part="encoder")
    assert [m.training for m in est.flow_.modules()] == training
    assert all(torch.equal(v, est.flow_.state_dict()[k]) for k, v in state.items())
    np.testing.assert_array_equal(est.sample(5, random_state=0), before)


def test_opset(tmp_path):
    est = _prior("mlp", "affine")
    path = to_onnx(est, tmp_path / "d.onnx", opset=17)
    assert {o.version for o in onnx.load(path).opset_import if o.domain in ("", "ai.onnx")} == {17}
    assert check_onnx(path, est) <= TOL
    with pytest.raises(ValueError, match="opset"):
        to_onnx(est, tmp_path / "e.onnx", opset="17")


DEPLOY = textwrap.dedent("""
    import importlib.abc, json, sys

    class _NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "flowsk", "exporters", "sklearn"):
                raise ImportError(f"{name} is blocked in this deployment test")
            return None

    sys.meta_path.insert(0, _NoTorch())
    import numpy as np
    import onnxruntime as ort

    path, out = sys.argv[1], sys.argv[2]
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}

    def sample(n, temperature, seed):
        z = temperature * np.random.RandomState(seed).standard_normal((n, meta["latent_dim"]))
        return session.run(["x"], {"z": z.astype(np.float32)})[0]

    a, b, c = sample(9, 0.7, 3), sample(9, 0.7, 3), sample(9, 0.7, 4)
    images = a.reshape(-1, *meta["image_shape"])
    lo, hi = meta["data_range"]
    assert images.shape == (9, 1, 4, 4) and lo <= a.min() and a.max() <= hi
    assert not any(m.split(".")[0] == "torch" for m in sys.modules)
    np.savez(out, a=a, b=b, c=c)
""")


def test_decoder_runs_with_numpy_and_onnxruntime_only(exported, tmp_path):
    est, path = exported("decoder", "glow", "affine")
    script = tmp_path / "deploy.py"
    script.write_text(DEPLOY)
    out = tmp_path / "samples.npz"
    proc = subprocess.run([sys.executable, str(script), str(path), str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    res = np.load(out)
    np.testing.assert_array_equal(res["a"], res["b"])  # same seed, same samples
    assert np.abs(res["a"] - res["c"]).max() > 1e-3  # another seed, other samples
    expected = est.sample(9, temperature=0.7, random_state=3)  # same latent draws
    np.testing.assert_allclose(res["a"], expected, rtol=0, atol=1e-5)


def test_blocked_import_really_blocks(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(DEPLOY.split("import numpy")[0] + "import torch\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode != 0 and "blocked" in proc.stderr


def test_unknown_part_lists_valid_parts(tmp_path):
    est = _prior("mlp", "affine")
    assert available_parts(est) == available_parts(FlowPrior) == sorted(PARTS)
    with pytest.raises(ValueError, match="decoder, encoder, log_prob"):
        to_onnx(est, tmp_path / "x.onnx", part="projector")


def test_unfitted_estimator(tmp_path, exported):
    with pytest.raises(NotFittedError):
        to_onnx(FlowPrior(), tmp_path / "x.onnx")
    _, path = exported("decoder", "mlp", "affine")
    with pytest.raises(NotFittedError):
        check_onnx(path, FlowPrior())
    assert not (tmp_path / "x.onnx").exists()


def test_unsupported_estimator(tmp_path):
    from sklearn.decomposition import PCA
    with pytest.raises(TypeError, match="FlowPrior"):
        to_onnx(PCA().fit(np.eye(3)), tmp_path / "x.onnx")


def test_check_onnx_rejects_a_file_of_another_model(exported, tmp_path):
    _, path = exported("decoder", "mlp", "affine")
    other = _prior("glow", "affine", (0.0, 1.0), (1, 8, 8), 3)
    with pytest.raises(ValueError, match="another model"):
        check_onnx(path, other)
    plain = tmp_path / "plain.onnx"
    model = onnx.load(path)
    del model.metadata_props[:]
    onnx.save(model, plain)
    with pytest.raises(ValueError, match="no flowsk metadata"):
        check_onnx(plain, _prior("mlp", "affine"))


@pytest.mark.skipif(HAS_CUDA_EP, reason="onnxruntime has a CUDAExecutionProvider here")
def test_cuda_request_without_cuda_provider_fails_loudly(exported):
    est, path = exported("decoder", "mlp", "affine")
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
        check_onnx(path, est, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


@pytest.mark.skipif(not HAS_CUDA_EP, reason="onnxruntime has no CUDAExecutionProvider "
                    "(CPU-only onnxruntime; install onnxruntime-gpu to run this test)")
def test_cuda_provider_parity(tmp_path):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    est = FlowPrior(image_shape=(1, 4, 4), architecture="glow", coupling="spline", n_steps=1,
                    hidden_features=8, data_range=(0, 1), max_epochs=1, random_state=0,
                    device=device).fit(_data((1, 4, 4)))
    for part in PARTS:
        path = to_onnx(est, tmp_path / f"{part}.onnx", part=part)
        # TF32 off, so the GPU computes in true float32 like the PyTorch CPU reference
        providers = [("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"]
        for n in BATCHES:
            assert check_onnx(path, est, n_samples=n, providers=providers) <= TOL


# -- InjectiveFlowPrior and the amortized posterior sampler -----------------------------------
@functools.cache
def _injective(image_shape, activation):
    est = flowsk.InjectiveFlowPrior(image_shape=image_shape, latent_dim=4,
                                    activation=activation, n_steps=1, n_latent_steps=1,
                                    hidden_features=8, data_range=(0.0, 1.0), max_epochs=1,
                                    batch_size=16, random_state=0, device="cpu").fit(
        _data((1, 4, 4)))
    _perturb(est.flow_)
    return est


@pytest.mark.parametrize("part", ["decoder", "projector"])
@pytest.mark.parametrize("activation", ["linear", "relu"])
@pytest.mark.parametrize("image_shape", [None, (1, 4, 4)], ids=["dense", "conv1x1"])
def test_injective_parity(tmp_path, image_shape, activation, part):
    est = _injective(image_shape, activation)
    x = torch.tensor(_data((1, 4, 4), seed=1), dtype=torch.float32)
    assert min(coupling_moves(est.flow_, lambda: est.flow_(x))) > MIN_COUPLING_MOVE
    assert available_parts(est) == ["decoder", "projector"]
    path = to_onnx(est, tmp_path / f"{part}.onnx", part=part)
    _assert_parity(est, path, part)
    meta = read_metadata(path)
    assert (meta["part"], meta["latent_dim"], meta["n_features"]) == (part, 4, 16)


@functools.cache
def _amortized(coupling):
    prior = _prior("mlp", "affine")
    operator = Inpainting((1, 4, 4), box=(1, 1, 3, 3))
    solver = flowsk.InverseSolver(prior, operator, method="amortized-vi", sigma=0.1,
                                  method_params={"coupling": coupling, "n_iter": 3,
                                                 "n_simulations": 2000, "n_steps": 2,
                                                 "hidden_features": 16},
                                  random_state=0, device="cpu")
    solver.fit(operator.measure(prior.sample(5, random_state=0)))
    _perturb(solver.model_)
    return solver


@pytest.mark.parametrize("coupling", ["affine", "robust-spline"])
def test_posterior_sampler_parity(tmp_path, coupling):
    solver = _amortized(coupling)
    Y, noise = map(torch.from_numpy, _get_part(solver, "posterior_sampler").sample_inputs(
        solver, 40, np.random.RandomState(0)))
    model = solver.model_
    assert min(coupling_moves(model, lambda: model(noise, amortized_context(model, Y)))
               ) > MIN_COUPLING_MOVE
    path = to_onnx(solver, tmp_path / "sampler.onnx", part="posterior_sampler")
    _assert_parity(solver, path, "posterior_sampler")
    meta = read_metadata(path)
    assert meta["inputs"] == ["y", "noise"] and meta["estimator"] == "InverseSolver"
    assert meta["latent_dim"] == 16 and meta["data_range"] == [0.0, 1.0]


def test_posterior_sampler_needs_amortized_vi(tmp_path):
    prior = _prior("mlp", "affine")
    operator = Inpainting((1, 4, 4), box=(1, 1, 3, 3))
    solver = flowsk.InverseSolver(prior, operator, method="glowip")
    with pytest.raises(NotFittedError):
        to_onnx(solver, tmp_path / "x.onnx", part="posterior_sampler")
    solver.fit(np.zeros((1, operator.output_dim)))
    assert available_parts(solver) == []
    with pytest.raises(ValueError, match="amortized-vi"):
        to_onnx(solver, tmp_path / "x.onnx", part="posterior_sampler")


SAMPLER = DEPLOY.split("path, out")[0] + textwrap.dedent("""
    path, y_path, out = sys.argv[1:]
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    Y, k = np.load(y_path).astype(np.float32), 4000
    rng = np.random.RandomState(0)
    draws = np.stack([session.run(["x"], {"y": np.repeat(y[None], k, 0),
                                          "noise": rng.standard_normal(
                                              (k, meta["latent_dim"])).astype(np.float32)})[0]
                      for y in Y])
    assert not any(m.split(".")[0] == "torch" for m in sys.modules)
    np.savez(out, mean=draws.mean(1), std=draws.std(1))
""")


def test_posterior_sampler_runs_with_numpy_and_onnxruntime_only(tmp_path):
    """Uncertainty-aware reconstruction without PyTorch: mean and std of the ONNX draws match
    the solver's own posterior draws within Monte Carlo error."""
    solver = _amortized("robust-spline")
    path = to_onnx(solver, tmp_path / "sampler.onnx", part="posterior_sampler")
    X = solver.prior.sample(3, random_state=5)
    Y = solver.operator.measure(X, noise_std=0.1, random_state=5)
    np.save(tmp_path / "y.npy", Y)
    script = tmp_path / "sampler.py"
    script.write_text(SAMPLER)
    proc = subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "y.npy"),
                           str(tmp_path / "out.npz")], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr
    res = np.load(tmp_path / "out.npz")
    draws = solver.sample_posterior(Y, 4000)  # (3, 4000, D)
    mean, std = draws.mean(1), draws.std(1)
    # two independent estimates from 4000 draws each: 5 standard errors of their difference;
    # the std's standard error from the fourth moment (pixels near a bound have heavy tails)
    bound = 5 * np.sqrt(2 / 4000) * std + 1e-5
    assert np.all(np.abs(res["mean"] - mean) <= bound)
    m4 = ((draws - mean[:, None]) ** 4).mean(1)
    se_std = np.sqrt(np.maximum(m4 - std ** 4, 0) / 4000) / (2 * np.maximum(std, 1e-12))
    assert np.all(np.abs(res["std"] - std) <= 5 * np.sqrt(2) * se_std + 1e-5)
    assert std.max() > 1e-2  # a real spread, so the comparison means something

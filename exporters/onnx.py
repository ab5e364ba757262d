"""ONNX export of fitted flowsk estimators, and a parity check with onnxruntime.

An estimator type exports a few named *parts*. Each part is an :class:`OnnxPart`: a small torch
module computing the part from batched inputs, the names and per-sample shapes of its inputs,
the names of its outputs, and how to draw valid random inputs (for tracing and for
:func:`check_onnx`). ``FlowPrior`` exports

==============  =========================  ===============================
part            inputs                     outputs
==============  =========================  ===============================
``decoder``     ``z`` (batch, latent_dim)  ``x`` (batch, n_features)
``encoder``     ``x`` (batch, n_features)  ``z`` (batch, latent_dim)
``log_prob``    ``x`` (batch, n_features)  ``log_prob`` (batch,), nats
==============  =========================  ===============================

``InjectiveFlowPrior`` exports ``decoder`` and ``projector`` (``x -> G(G^+(x))``, both
``(batch, n_features)``), and an ``InverseSolver`` fitted with ``method="amortized-vi"``
exports ``posterior_sampler``: ``y`` (batch, m) and standard normal ``noise`` (batch,
latent_dim) give one posterior draw ``x`` (batch, n_features) per row. Other estimators add
their parts with :func:`register_parts`.

Every file has a dynamic batch axis (``"batch"``), runs in float32, and records in its metadata
(``metadata_props``, each value JSON text) ``part``, ``estimator``, ``image_shape``,
``data_range``, ``latent_dim``, ``n_features``, ``inputs``, ``outputs`` and
``flowsk_version``. Deployment needs only NumPy and onnxruntime::

    import json
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession("decoder.onnx", providers=["CPUExecutionProvider"])
    meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    rng = np.random.RandomState(0)                     # the seed of prior.sample(random_state=0)
    z = 0.8 * rng.standard_normal((16, meta["latent_dim"]))          # temperature 0.8
    x = session.run(["x"], {"z": z.astype(np.float32)})[0]           # (16, n_features)
    images = x.reshape(-1, *meta["image_shape"])                     # when image_shape is set

which gives the samples of ``prior.sample(16, temperature=0.8, random_state=0)`` to float32
precision.

The files come from PyTorch's TorchScript-based exporter (``torch.onnx.export(...,
dynamo=False)``). With torch 2.13 both of its exporters give correct dynamic-batch graphs that
run about equally fast in onnxruntime, but the ``torch.export``-based one (``dynamo=True``)
takes 7-25 times longer per model (several seconds for a tiny flow, close to a minute for the
default image prior). The exported graph is checked to hold no matrix inverse, determinant or
data-dependent indexing (``FORBIDDEN_OPS``).
"""
from __future__ import annotations

import copy
import inspect
import io
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from numpy.typing import NDArray
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

import flowsk
from flowsk import FlowPrior, InjectiveFlowPrior, InverseSolver
from flowsk._typing import PathLike, RandomStateLike
from flowsk.methods.variational import amortized_draw

__all__ = [
    "FORBIDDEN_OPS",
    "OnnxPart",
    "available_parts",
    "check_onnx",
    "op_types",
    "read_metadata",
    "register_parts",
    "to_onnx",
]

#: ONNX ops that must not appear in an exported flow: matrix inverse / determinant (cache
#: inverses as buffers instead) and data-dependent indexing (boolean masks become NonZero).
FORBIDDEN_OPS = frozenset({"Inverse", "Det", "NonZero", "Compress"})

BATCH_AXIS = "batch"
_EXAMPLE_BATCH = 3  # >= 2, so the exporter cannot specialise the batch axis to 1
_CUDA = "CUDAExecutionProvider"


@dataclass(frozen=True)
class OnnxPart:
    """How one part of an estimator exports.

    Attributes
    ----------
    module : callable
        ``estimator -> torch.nn.Module`` whose ``forward(*inputs)`` returns the output tensor
        (or a tuple, one per output). It may share the estimator's modules: ``to_onnx`` and
        ``check_onnx`` work on a deep copy moved to CPU float32 in eval mode.
    inputs : tuple of (name, shape)
        ``shape(estimator)`` is the per-sample shape of the input; the batch axis comes first.
    outputs : tuple of str
        Output names, in the order ``module`` returns them.
    sample_inputs : callable
        ``(estimator, n_samples, rng) -> tuple of arrays``, one ``(n_samples, *shape)`` array per
        input, drawn where the part is meant to be evaluated (``rng`` is a ``RandomState``).
    description : str
        One line for the model's ``doc_string``.
    prior : callable or None
        ``estimator -> fitted flow prior`` whose ``image_shape``, ``data_range`` and ``flow_``
        the metadata records (an inverse solver's prior, say); None: the estimator itself.
    requires : callable or None
        ``estimator -> None or str``: why this estimator cannot export the part (an inverse
        solver whose method has no sampler network, say); None: always exportable.
    """

    module: Callable
    inputs: tuple[tuple[str, Callable], ...]
    outputs: tuple[str, ...]
    sample_inputs: Callable
    description: str = ""
    prior: Callable | None = None
    requires: Callable | None = None

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.inputs)


_PARTS = {}


def register_parts(estimator_type: type, parts: dict[str, OnnxPart]) -> None:
    """Declare the exportable parts (``{name: OnnxPart}``) of ``estimator_type``.

    The table of the first class in an estimator's MRO that has one is used whole, so a subclass
    that registers its own parts does not inherit its parent's.
    """
    for name, part in parts.items():
        if not isinstance(part, OnnxPart):
            raise TypeError(f"part {name!r} must be an OnnxPart, got {type(part).__name__}")
    _PARTS[estimator_type] = dict(parts)


def _parts_table(estimator):
    estimator_type = estimator if isinstance(estimator, type) else type(estimator)
    for cls in estimator_type.__mro__:
        if cls in _PARTS:
            return _PARTS[cls]
    supported = ", ".join(sorted(cls.__name__ for cls in _PARTS))
    raise TypeError(f"cannot export a {estimator_type.__name__} to ONNX; supported estimators: "
                    f"{supported}")


def _unavailable(estimator, spec):
    if isinstance(estimator, type) or spec.requires is None:
        return None
    return spec.requires(estimator)


def available_parts(estimator: Any) -> list[str]:
    """Names of the parts ``estimator`` (an instance or a class) can export, sorted."""
    return sorted(name for name, spec in _parts_table(estimator).items()
                  if _unavailable(estimator, spec) is None)


def _get_part(estimator, part):
    table = _parts_table(estimator)
    if part not in table:
        raise ValueError(f"unknown part {part!r} for {type(estimator).__name__}; valid parts: "
                         f"{', '.join(sorted(table))}")
    reason = _unavailable(estimator, table[part])
    if reason is not None:
        raise ValueError(f"cannot export part {part!r}: {reason}")
    return table[part]


# -- FlowPrior ---------------------------------------------------------------------------------
class FlowDecoder(torch.nn.Module):
    """``z (B, latent_dim) -> x (B, n_features)``: the generator, clipped to the data range
    (``flow.decode``), as ``sample`` and ``inverse_transform`` return it."""

    def __init__(self, flow: torch.nn.Module) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.flow.decode(z)


class FlowEncoder(torch.nn.Module):
    """``x (B, n_features) -> z (B, latent_dim)``."""

    def __init__(self, flow: torch.nn.Module) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flow(x)[0]


class FlowLogProb(torch.nn.Module):
    """``x (B, n_features) -> log p(x) (B,)`` in nats."""

    def __init__(self, flow: torch.nn.Module) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flow.log_prob(x)


def latent_shape(est: FlowPrior | InjectiveFlowPrior) -> tuple[int]:
    """Per-sample shape of a flow estimator's latent: ``(latent_dim,)``."""
    return (int(est.flow_.latent_dim),)


def data_shape(est: FlowPrior | InjectiveFlowPrior) -> tuple[int]:
    """Per-sample shape of a flow estimator's data: ``(n_features,)``."""
    return (int(est.flow_.n_features),)


def latent_samples(est: FlowPrior | InjectiveFlowPrior, n_samples: int,
                   rng: np.random.RandomState) -> tuple[NDArray[np.float32]]:
    """Standard normal latents ``(n_samples, latent_dim)``, float32."""
    return (rng.standard_normal((n_samples, est.flow_.latent_dim)).astype(np.float32),)


def data_samples(est: FlowPrior | InjectiveFlowPrior, n_samples: int,
                 rng: np.random.RandomState) -> tuple[NDArray[np.float32]]:
    """Samples of the estimator itself: they lie in ``data_range`` and where the flow is used."""
    return (np.asarray(est.sample(n_samples, random_state=rng), dtype=np.float32),)


FLOW_PRIOR_PARTS = {
    "decoder": OnnxPart(lambda est: FlowDecoder(est.flow_), (("z", latent_shape),), ("x",),
                        latent_samples,
                        "flowsk decoder: latent z (batch, latent_dim) -> x (batch, n_features)"),
    "encoder": OnnxPart(lambda est: FlowEncoder(est.flow_), (("x", data_shape),), ("z",),
                        data_samples,
                        "flowsk encoder: x (batch, n_features) -> latent z (batch, latent_dim)"),
    "log_prob": OnnxPart(lambda est: FlowLogProb(est.flow_), (("x", data_shape),),
                         ("log_prob",), data_samples,
                         "flowsk log-density: x (batch, n_features) -> log p(x) (batch,), nats"),
}
register_parts(FlowPrior, FLOW_PRIOR_PARTS)


# -- InjectiveFlowPrior ------------------------------------------------------------------------
class FlowProjector(torch.nn.Module):
    """``x (B, n_features) -> G(G^+(x)) (B, n_features)``: projection onto the range."""

    def __init__(self, flow: torch.nn.Module) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flow.project(x)


register_parts(InjectiveFlowPrior, {
    "decoder": FLOW_PRIOR_PARTS["decoder"],
    "projector": OnnxPart(lambda est: FlowProjector(est.flow_), (("x", data_shape),),
                          ("x_projected",), data_samples,
                          "flowsk projector: x (batch, n_features) -> G(G^+(x)) "
                          "(batch, n_features)"),
})


# -- InverseSolver -----------------------------------------------------------------------------
class PosteriorSampler(torch.nn.Module):
    """``(y (B, m), noise (B, latent_dim)) -> x (B, n_features)``: one posterior draw per row.

    ``noise`` is standard normal; the same ``y`` with ``k`` noise rows gives ``k`` draws of
    ``p(x | y)``.
    """

    def __init__(self, model: torch.nn.Module, flow: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.flow = model, flow

    def forward(self, y: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return amortized_draw(self.model, self.flow, y, noise)


def _sampler_requires(solver):
    if solver.method != "amortized-vi":
        return (f"only an InverseSolver with method='amortized-vi' has a sampler network, "
                f"this one uses {solver.method!r}")
    return None


def _measurement_shape(solver):
    return (int(solver.operator.output_dim),)


def _measurement_samples(solver, n_samples, rng):
    """Measurements ``y = A(x) + sigma * noise`` of prior samples, and standard normal noise."""
    X = solver.prior.sample(n_samples, random_state=rng)
    sigma = solver._params(solver._method())["sigma"]
    Y = solver.operator.measure(X, noise_std=sigma, random_state=rng)
    return (np.asarray(Y, dtype=np.float32),
            latent_samples(solver.prior, n_samples, rng)[0])


register_parts(InverseSolver, {
    "posterior_sampler": OnnxPart(
        lambda solver: PosteriorSampler(solver.model_, solver.prior.flow_),
        (("y", _measurement_shape), ("noise", lambda solver: latent_shape(solver.prior))),
        ("x",), _measurement_samples,
        "flowsk posterior sampler: y (batch, m), noise (batch, latent_dim) -> x (batch, "
        "n_features)", prior=lambda solver: solver.prior, requires=_sampler_requires),
})


# -- export ------------------------------------------------------------------------------------
def _cpu_copy(module):
    """A deep copy of ``module`` on CPU in float32, eval mode, without gradients.

    Eval mode matters: it caches the inverse weights of the 1x1 convolutions, so no matrix
    inverse is traced.
    """
    module = copy.deepcopy(module).to(device="cpu", dtype=torch.float32)
    module.eval()
    module.requires_grad_(False)
    return module


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _metadata_value(value):
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value)


def _estimator_metadata(estimator, name, spec):
    prior = estimator if spec.prior is None else spec.prior(estimator)
    flow = prior.flow_
    image_shape = getattr(prior, "image_shape", None)
    data_range = getattr(prior, "data_range", None)
    return {
        "part": name,
        "estimator": type(estimator).__name__,
        "image_shape": None if image_shape is None else [int(s) for s in image_shape],
        "data_range": None if data_range is None else [float(v) for v in data_range],
        "latent_dim": int(flow.latent_dim),
        "n_features": int(flow.n_features),
        "inputs": list(spec.input_names),
        "outputs": list(spec.outputs),
        "flowsk_version": flowsk.__version__,
    }


def _torch_export(module, examples, input_names, output_names, opset):
    buffer = io.BytesIO()
    dynamic_axes = {name: {0: BATCH_AXIS} for name in (*input_names, *output_names)}
    with warnings.catch_warnings(), torch.no_grad():
        # the tracer flags Python-level shape checks (constant for a fitted flow), and torch
        # announces its newer exporter; neither concerns the user
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message="The feature will be removed")
        kwargs = {} if opset is None else {"opset_version": int(opset)}
        if "dynamo" in inspect.signature(torch.onnx.export).parameters:
            kwargs["dynamo"] = False  # the default from torch 2.9 on; absent before 2.5
        torch.onnx.export(module, examples, buffer, input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=dynamic_axes,
                          do_constant_folding=True, **kwargs)
    return onnx.load_from_string(buffer.getvalue())


def op_types(model: PathLike | onnx.ModelProto) -> set[str]:
    """Set of op types in ``model`` (path or ``ModelProto``), functions included."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model), load_external_data=False)
    ops = {node.op_type for node in model.graph.node}
    for function in model.functions:
        ops.update(node.op_type for node in function.node)
    return ops


def to_onnx(estimator: FlowPrior | InjectiveFlowPrior | InverseSolver, path: PathLike,
            part: str = "decoder", opset: int | None = None) -> PathLike:
    """Export one part of a fitted estimator to an ONNX file with a dynamic batch axis.

    Parameters
    ----------
    estimator : fitted FlowPrior, InjectiveFlowPrior or amortized-vi InverseSolver
    path : str or path-like
        Where to write the ``.onnx`` file.
    part : str
        ``FlowPrior``: ``"decoder"`` (z -> x), ``"encoder"`` (x -> z) or ``"log_prob"``
        (x -> log p(x)); ``InjectiveFlowPrior``: ``"decoder"`` or ``"projector"``;
        ``InverseSolver``: ``"posterior_sampler"``. :func:`available_parts` lists them.
    opset : int or None
        ONNX opset version; None uses the exporter's default.

    Returns
    -------
    path, as given.

    The export runs on a deep copy of the model on CPU in float32 (the estimator may live on a
    GPU and is left untouched).
    """
    check_is_fitted(estimator)
    spec = _get_part(estimator, part)
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, (int, np.integer))
                              or opset < 7):
        raise ValueError(f"opset must be an int >= 7 or None, got {opset!r}")
    module = _cpu_copy(spec.module(estimator))
    examples = tuple(torch.as_tensor(np.asarray(a, dtype=np.float32)) for a in
                     spec.sample_inputs(estimator, _EXAMPLE_BATCH, check_random_state(0)))
    model = _torch_export(module, examples, spec.input_names, spec.outputs, opset)

    bad = sorted(op_types(model) & FORBIDDEN_OPS)
    if bad:
        raise RuntimeError(f"the exported {part} graph contains {bad}; a layer computes a matrix "
                           "inverse/determinant or masks by value on the exported path")
    metadata = _estimator_metadata(estimator, part, spec)
    onnx.helper.set_model_props(model, {k: _metadata_value(v) for k, v in metadata.items()})
    model.doc_string = spec.description
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, os.fspath(path))
    return path


def read_metadata(path: PathLike | onnx.ModelProto) -> dict[str, Any]:
    """The flowsk metadata of an exported file, each value decoded from JSON."""
    model = path if isinstance(path, onnx.ModelProto) else onnx.load(os.fspath(path),
                                                                      load_external_data=False)
    out = {}
    for prop in model.metadata_props:
        try:
            out[prop.key] = json.loads(prop.value)
        except ValueError:
            out[prop.key] = prop.value
    return out


# -- parity check ------------------------------------------------------------------------------
def _provider_names(providers):
    return [p if isinstance(p, str) else p[0] for p in providers]


def _max_abs_error(got, ref):
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        raise RuntimeError(f"onnxruntime returned shape {got.shape}, PyTorch {ref.shape}")
    err = np.abs(got - ref)
    same = (got == ref) | (np.isnan(got) & np.isnan(ref))  # equal infinities / both NaN
    err[same] = 0.0
    err[np.isnan(err)] = np.inf
    return float(err.max()) if err.size else 0.0


def check_onnx(path: PathLike, estimator: FlowPrior | InjectiveFlowPrior | InverseSolver,
               n_samples: int = 64,
               providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
               random_state: RandomStateLike = 0) -> float:
    """Max absolute difference between onnxruntime and PyTorch on random inputs.

    The part comes from the file's metadata; inputs are drawn for it (a standard normal latent
    for ``decoder``, samples of ``estimator`` for ``encoder``, ``log_prob`` and ``projector``,
    so they lie in ``data_range``; measurements of prior samples for ``posterior_sampler``).
    PyTorch runs a CPU float32 copy of the estimator's model.

    Parameters
    ----------
    path : str or path-like
        A file written by :func:`to_onnx` from this estimator.
    estimator : the fitted estimator it was exported from
    n_samples : int
        Batch size of the comparison.
    providers : list or None
        onnxruntime execution providers (names or ``(name, options)`` pairs); None is
        ``["CPUExecutionProvider"]``. When ``"CUDAExecutionProvider"`` is requested and
        onnxruntime does not use it, a RuntimeError is raised instead of silently comparing the
        CPU result.
    random_state : int, RandomState or None

    Returns
    -------
    float, the largest absolute difference over all outputs.
    """
    import onnxruntime as ort

    if not (isinstance(n_samples, (int, np.integer)) and n_samples >= 1):
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    metadata = read_metadata(path)
    if "part" not in metadata:
        raise ValueError(f"{os.fspath(path)} has no flowsk metadata; export it with to_onnx")
    part = metadata["part"]
    check_is_fitted(estimator)
    spec = _get_part(estimator, part)
    expected = _estimator_metadata(estimator, part, spec)
    for key in ("latent_dim", "n_features", "image_shape", "data_range"):
        if key in metadata and metadata[key] != expected[key]:
            raise ValueError(f"{os.fspath(path)} was exported from another model: {key} is "
                             f"{metadata[key]} in the file, {expected[key]} in the estimator")

    providers = ["CPUExecutionProvider"] if providers is None else list(providers)
    want_cuda = _CUDA in _provider_names(providers)
    if want_cuda and _CUDA not in ort.get_available_providers():
        raise RuntimeError(f"{_CUDA} was requested but this onnxruntime does not provide it "
                           f"(available: {ort.get_available_providers()}); install "
                           "onnxruntime-gpu built for your CUDA version")
    session = ort.InferenceSession(os.fspath(path), providers=providers)
    if want_cuda and _CUDA not in session.get_providers():
        raise RuntimeError(f"{_CUDA} was requested but onnxruntime fell back to "
                           f"{session.get_providers()}; check the CUDA and cuDNN libraries "
                           "onnxruntime-gpu needs")

    rng = check_random_state(random_state)
    inputs = [np.ascontiguousarray(a, dtype=np.float32)
              for a in spec.sample_inputs(estimator, n_samples, rng)]
    got = session.run(list(spec.outputs), dict(zip(spec.input_names, inputs)))
    module = _cpu_copy(spec.module(estimator))
    with torch.no_grad():
        ref = _as_tuple(module(*(torch.from_numpy(a) for a in inputs)))
    return max(_max_abs_error(g, r.numpy()) for g, r in zip(got, ref))

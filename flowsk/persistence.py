"""Model files that are safe to share: :func:`save` and :func:`load`, without pickle.

A model file is one `safetensors <https://huggingface.co/docs/safetensors>`_ file. Its tensors
are the weights and buffers of every network and the fitted arrays, under dotted names
(``flow_.body.layers.0.bias``, ``latent_covariance_.covariance_``, ...). Its header metadata
holds ``format`` (``"flowsk"``), ``format_version``, ``flowsk_version`` and ``estimator``: JSON
of the class, the constructor parameters and the fitted scalars, nested for the prior and the
operator of an :class:`~flowsk.InverseSolver`.

:func:`load` never unpickles and runs no code from the file: it rebuilds each network from the
saved parameters, checks every stored tensor's name, shape and dtype against the rebuilt one
and only then copies the values. Whatever is wrong with a file raises :class:`ModelFileError`.
"""
from __future__ import annotations

import json
import math
import numbers
import re

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from sklearn.covariance import EmpiricalCovariance
from sklearn.utils.validation import check_is_fitted

from . import operators
from ._typing import PathLike
from ._version import __version__
from .injective import InjectiveFlowPrior
from .methods.variational import amortized_model
from .prior import FlowPrior
from .solver import InverseSolver

FORMAT_VERSION = 2
_ESTIMATORS = {cls.__name__: cls for cls in (FlowPrior, InjectiveFlowPrior, InverseSolver)}
_PRIORS = ("FlowPrior", "InjectiveFlowPrior")
#: Fitted integers of each estimator (besides ``n_features_in_``).
_FITTED_INTS = {"FlowPrior": ("best_epoch_",),
                "InjectiveFlowPrior": ("best_epoch_", "mse_best_epoch_", "latent_dim_"),
                "InverseSolver": ()}
#: Constructor parameters of the priors that are tuples.
_TUPLE_PARAMS = ("image_shape", "data_range")


class ModelFileError(ValueError):
    """A file that :func:`load` cannot read; the message names the problem."""


# -- saving ----------------------------------------------------------------------------------
def save(estimator: FlowPrior | InjectiveFlowPrior | InverseSolver,
         path: PathLike) -> PathLike:
    """Write a fitted ``FlowPrior``, ``InjectiveFlowPrior`` or ``InverseSolver`` (whose prior
    is fitted) to ``path`` in the flowsk model format; returns ``path``.

    Tensors are written from CPU copies, so a model fitted on a GPU loads without one. Raises
    ``TypeError`` for other objects (use joblib for pipelines you keep on your own machine) and
    ``ValueError`` for parameters that JSON cannot hold, ``OSError`` when ``path`` cannot be
    written.
    """
    tensors = {}
    spec = _encode(estimator, "", tensors)
    metadata = {"format": "flowsk", "format_version": str(FORMAT_VERSION),
                "flowsk_version": __version__,
                "estimator": json.dumps(spec, allow_nan=False, sort_keys=True)}
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as err:  # it writes a temporary file, then renames it
        raise OSError(f"cannot write {path}: {err}") from None
    return path


def _encode(est, prefix, tensors):
    name = type(est).__name__
    if _ESTIMATORS.get(name) is not type(est):
        raise TypeError(f"flowsk.save writes FlowPrior, InjectiveFlowPrior and InverseSolver, "
                        f"got {name}; keep other objects (pipelines, searches) with joblib")
    params = est.get_params(deep=False)
    if name == "InverseSolver":
        check_is_fitted(est.prior, msg="the solver's prior is not fitted: fit it before saving")
        params["prior"] = _encode(est.prior, prefix + "prior.", tensors)
        params["operator"] = _encode_operator(est.operator, prefix + "operator.", tensors)
    else:
        check_is_fitted(est)
    spec = {"class": name, "params": {k: _jsonable(k, v) for k, v in params.items()},
            "fitted": {}}
    if not hasattr(est, "n_features_in_"):
        return spec
    fitted = spec["fitted"]
    for attr in ("n_features_in_",) + _FITTED_INTS[name]:
        fitted[attr] = int(getattr(est, attr))
    if hasattr(est, "feature_names_in_"):
        fitted["feature_names_in_"] = [str(f) for f in est.feature_names_in_]
    if name == "InverseSolver":
        fitted["model_"] = est.model_ is not None
        if est.model_ is not None:
            _put_module(est.model_, prefix + "model_.", tensors)
            _put_covariance(est.model_.feature_covariance, prefix + "model_.feature_covariance.",
                            tensors)
        return spec
    fitted["device_"] = str(est.device_)
    fitted["training_range_"] = [float(v) for v in est.training_range_]
    fitted["history_"] = sorted(est.history_)
    for key, values in est.history_.items():
        tensors[f"{prefix}history_.{key}"] = torch.tensor(values, dtype=torch.float64)
    _put_module(est.flow_, prefix + "flow_.", tensors)
    _put_covariance(est.latent_covariance_, prefix + "latent_covariance_.", tensors)
    return spec


def _jsonable(name, value):
    """``value`` as plain JSON types; tuples become lists."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(value):
        return float(value)
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(name, v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _jsonable(f"{name}[{k!r}]", v) for k, v in value.items()}
    raise ValueError(f"parameter {name}={value!r} cannot be saved: model files hold numbers, "
                     "strings, None and lists or dicts of those (an int random_state, not a "
                     "RandomState)")


def _put_module(module, prefix, tensors):
    for key, tensor in module.state_dict().items():
        tensors[prefix + key] = tensor.detach().to("cpu", copy=True).contiguous()


def _put_covariance(cov, prefix, tensors):
    for attr in ("location_", "covariance_", "precision_"):
        tensors[prefix + attr] = torch.as_tensor(np.array(getattr(cov, attr), np.float64))


#: Operators a model file can hold, with the attributes (besides ``input_shape`` and
#: ``output_dim``) that rebuild them; their buffers travel as tensors.
_OPERATOR_ATTRIBUTES = {"Denoising": (), "Blur": (), "Inpainting": (), "RandomMask": ("p",),
                        "Colorization": (), "SuperResolution": ("factor",),
                        "MatrixOperator": (), "CompressedSensing": (),
                        "LimitedAngleTomography": ("angles",)}


def _encode_operator(op, prefix, tensors):
    name = type(op).__name__
    if name not in _OPERATOR_ATTRIBUTES or getattr(operators, name) is not type(op):
        raise TypeError(f"the solver's operator {name} cannot be saved: model files hold "
                        f"the operators {', '.join(_OPERATOR_ATTRIBUTES)} (a FunctionOperator "
                        "wraps arbitrary code); save the prior and rebuild the operator")
    config = {"input_shape": list(op.input_shape), "output_dim": op.output_dim}
    for attr in _OPERATOR_ATTRIBUTES[name]:
        config[attr] = _jsonable(attr, getattr(op, attr))
    _put_module(op, prefix, tensors)
    return {"class": name, "config": config}


# -- loading ---------------------------------------------------------------------------------
def load(path: PathLike) -> FlowPrior | InjectiveFlowPrior | InverseSolver:
    """Read an estimator written by :func:`save`; raises :class:`ModelFileError` for a file
    that is not one (a pickle, truncated, tampered with, from a newer flowsk, ...)."""
    path = str(path)
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:1] == b"\x80" or head == b"PK":
        raise ModelFileError(f"{path} is a pickle (joblib or torch.save), not a flowsk model "
                             "file; flowsk.load never unpickles. Load pickles only from "
                             "sources you trust, with joblib.load")
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            reader = _Reader(path, handle)
            spec = reader.header()
            est = reader.estimator(spec, "")
            reader.check_all_used()
    except SafetensorError as err:
        raise ModelFileError(f"{path} is not a complete flowsk model file (truncated, or "
                             f"another format): {err}") from None
    return est


class _Reader:
    """Checked access to an open model file."""

    def __init__(self, path, handle):
        self.path, self.handle = path, handle
        self.names, self.used = set(handle.keys()), set()

    def error(self, message):
        return ModelFileError(f"{self.path}: {message}")

    # -- header ----------------------------------------------------------------------------
    def header(self):
        meta = self.handle.metadata() or {}
        if meta.get("format") != "flowsk":
            raise self.error("not a flowsk model file (a safetensors file without flowsk's "
                             "header)")
        if meta.get("format_version") != str(FORMAT_VERSION):
            raise self.error(f"unknown format version {meta.get('format_version')!r}; this "
                             f"flowsk reads version {FORMAT_VERSION}")
        saved = meta.get("flowsk_version", "")
        if _release(saved) is None:
            raise self.error(f"bad flowsk version {saved!r} in the header")
        if _release(saved) > _release(__version__):
            raise self.error(f"saved by flowsk {saved}, newer than this flowsk "
                             f"{__version__}: upgrade flowsk to load it")
        try:
            return json.loads(meta.get("estimator", ""))
        except json.JSONDecodeError as err:
            raise self.error(f"the estimator description is not JSON: {err}") from None

    def field(self, spec, key, kind, where):
        """``spec[key]``, which must be of type ``kind``; ``where`` names ``spec``."""
        if not isinstance(spec, dict) or key not in spec:
            raise self.error(f"{where}: no {key!r}")
        value = spec[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(f"{where}: {key} must be {kind.__name__}, got {value!r}")
        return value

    # -- tensors ---------------------------------------------------------------------------
    def tensor(self, name, shape=None, dtype=None):
        """The tensor ``name``, checked against ``shape`` (a tuple, or None for any) and
        ``dtype``."""
        if name not in self.names:
            raise self.error(f"tensor {name!r} is missing")
        self.used.add(name)
        tensor = self.handle.get_tensor(name)
        if dtype is not None and tensor.dtype != dtype:
            raise self.error(f"tensor {name!r} has dtype {tensor.dtype}, expected {dtype}")
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise self.error(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                             f"{tuple(shape)}")
        return tensor

    def load_module(self, module, prefix):
        """Copy the file's tensors into ``module`` after checking each against its own."""
        state = {key: self.tensor(prefix + key, value.shape, value.dtype)
                 for key, value in module.state_dict().items()}
        module.load_state_dict(state)

    def covariance(self, prefix, d):
        cov = EmpiricalCovariance()
        for attr, shape in (("location_", (d,)), ("covariance_", (d, d)),
                            ("precision_", (d, d))):
            setattr(cov, attr, self.tensor(prefix + attr, shape, torch.float64).numpy())
        cov.n_features_in_ = d
        return cov

    def check_all_used(self):
        unused = sorted(self.names - self.used)
        if unused:
            raise self.error(f"unexpected tensors {unused[:5]}{' ...' if len(unused) > 5 else ''}"
                             " that the rebuilt model does not have")

    # -- estimators ------------------------------------------------------------------------
    def estimator(self, spec, prefix, classes=tuple(_ESTIMATORS)):
        where = prefix.rstrip(".") or "estimator"
        name = self.field(spec, "class", str, where)
        if name not in classes:
            raise self.error(f"{where}: unknown estimator class {name!r}; valid: "
                             f"{', '.join(classes)}")
        params = dict(self.field(spec, "params", dict, where))
        fitted = self.field(spec, "fitted", dict, where)
        if name == "InverseSolver":
            params["prior"] = self.estimator(self.field(params, "prior", dict, where),
                                             prefix + "prior.", _PRIORS)
            params["operator"] = self.operator(self.field(params, "operator", dict, where),
                                               prefix + "operator.")
        else:
            for key in _TUPLE_PARAMS:
                if isinstance(params.get(key), list):
                    params[key] = tuple(params[key])
        est = self.construct(_ESTIMATORS[name], params, where)
        if name == "InverseSolver":
            return self.fitted_solver(est, fitted, prefix)
        return self.fitted_prior(est, fitted, prefix)

    def construct(self, cls, params, where):
        """``cls(**params)``, validated as ``fit`` would validate it. A parameter the file
        lacks (one added after it was written) takes its default."""
        unknown = sorted(set(params) - set(cls._get_param_names()))
        if unknown:
            raise self.error(f"{where}: {cls.__name__} has no parameters {unknown}")
        random_state = params.get("random_state")
        if random_state is not None and (not isinstance(random_state, int)
                                         or isinstance(random_state, bool)):
            raise self.error(f"{where}: random_state must be an int or None, got "
                             f"{random_state!r}")
        est = cls(**params)
        try:
            if cls is InverseSolver:
                est._params(est._method())
                est._check_prior_operator(est._method())
            else:
                est._check_params()
        except (ValueError, TypeError) as err:
            raise self.error(f"{where}: bad parameter of {cls.__name__}: {err}") from None
        return est

    def fitted_common(self, est, fitted, where):
        name = type(est).__name__
        for attr in ("n_features_in_",) + _FITTED_INTS[name]:
            value = self.field(fitted, attr, int, where)
            low = 0 if attr.endswith("best_epoch_") else 1
            if value < low:
                raise self.error(f"{where}: {attr} must be >= {low}, got {value}")
            setattr(est, attr, value)
        if "feature_names_in_" in fitted:
            names = self.field(fitted, "feature_names_in_", list, where)
            if len(names) != est.n_features_in_ or not all(isinstance(n, str) for n in names):
                raise self.error(f"{where}: feature_names_in_ must be {est.n_features_in_} "
                                 "strings")
            est.feature_names_in_ = np.array(names, dtype=object)

    def fitted_prior(self, est, fitted, prefix):
        where = prefix.rstrip(".") or "estimator"
        self.fitted_common(est, fitted, where)
        shape = est.image_shape
        if shape is not None and math.prod(shape) != est.n_features_in_:
            raise self.error(f"{where}: image_shape {shape} does not hold n_features_in_ "
                             f"{est.n_features_in_} features")
        try:
            with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
                flow = est._build_flow(est.n_features_in_, 0)
        except (ValueError, TypeError) as err:
            raise self.error(f"{where}: cannot rebuild the flow: {err}") from None
        if getattr(est, "latent_dim_", flow.latent_dim) != flow.latent_dim:
            raise self.error(f"{where}: latent_dim_ {est.latent_dim_} does not match the "
                             f"rebuilt flow's {flow.latent_dim}")
        flow.requires_grad_(False).eval()  # eval first: the file's cached inverses win
        self.load_module(flow, prefix + "flow_.")
        est.latent_covariance_ = self.covariance(prefix + "latent_covariance_.",
                                                 flow.latent_dim)
        history = {}
        for key in self.field(fitted, "history_", list, where):
            if not isinstance(key, str):
                raise self.error(f"{where}: history_ keys must be strings, got {key!r}")
            values = self.tensor(f"{prefix}history_.{key}", dtype=torch.float64)
            if values.dim() != 1:
                raise self.error(f"tensor {prefix}history_.{key} must be 1-D")
            history[key] = values.tolist()
        est.history_ = history
        lo_hi = self.field(fitted, "training_range_", list, where)
        if not (len(lo_hi) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                        and math.isfinite(v) for v in lo_hi)
                and lo_hi[0] <= lo_hi[1]):
            raise self.error(f"{where}: training_range_ must be [lo, hi], finite with lo <= hi, "
                             f"got {lo_hi!r}")
        est.training_range_ = (float(lo_hi[0]), float(lo_hi[1]))
        est.device_ = self.device(self.field(fitted, "device_", str, where), where)
        est.flow_ = flow.to(est.device_)
        return est

    def device(self, name, where):
        """The saved device where this machine has it, else the CPU."""
        try:
            device = torch.device(name)
        except RuntimeError:
            raise self.error(f"{where}: device_ {name!r} is not a device") from None
        present = device.type == "cuda" and torch.cuda.is_available() and (
            device.index is None or device.index < torch.cuda.device_count())
        return device if present else torch.device("cpu")

    def fitted_solver(self, est, fitted, prefix):
        if not fitted:
            return est
        where = prefix.rstrip(".") or "estimator"
        self.fitted_common(est, fitted, where)
        if est.n_features_in_ != est.operator.output_dim:
            raise self.error(f"{where}: n_features_in_ {est.n_features_in_} does not match "
                             f"the operator's output_dim {est.operator.output_dim}")
        est.model_ = None
        if not self.field(fitted, "model_", bool, where):
            return est
        if est.method != "amortized-vi":
            raise self.error(f"{where}: a trained model for method {est.method!r}, which "
                             "trains none")
        try:
            with torch.random.fork_rng(devices=[]):
                model = amortized_model(est.prior.flow_.latent_dim, est.n_features_in_,
                                        est._params(est._method()), 0)
        except (ValueError, TypeError) as err:
            raise self.error(f"{where}: cannot rebuild the amortized-vi model: {err}") from None
        model.requires_grad_(False).eval()
        self.load_module(model, prefix + "model_.")
        model.feature_covariance = self.covariance(prefix + "model_.feature_covariance.",
                                                   est.n_features_in_)
        est.model_ = model.to(est.prior.device_)
        return est

    # -- operators -------------------------------------------------------------------------
    def operator(self, spec, prefix):
        where = prefix.rstrip(".")
        name = self.field(spec, "class", str, where)
        if name not in _OPERATOR_ATTRIBUTES:
            raise self.error(f"{where}: unknown operator class {name!r}")
        config = self.field(spec, "config", dict, where)
        shape = self.field(config, "input_shape", list, where)
        m = self.field(config, "output_dim", int, where)
        extra = {attr: config.get(attr) for attr in _OPERATOR_ATTRIBUTES[name]}
        try:
            op = self.build_operator(name, shape, m, extra, prefix)
        except (ValueError, TypeError, IndexError) as err:
            raise self.error(f"{where}: cannot rebuild the {name}: {err}") from None
        if op.output_dim != m:
            raise self.error(f"{where}: the rebuilt {name} has output_dim {op.output_dim}, "
                             f"the file says {m}")
        self.load_module(op, prefix)
        return op

    def build_operator(self, name, shape, m, extra, prefix):
        n = math.prod(shape)
        cls = getattr(operators, name)
        if name in ("Inpainting", "RandomMask"):
            indices = self.tensor(prefix + "indices", (m,), torch.int64).numpy()
            mask = np.zeros(n, bool)
            mask[indices] = True
            op = cls.__new__(cls)  # a RandomMask's seed is not saved: rebuild from its mask
            operators.Inpainting.__init__(op, shape, mask=mask.reshape(shape))
            if name == "RandomMask":
                op.p = extra["p"]
            return op
        if name in ("MatrixOperator", "CompressedSensing"):
            matrix = self.tensor(prefix + "matrix", (m, n), torch.float64).numpy()
            op = cls.__new__(cls)  # likewise for CompressedSensing's seed
            operators.MatrixOperator.__init__(op, matrix, shape)
            return op
        if name == "Blur":
            return cls(shape, kernel=self.tensor(prefix + "kernel", dtype=torch.float64).numpy())
        if name == "LimitedAngleTomography":
            return cls(shape, angles=np.asarray(extra["angles"], dtype=np.float64))
        return cls(shape, **extra)


def _release(version):
    """``"1.2.3..." -> (1, 2, 3)``, or None."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version) if isinstance(version, str) else None
    return None if match is None else tuple(int(g) for g in match.groups())

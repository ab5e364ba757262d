"""Type hints of the public API: complete, resolvable at run time, and true to the choices."""
import inspect
import typing

import pytest

import exporters.onnx
import flowsk
import flowsk.datasets
import flowsk.diagnostics
import flowsk.injective
import flowsk.metrics
import flowsk.operators
import flowsk.persistence
import flowsk.prior
import flowsk.solver
from flowsk import _typing
from flowsk.nn.builders import ARCHITECTURES
from flowsk.nn.coupling import TRANSFORMS
from flowsk.nn.injective import ACTIVATIONS, LOGDET_METHODS

MODULES = [flowsk.prior, flowsk.injective, flowsk.solver, flowsk.operators, flowsk.metrics,
           flowsk.diagnostics, flowsk.datasets, flowsk.persistence, exporters.onnx]


def _public(module):
    """What ``module`` defines (or lists in ``__all__``) without a leading underscore."""
    names = set(getattr(module, "__all__", ()))
    names |= {n for n, v in vars(module).items() if not n.startswith("_")
              and getattr(v, "__module__", None) == module.__name__}
    return [getattr(module, n) for n in sorted(names)]


def _function(value):
    """The function behind a class attribute (method, static or class method, property)."""
    if isinstance(value, (staticmethod, classmethod)):
        return value.__func__
    return value.fget if isinstance(value, property) else value


def _callables(module):
    """``{qualified name: function}``: the public functions of ``module`` and the public methods
    (and ``__init__``) its public classes define, each where it is defined."""
    out = {}
    for obj in _public(module):
        if inspect.isfunction(obj):
            out[f"{module.__name__}.{obj.__name__}"] = obj
        elif inspect.isclass(obj) and obj.__module__ == module.__name__:
            for name, value in vars(obj).items():
                function = _function(value)
                if (not name.startswith("_") or name == "__init__") and \
                        inspect.isfunction(function):
                    out[f"{module.__name__}.{obj.__name__}.{name}"] = function
    return out


CALLABLES = sorted({n: f for m in MODULES for n, f in _callables(m).items()}.items())


def _check_annotated(name, function, localns=None):
    hints = typing.get_type_hints(function, localns=localns)  # raises if one does not resolve
    params = [p for p in inspect.signature(function).parameters.values()
              if p.name not in ("self", "cls")]
    missing = [p.name for p in params if p.name not in hints]
    assert not missing, f"{name}: parameters without a type hint: {missing}"
    assert "return" in hints, f"{name} has no return annotation"


def test_the_public_api_is_found():
    names = {n for n, _ in CALLABLES}
    for name in ("flowsk.prior.BaseFlowEstimator.fit", "flowsk.prior.FlowPrior.__init__",
                 "flowsk.injective.InjectiveFlowPrior.project",
                 "flowsk.solver.InverseSolver.predict", "flowsk.operators.Blur.pinv",
                 "flowsk.operators.Operator.measure", "flowsk.metrics.psnr",
                 "flowsk.diagnostics.coverage", "flowsk.datasets.load_digit_images",
                 "flowsk.persistence.load", "exporters.onnx.to_onnx",
                 "exporters.onnx.OnnxPart.input_names", "exporters.onnx.FlowDecoder.forward"):
        assert name in names


@pytest.mark.parametrize("name, function", CALLABLES, ids=[n for n, _ in CALLABLES])
def test_every_parameter_and_return_is_annotated(name, function):
    _check_annotated(name, function)


def test_flowsk_dask_is_annotated():
    flowsk_dask = pytest.importorskip("flowsk_dask")  # the [dask] extra
    found = _callables(flowsk_dask)
    assert {f"flowsk_dask.{n}" for n in ("predict", "sample_posterior", "share", "onnx_map",
                                         "TorchThreads.setup")} <= set(found)
    for name, function in found.items():
        # flowsk_dask names flowsk's estimators for type checkers only (it does not import
        # torch), so they resolve given flowsk
        _check_annotated(name, function, localns={"InverseSolver": flowsk.InverseSolver})


def test_fit_returns_the_estimator_type():
    # BaseFlowEstimator.fit is annotated with a self-type variable, so FlowPrior.fit is
    # seen returning a FlowPrior, InjectiveFlowPrior.fit an InjectiveFlowPrior
    hints = typing.get_type_hints(flowsk.FlowPrior.fit)
    assert hints["return"] is hints["self"]
    assert hints["return"].__bound__ == typing.ForwardRef("BaseFlowEstimator")
    assert typing.get_type_hints(flowsk.InverseSolver.fit)["return"] is flowsk.InverseSolver


@pytest.mark.parametrize("alias, choices", [
    (_typing.Architecture, ARCHITECTURES),
    (_typing.Coupling, tuple(TRANSFORMS)),
    (_typing.OnNonfinite, ("raise", "warn")),
])
def test_literal_aliases_list_the_accepted_choices(alias, choices):
    assert set(typing.get_args(alias)) == set(choices)


def test_injective_literals_list_the_accepted_choices():
    hints = typing.get_type_hints(flowsk.InjectiveFlowPrior.__init__)
    assert set(typing.get_args(hints["activation"])) == set(ACTIVATIONS)
    assert set(typing.get_args(hints["logdet"])) == {"auto", *LOGDET_METHODS}

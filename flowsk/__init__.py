"""flowsk: normalizing-flow priors for inverse problems as scikit-learn estimators."""
from ._version import __version__
from .injective import InjectiveFlowPrior
from .persistence import ModelFileError, load, save
from .prior import FlowPrior
from .solver import InverseSolver

__all__ = ["FlowPrior", "InjectiveFlowPrior", "InverseSolver", "ModelFileError", "__version__",
           "load", "save"]

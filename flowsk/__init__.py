"""flowsk: normalizing-flow priors for inverse problems as scikit-learn estimators."""
from .injective import InjectiveFlowPrior
from .prior import FlowPrior
from .solver import InverseSolver

__version__ = "0.1.0"
__all__ = ["FlowPrior", "InjectiveFlowPrior", "InverseSolver"]

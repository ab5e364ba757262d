"""flowsk: normalizing-flow priors for inverse problems as scikit-learn estimators."""
from .prior import FlowPrior

__version__ = "0.1.0"
__all__ = ["FlowPrior"]

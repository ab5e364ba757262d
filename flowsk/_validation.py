"""Input and parameter checks that every estimator and method shares (NumPy only)."""
import numbers
import warnings

import numpy as np


def is_real(value, low=-np.inf):
    """True for a finite real number ``>= low`` (not a bool)."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and bool(np.isfinite(value)) and value >= low)


def check_int(name, value, low):
    """Raise ``ValueError`` unless ``value`` is an int ``>= low``; returns ``value``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def check_choice(name, value, choices):
    """Raise ``ValueError`` unless ``value`` is one of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


def check_finite_output(values, on_nonfinite, what):
    """Raise or warn (``on_nonfinite`` = ``"raise"`` / ``"warn"``) when ``values`` ``(n, ...)``
    holds non-finite entries; returns ``values``."""
    bad = int((~np.isfinite(values.reshape(len(values), -1))).any(1).sum())
    if bad:
        msg = (f"{bad} of {len(values)} {what} contain non-finite values; the flow is unstable "
               "for these inputs (try coupling='robust-spline' or a lower temperature)")
        if on_nonfinite == "raise":
            raise FloatingPointError(msg)
        # helper -> public method -> the caller of that method
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return values


def check_float32_range(X, name):
    """Raise ``ValueError`` when ``X`` holds values beyond float32, the flows' precision."""
    if X.dtype != np.float32 and X.size:
        largest = max(abs(float(X.min())), abs(float(X.max())))
        if largest > np.finfo(np.float32).max:
            raise ValueError(f"{name} has values of magnitude up to {largest:.3g}, beyond "
                             "the float32 range the flows compute in; rescale it")
    return X

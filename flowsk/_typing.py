"""Type aliases of the public API (string choices, seeds, devices, paths)."""
from __future__ import annotations

import os
from typing import Literal

import numpy as np
import torch

#: ``random_state`` as scikit-learn takes it.
RandomStateLike = int | np.random.RandomState | None
#: ``device``: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... or a ``torch.device``.
Device = str | torch.device
PathLike = str | os.PathLike
#: What an estimator does with non-finite outputs.
OnNonfinite = Literal["raise", "warn"]
#: ``flowsk.nn.coupling.TRANSFORMS``.
Coupling = Literal["affine", "additive", "spline", "robust-spline"]
#: ``flowsk.nn.builders.ARCHITECTURES``.
Architecture = Literal["mlp", "glow", "realnvp", "chavez", "maf"]
ImageShape = tuple[int, int, int]
DataRange = tuple[float, float]

"""Inverse-problem methods by name; each family lives in its own module."""
from . import latent
from . import variational
from . import mcmc
from . import projection

METHODS = {**latent.METHODS, **variational.METHODS, **mcmc.METHODS,
           **projection.METHODS}

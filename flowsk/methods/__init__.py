"""Inverse-problem methods by name; each family lives in its own module."""
from . import latent, mcmc, projection, smc, variational

METHODS = {**latent.METHODS, **variational.METHODS, **mcmc.METHODS,
           **smc.METHODS, **projection.METHODS}

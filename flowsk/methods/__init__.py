"""Inverse-problem methods by name; each family lives in its own module."""
from . import latent

METHODS = {**latent.METHODS}

"""Kept for config files written before the defaults moved into the package: ``from configs import base`` still
works from the repository root. New config files do ``from diffseg_jax import defaults``."""

from diffseg_jax.defaults import *

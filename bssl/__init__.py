"""bssl: billion-scale semi-supervised learning (Yalniz et al., 2019) in JAX/Flax."""

__version__ = "0.1.0"

"""cxrjax: self-supervised chest X-ray pre-training in JAX/Flax."""

__version__ = "0.1.0"

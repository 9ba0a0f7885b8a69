"""bigjax: a JAX research framework for scalable pretraining."""

__version__ = "0.1.0"

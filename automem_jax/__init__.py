"""automem_jax: AutoMem's learned memory management for LLM agents, in JAX / Flax NNX."""

__version__ = "0.1.0"

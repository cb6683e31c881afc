"""JAX numeric kernels for causal-engine.

Pure functions over arrays and NamedTuples; this package imports only ``jax``
and ``numpy`` (never ``engine``), so a kernel can be timed with nothing else
loaded. Kernels never call ``jax.jit`` on themselves: the caller compiles.
"""

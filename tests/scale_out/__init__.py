"""Scripts that run in processes of their own: eight host devices, or several
JAX processes joined by ``jax.distributed``."""

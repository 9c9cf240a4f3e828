"""cram_jax: Compression-Aware Minimization (CrAM) for JAX and Optax."""

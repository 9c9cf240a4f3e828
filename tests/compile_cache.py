"""A persistent JAX compilation cache for one test module.

Modules that compile the same programs several times (the runner's init and
evaluation in every run, identical initial states) share them through a cache
in a temporary directory: the cache returns the same executables, so what is
tested does not change. JAX's cache settings are restored afterwards.
"""

from __future__ import annotations

import contextlib
import os

import jax
from jax.experimental.compilation_cache import compilation_cache

_SETTINGS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)


@contextlib.contextmanager
def cache_in(directory: str | os.PathLike):
  """Within the block, compilations over 0.5 s are cached in ``directory``."""
  saved = {name: getattr(jax.config, name) for name in _SETTINGS}
  compilation_cache.reset_cache()  # forget an earlier "no cache" decision
  jax.config.update("jax_compilation_cache_dir", str(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  try:
    yield
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()


def subprocess_env(directory: str | os.PathLike) -> dict[str, str]:
  """Environment variables that make a child process cache every compilation
  in ``directory`` (runs of one test that compile the same programs)."""
  return {
      "JAX_COMPILATION_CACHE_DIR": str(directory),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
  }

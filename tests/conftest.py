"""Test-session set-up shared by every module.

8 simulated CPU devices, so data-parallel code (pmap, meshes) is exercised
without an accelerator. This must run before JAX is imported anywhere.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
).strip()

# One persistent compilation cache per test run, made by the first process
# (the xdist controller) and inherited through the environment by both
# workers and every process a test starts: modules compile many identical
# programs (the runner's steps on digits in several modes, the zoo's models).
# A hit returns what the same program compiled to, so nothing tested changes.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="cram_jax_test_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from hypothesis import settings  # noqa: E402

# Every example compiles a fresh shape: no per-example deadline, modest counts.
settings.register_profile(
    "cram_jax", deadline=None, max_examples=40, derandomize=True
)
settings.load_profile("cram_jax")


# The slowest modules first (seconds on 2 cores): `--dist loadfile` hands each
# worker the next module when it is free, so short modules fill the end
# instead of one long module running alone.
_SLOWEST_FIRST = (
    "test_compress.py",  # ~400 s
    "test_fsdp.py",  # ~160 s
    "test_compare.py",  # ~150 s
    "test_multihost.py",  # ~145 s
    "test_obs.py",  # ~100 s
    "test_experiments_e2e.py",  # ~95 s
)


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(_SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))

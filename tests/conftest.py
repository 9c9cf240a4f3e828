"""Test-session set-up shared by every module.

8 simulated CPU devices, so data-parallel code (pmap, meshes) is exercised
without an accelerator. This must run before JAX is imported anywhere.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from hypothesis import settings  # noqa: E402

# Every example compiles a fresh shape: no per-example deadline, modest counts.
settings.register_profile(
    "cram_jax", deadline=None, max_examples=40, derandomize=True
)
settings.load_profile("cram_jax")

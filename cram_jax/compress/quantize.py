"""Symmetric per-output-channel fake quantisation (beyond the paper).

Each output channel (the last axis of a Flax kernel) is scaled so its largest
magnitude maps to ``2**(bits-1) - 1``, rounded, clipped and scaled back. Nothing
is pruned, so the mask is all ones and CrAM's gradient at the quantised point
passes straight through to the dense weights.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from cram_jax.compress import base
from cram_jax.compress import select as select_lib


def fake_quantize(x: jax.Array, bits: int, axis: int = -1) -> jax.Array:
  """Rounds ``x`` to a symmetric ``bits``-bit grid, one scale per index of ``axis``."""
  levels = 2 ** (bits - 1) - 1
  reduce_axes = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
  peak = jnp.max(jnp.abs(x), axis=reduce_axes, keepdims=True)
  scale = jnp.where(
      peak > 0, peak / levels, jnp.ones((), x.dtype)
  )  # all-zero channel: any scale
  return (jnp.clip(jnp.round(x / scale), -levels, levels) * scale).astype(
      x.dtype
  )


def quantize(
    bits: int,
    *,
    axis: int = -1,
    select: select_lib.Selector | None = None,
    include: select_lib.Patterns = None,
    exclude: select_lib.Patterns = None,
) -> base.Compressor:
  """Fake-quantises every prunable leaf to ``bits`` bits per output channel.

  Args:
    bits: 2 to 16.
    axis: the output-channel axis (-1 for Flax Dense and Conv kernels).
    select, include, exclude: leaf selection, as in
      :func:`~cram_jax.compress.magnitude.global_magnitude`.

  Returns:
    ``compress(params, key=None) -> (quantised_params, masks)`` with all-True masks.
  """
  owner = f"quantize({bits!r})"
  if isinstance(bits, bool) or not isinstance(bits, int):
    raise TypeError(f"{owner}: bits must be an int, got {bits!r}")
  if not 2 <= bits <= 16:
    raise ValueError(f"{owner}: bits must be in [2, 16], got {bits}")
  rule = select_lib.resolve(select, include, exclude, owner=owner)

  def compress(params: Any, key: Any = None) -> tuple[Any, Any]:
    del key
    chosen = dict(select_lib.selected(params, rule, owner=owner))
    for name, x in chosen.items():
      if not -x.ndim <= axis < x.ndim:
        raise ValueError(
            f"{owner}: leaf '{name}' of shape {x.shape} has no axis {axis}"
        )

    def one(path, x):
      name = select_lib.path_str(path)
      return fake_quantize(x, bits, axis) if name in chosen else x

    quantised = jax.tree_util.tree_map_with_path(one, params)
    masks = base.masks_for(
        params, {name: jnp.ones(x.shape, bool) for name, x in chosen.items()}
    )
    return quantised, masks

  return compress

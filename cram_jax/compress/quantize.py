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

from cram_jax.compress import base, validate
from cram_jax.compress import select as select_lib

_MIN_BITS, _MAX_BITS = 2, 16


def _check_bits(bits: Any, owner: str) -> int:
  # 1 bit has no symmetric grid (2**0 - 1 = 0 levels: NaN); past 16 the grid
  # is finer than float32 needs.
  return validate.check_int(
      bits, "bits", owner, minimum=_MIN_BITS, maximum=_MAX_BITS
  )


def fake_quantize(x: jax.Array, bits: int, axis: int = -1) -> jax.Array:
  """Rounds ``x`` to a symmetric ``bits``-bit grid, one scale per index of ``axis``.

  Needs a floating-point ``x`` with at least one dimension, an int ``bits`` in
  [2, 16] and an int ``axis`` of ``x``; anything else is a TypeError/ValueError.
  """
  owner = f"fake_quantize(bits={bits!r})"
  bits = _check_bits(bits, owner)
  dtype = validate.dtype_of(x)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"{owner}: x must be a floating-point array, got {validate.short(x)}"
        + ("" if dtype is None else f" of dtype {dtype}")
    )
  x = jnp.asarray(x)
  axis = validate.check_axis(axis, x.ndim, owner, f"x of shape {x.shape}")
  levels = 2 ** (bits - 1) - 1
  reduce_axes = tuple(a for a in range(x.ndim) if a != axis)
  peak = jnp.max(jnp.abs(x), axis=reduce_axes, keepdims=True)
  scale = jnp.where(
      peak > 0, peak / levels, jnp.ones((), x.dtype)
  )  # all-zero channel: any scale
  return (jnp.clip(jnp.round(x / scale), -levels, levels) * scale).astype(
      x.dtype
  )


@validate.factory
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
  bits = _check_bits(bits, owner)
  axis = validate.check_int(axis, "axis", owner)
  rule = select_lib.resolve(select, include, exclude, owner=owner)

  def compress(params: Any, key: Any = None) -> tuple[Any, Any]:
    if key is not None:  # deterministic: the key is only checked
      base.as_key(key, owner)
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

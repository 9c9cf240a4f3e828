"""The exact cut of a magnitude mask, found digit by digit (the GPU schedule).

:mod:`cram_jax.compress.magnitude` ranks weights by key (the bits of ``|w|``),
then flat index, and keeps the first ``k`` of each group. Its search finds
the cut in few passes over the weights and skips the leaves it does not need,
with a data-dependent loop and a branch per leaf: the right trade on a CPU.
On a GPU each such branch or loop step waits for the host, while a pass over
every leaf is cheap, so this schedule does a fixed number of passes and
branches at most once:

1. The threshold key ``t``, ``_DIGIT_BITS`` bits per pass from the top: each
   pass counts, per leaf, the weights at least each of the ``2**_DIGIT_BITS
   - 1`` keys that split the current bucket, and moves to the highest
   sub-bucket whose count still reaches ``k``. 31 bits take 8 passes (16-bit
   floats: 4).
2. The per-leaf counts at ``t`` and ``t + 1`` tell how many tied weights each
   leaf holds and so how many of them it keeps (ties: lower flat index
   first, leaves in order). Only a leaf that keeps some but not all of its
   ties needs a flat-index bound; if any does (one ``lax.cond``), the same
   digit passes find it among the flat indices.

Counts are sums over whole leaves, so sharded leaves need only all-reduces of
the count vectors, as on the CPU schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Bits of the key settled per pass: 2**_DIGIT_BITS - 1 candidates counted.
_DIGIT_BITS = 4


def group_sum(per_leaf: jax.Array, group_of: np.ndarray, num_groups: int):
  """Sums the rows of ``per_leaf`` (one per leaf) into one per group."""
  if num_groups == len(group_of):  # one leaf per group
    return per_leaf
  if num_groups == 1:
    return jnp.sum(per_leaf, axis=0, keepdims=True)
  return jax.ops.segment_sum(
      per_leaf, group_of, num_groups, indices_are_sorted=True
  )


def digit_search(
    count: Callable[[jax.Array], jax.Array],
    holds: Callable[[jax.Array], jax.Array],
    at_zero: jax.Array,
    group_of: np.ndarray,
    num_groups: int,
    bits: int,
    dtype,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per group, the largest ``v`` in ``[0, 2**bits)`` where ``holds``.

  ``count`` maps ``(groups, c)`` candidates to ``(leaves, c)`` per-leaf
  counts, monotone in the candidate; ``holds`` maps their ``(groups, c)``
  sums per group to booleans, true at 0 and on a prefix of the values.
  ``at_zero``: the per-leaf counts at 0. Returns ``v`` and the per-leaf
  counts at ``v`` and at ``v + 1`` (zero if ``v + 1`` was never counted:
  ``v = 2**bits - 1``).
  """
  digits = jnp.arange(1, 2**_DIGIT_BITS, dtype=dtype)
  num_leaves = len(group_of)

  def one_pass(p, state):
    lo, at_lo, at_next = state
    width = bits - _DIGIT_BITS * p  # the bucket is [lo, lo + 2**width)
    shift = jnp.maximum(width - _DIGIT_BITS, 0)
    valid = digits < (1 << (width - shift)).astype(dtype)
    # Past the bucket (only in a last, narrower pass) a digit would overflow:
    # it counts lo again and is never chosen.
    step = digits << shift.astype(dtype)
    cand = jnp.where(valid, lo[:, None] + step, lo[:, None])
    per_leaf = count(cand)
    ok = valid & holds(group_sum(per_leaf, group_of, num_groups))
    chosen = jnp.sum(ok, axis=1)  # ok is a prefix of the candidates

    def leaf_at(j):
      picked = jnp.clip(j, 0, len(digits) - 1)[group_of, None]
      return jnp.take_along_axis(per_leaf, picked, axis=1)[:, 0]

    last_ok = jnp.clip(chosen - 1, 0, len(digits) - 1)[:, None]
    moved = chosen > 0
    lo = jnp.where(moved, jnp.take_along_axis(cand, last_ok, axis=1)[:, 0], lo)
    at_lo = jnp.where(moved[group_of], leaf_at(chosen - 1), at_lo)
    # The first candidate that failed is the bucket's new end.
    failed = (chosen < jnp.sum(valid))[group_of]
    at_next = jnp.where(failed, leaf_at(chosen), at_next)
    return lo, at_lo, at_next

  state = (
      jnp.zeros((num_groups,), dtype),
      jnp.asarray(at_zero, jnp.int32),
      jnp.zeros((num_leaves,), jnp.int32),
  )
  return lax.fori_loop(0, math.ceil(bits / _DIGIT_BITS), one_pass, state)

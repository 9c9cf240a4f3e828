"""Exact magnitude pruning: global (over all prunable leaves) and per layer.

Both keep exactly ``round((1 - s) * N)`` weights of largest ``|w|``; among equal
magnitudes at the threshold the lower flat index wins (flat index = leaves in
``jax.tree`` flatten order, row-major inside a leaf), so the mask is a pure
function of the values. The reference PyTorch code keeps one weight fewer (its
threshold test is a strict ``>`` against the k-th value); we keep exactly k.
Layer-wise pruning takes its per-leaf counts from a sparsity distribution
(:mod:`cram_jax.compress.distribution`: uniform, ERK or a user map).

How it stays fast: no sort, and no concatenated copy of the model. The k-th
largest magnitude is found by bisection on its bit pattern. Non-negative IEEE
floats order exactly like their bits read as signed integers, so 31 passes
(float32) each count ``bits >= candidate`` over the leaves (a fused
compare-and-sum, one read of the weights) and fix one bit of the threshold. Ties
at the threshold are then resolved by a second bisection, on the flat index,
only when there are more tied entries than places left.
The counts accumulate in uint8 lanes across 128 slices of each leaf before one
int32 sum: XLA's CPU code vectorises that about 6x better than a plain int32 sum.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cram_jax.compress import base, distribution, validate
from cram_jax.compress import select as select_lib


def _bits(leaf: jax.Array, wide: bool) -> jax.Array:
  """``|leaf|`` as order-preserving signed-integer bits (float32, or float64 when ``wide``)."""
  if wide:
    return lax.bitcast_convert_type(
        jnp.abs(leaf).astype(jnp.float64), jnp.int64
    )
  return lax.bitcast_convert_type(jnp.abs(leaf).astype(jnp.float32), jnp.int32)


_SLICES = 128  # partial counts per lane stay <= 128: no uint8 overflow


def _count(predicate: jax.Array) -> jax.Array:
  """Number of True entries (int32), summed in uint8 lanes first (see module doc)."""
  flat = predicate.reshape(-1)
  main = flat.size - flat.size % _SLICES
  total = jnp.zeros((), jnp.int32)
  if main:
    lanes = jnp.sum(
        flat[:main].reshape(_SLICES, -1).astype(jnp.uint8),
        axis=0,
        dtype=jnp.uint8,
    )
    total = total + jnp.sum(lanes, dtype=jnp.int32)
  if main < flat.size:
    total = total + jnp.sum(flat[main:], dtype=jnp.int32)
  return total


def _per_group(
    counts: Sequence[jax.Array], groups: Sequence[int], num_groups: int
) -> jax.Array:
  """Sums per-leaf counts into a ``(num_groups,)`` vector."""
  return jnp.stack(
      [
          sum(
              (c for c, g in zip(counts, groups) if g == j),
              jnp.zeros((), jnp.int32),
          )
          for j in range(num_groups)
      ]
  )


def _kth_largest(
    bits: Sequence[jax.Array], groups: Sequence[int], k: jax.Array
) -> jax.Array:
  """Per group, the k-th largest value (1-based) among its leaves' entries.

  Builds each answer from the top bit down: a bit is set when at least k entries
  of the group are >= the prefix with that bit set. For k = 0 the result exceeds
  every entry. All groups share the same passes over the leaves.
  """
  itype = bits[0].dtype
  nbits = jnp.iinfo(itype).bits - 1  # the sign bit of |w| is always 0

  def body(i, prefix):
    candidate = prefix | (jnp.ones((), itype) << (nbits - 1 - i).astype(itype))
    counts = _per_group(
        [_count(b >= candidate[g]) for b, g in zip(bits, groups)],
        groups,
        len(k),
    )
    return jnp.where(counts >= k, candidate, prefix)

  return lax.fori_loop(0, nbits, body, jnp.zeros(k.shape, itype))


def _flat_index(shape: tuple[int, ...], offset: int) -> jax.Array:
  size = int(np.prod(shape))
  return (lax.iota(jnp.int32, size) + offset).reshape(shape)


def _tie_cutoff(
    equal: Sequence[jax.Array],
    groups: Sequence[int],
    offsets: Sequence[int],
    group_sizes: Sequence[int],
    need: jax.Array,
) -> jax.Array:
  """Per group, the smallest J with exactly ``need`` tied entries of flat index < J.

  The same bisection as the threshold, on the index instead of the value: the
  largest L with fewer than ``need`` ties below it, plus one (0 when need is 0).
  """
  nbits = max(int(max(group_sizes)).bit_length(), 1)

  def below(limit):
    return _per_group(
        [
            _count(e & (_flat_index(e.shape, o) < limit[g]))
            for e, g, o in zip(equal, groups, offsets)
        ],
        groups,
        len(need),
    )

  def body(i, prefix):
    candidate = prefix | (jnp.int32(1) << (nbits - 1 - i))
    return jnp.where(below(candidate) < need, candidate, prefix)

  largest_short = lax.fori_loop(
      0, nbits, body, jnp.zeros(need.shape, jnp.int32)
  )
  return jnp.where(need > 0, largest_short + 1, 0)


def _topk_masks(
    leaves: Sequence[jax.Array], groups: Sequence[int], k: jax.Array
) -> list[jax.Array]:
  """Masks keeping exactly ``k[g]`` largest ``|w|`` among the leaves of each group g.

  ``groups[i]`` is leaf i's group: one group for global pruning, one per leaf for
  layer-wise. Ties at the threshold go to the lower flat index within the group.
  """
  wide = any(leaf.dtype == jnp.float64 for leaf in leaves)
  bits = [_bits(leaf, wide) for leaf in leaves]
  k = jnp.asarray(k, jnp.int32)
  num_groups = len(k)
  threshold = _kth_largest(bits, groups, k)
  above = _per_group(
      [_count(b > threshold[g]) for b, g in zip(bits, groups)],
      groups,
      num_groups,
  )
  equal = [b == threshold[g] for b, g in zip(bits, groups)]
  ties = _per_group([_count(e) for e in equal], groups, num_groups)
  need = k - above  # how many entries equal to the threshold each group keeps

  def every_tie_kept():
    return [b >= threshold[g] for b, g in zip(bits, groups)]

  def lower_index_wins():
    offsets, filled = [], [0] * num_groups
    for b, g in zip(bits, groups):
      offsets.append(filled[g])
      filled[g] += int(np.prod(b.shape))
    cutoff = _tie_cutoff(equal, groups, offsets, filled, need)
    return [
        (b > threshold[g]) | (e & (_flat_index(b.shape, o) < cutoff[g]))
        for b, e, g, o in zip(bits, equal, groups, offsets)
    ]

  # Random floats rarely tie at the threshold; then the index bisection is skipped.
  return lax.cond(jnp.all(need >= ties), every_tie_kept, lower_index_wins)


def _level_counts(levels: tuple[Any, ...], size: int) -> jax.Array | int:
  counts = [base.kept_count(s, size) for s in levels]
  if len(counts) == 1:
    return counts[0]
  return jnp.stack([jnp.asarray(c, jnp.int32) for c in counts])


def check_level(level: Any, num_levels: int, owner: str) -> None:
  """Checks ``level``, an index into the ``num_levels`` sparsities.

  A concrete level (a Python or NumPy int, a concrete integer array) out of
  range is a ValueError here, before any tracing. A traced level is checked
  for dtype and shape at trace time and for its range at run time: out of
  range raises when the compiled function runs (a ``JaxRuntimeError`` carrying
  the message; see :func:`validate.check_traced_range`), never a clamp.
  """
  message = (
      f"{owner}: level must index one of the {num_levels} sparsities "
      f"(0 <= level < {num_levels}), got "
  )
  dtype = validate.dtype_of(level)
  if (
      dtype is None
      or dtype == np.bool_
      or not jnp.issubdtype(dtype, jnp.integer)
  ):
    raise TypeError(
        f"{owner}: level must be an int index, got {validate.short(level)}"
        + ("" if dtype is None else f" (dtype {dtype})")
    )
  if np.ndim(level) != 0:
    raise ValueError(
        f"{owner}: level must be a scalar index, got shape {np.shape(level)}"
    )
  if validate.is_traced(level):
    validate.check_traced_range(level, 0, num_levels - 1, message)
  elif not 0 <= int(level) < num_levels:
    raise ValueError(f"{message}{int(level)}")


def _level_index(key: Any, level: Any, num_levels: int, owner: str) -> Any:
  """``level`` when given (a sweep over the levels, one compilation), else sampled."""
  if level is None:
    return base.sample_index(key, num_levels, owner)
  if key is not None:
    base.as_key(key, owner)
  check_level(level, num_levels, owner)
  return jnp.asarray(level, jnp.int32)


def _attach_checks(compress: Any, levels: tuple[Any, ...], owner: str) -> None:
  """``compress.levels`` and ``compress.check_call(key=None, *, level=None)``.

  :func:`cram_jax.prune` calls ``check_call`` with the concrete arguments
  before it jit-compiles the compressor, where ``level`` would be traced.
  """

  def check_call(key: Any = None, *, level: Any = None) -> None:
    if key is not None:
      base.as_key(key, owner)
    if level is not None:
      check_level(level, len(levels), owner)
    elif len(levels) > 1 and key is None:
      base.sample_index(key, len(levels), owner)  # raises: a key is needed

  compress.levels = levels
  compress.check_call = check_call


def _pick(counts: Any, index: jax.Array) -> Any:
  return counts if jnp.ndim(counts) == 0 else counts[index]


@validate.factory
def global_magnitude(
    sparsity: float | Sequence[float] | jax.Array,
    *,
    select: select_lib.Selector | None = None,
    include: select_lib.Patterns = None,
    exclude: select_lib.Patterns = None,
) -> base.Compressor:
  """Global magnitude pruning over all prunable leaves together.

  Keeps exactly ``round((1 - s) * N)`` of the N prunable weights, those of
  largest magnitude (ties: lower flat index), and zeroes the rest.

  Args:
    sparsity: fraction to prune, in [0, 1]; a sequence samples one level per call
      (CrAM-Multi, needs a key); a traced scalar works under ``jit``.
    select: a :class:`~cram_jax.compress.select.Selection` or ``(path, leaf) ->
      bool``; default every float leaf with ``ndim >= 2``.
    include, exclude: regex shorthands for ``Selection(include, exclude)``.

  Returns:
    ``compress(params, key=None, *, level=None) -> (compressed_params, masks)``;
    ``level`` picks ``sparsity[level]`` instead of sampling (it may be traced, so
    one compiled function sweeps every level with exact counts). A concrete
    ``level`` out of range is a ValueError at once; a traced one is checked
    when the compiled function runs and raises there (a ``JaxRuntimeError``
    with the same message), never clamped: see :func:`check_level`.
    ``compress.levels`` is the tuple of sparsities.

  Raises:
    TypeError: for a distribution (``erk(0.9)``, a dict): it sets each leaf's
      sparsity, which is layer-wise pruning; use :func:`layerwise_magnitude`.

  Example::

    compress = global_magnitude([0.5, 0.7, 0.9])
    sparse, masks = compress(params, jax.random.key(0))   # a sampled level
    sparse, masks = jax.jit(compress)(params, level=2)     # 90%
  """
  owner = f"global_magnitude({validate.short(sparsity)})"
  if isinstance(sparsity, (distribution.Distribution, Mapping)):
    raise TypeError(
        f"{owner}: a per-leaf distribution fixes each leaf's sparsity, which "
        "is layer-wise by definition; use layerwise_magnitude("
        f"{validate.short(sparsity)}) instead, or keep leaves dense under "
        "global pruning with select=/exclude="
    )
  levels = base.as_levels(sparsity, owner)
  rule = select_lib.resolve(select, include, exclude, owner=owner)

  def compress(
      params: Any, key: Any = None, *, level: Any = None
  ) -> tuple[Any, Any]:
    chosen = select_lib.selected(params, rule, owner=owner)
    size = sum(int(np.prod(jnp.shape(x))) for _, x in chosen)
    k = _pick(
        _level_counts(levels, size),
        _level_index(key, level, len(levels), owner),
    )
    masks = _topk_masks(
        [x for _, x in chosen], [0] * len(chosen), jnp.reshape(k, (1,))
    )
    return base.compress_with(
        params, {name: m for (name, _), m in zip(chosen, masks)}
    )

  _attach_checks(compress, levels, owner)
  return compress


@validate.factory
def layerwise_magnitude(
    sparsity: (
        float
        | Sequence[float]
        | jax.Array
        | distribution.Distribution
        | Mapping[str, Any]
    ),
    *,
    select: select_lib.Selector | None = None,
    include: select_lib.Patterns = None,
    exclude: select_lib.Patterns = None,
) -> base.Compressor:
  """Magnitude pruning inside each prunable leaf, at per-leaf sparsities.

  Inside every leaf of n weights, keeps exactly its kept count of largest
  magnitude (ties: lower flat index). With a number s every leaf keeps
  ``round((1 - s) * n)`` (the paper's "uniform"); with a
  :mod:`~cram_jax.compress.distribution` the counts are the distribution's,
  e.g. ``layerwise_magnitude(erk(0.9))``. A plain dict ``{leaf-path regex:
  sparsity or None}`` is :func:`~cram_jax.compress.distribution.custom`; leaves
  it maps to None keep their weights and get a None mask.

  With several levels (a list of sparsities, ``erk([0.5, 0.7, 0.9])``, or
  lists in a map) one level is sampled per call for all leaves, or chosen by
  ``level=`` (which may be traced): the per-leaf counts of every level are a
  static table built at trace time, indexed by the level. ``compress.levels``
  is the tuple of levels. Other arguments as :func:`global_magnitude`.

  Example::

    compress = layerwise_magnitude(erk([0.5, 0.7, 0.9]))
    sparse, masks = jax.jit(compress)(params, level=2)  # ERK at 90% overall
  """
  owner = f"layerwise_magnitude({validate.short(sparsity)})"
  dist = distribution.as_distribution(sparsity, owner)
  rule = select_lib.resolve(select, include, exclude, owner=owner)

  def compress(
      params: Any, key: Any = None, *, level: Any = None
  ) -> tuple[Any, Any]:
    chosen = select_lib.selected(params, rule, owner=owner)
    index = _level_index(key, level, dist.num_levels, owner)
    plan = dist.plan([(name, jnp.shape(x)) for name, x in chosen], owner)
    pruned = [c for c, dense in zip(chosen, plan.dense) if not dense]
    # One group per leaf: every leaf is bisected in the same passes.
    masks = _topk_masks(
        [x for _, x in pruned], list(range(len(pruned))), plan.kept_at(index)
    )
    return base.compress_with(
        params, {name: m for (name, _), m in zip(pruned, masks)}
    )

  _attach_checks(compress, dist.levels, owner)
  return compress

"""Exact magnitude pruning: global (over all prunable leaves) and per layer.

Both keep exactly ``round((1 - s) * N)`` weights of largest ``|w|``; among equal
magnitudes at the threshold the lower flat index wins (flat index = leaves in
``jax.tree`` flatten order, row-major inside a leaf), so the mask is a pure
function of the values. The reference PyTorch code keeps one weight fewer (its
threshold test is a strict ``>`` against the k-th value); we keep exactly k.
Layer-wise pruning takes its per-leaf counts from a sparsity distribution
(:mod:`cram_jax.compress.distribution`: uniform, ERK or a user map).

How it stays fast: no sort, and no concatenated copy of the model. Leaves of
one shape are stacked once into a ``(G, *shape)`` array of keys, so each pass
is one count per distinct shape (the compiled program stays small). The k-th
largest magnitude is found by a radix search on its bit pattern: non-negative
IEEE floats order exactly like their bits read as signed integers, and each
pass counts the entries at least each of 3 candidates (one reduction per
stack), fixing 2 bits: 16 passes for float32, 8 for leaves that are all
bfloat16 or all float16 (searched on their own 16 bits). Ties at the threshold
are cut by a second radix search on the flat index, only when there are more
tied entries than places left, for every leaf in the same passes.
Counts never reshape across axes (see :func:`_count_rows`), so sharded
parameters need only all-reduces of small count vectors. docs/masks.md has the
details.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cram_jax.compress import base, distribution, validate
from cram_jax.compress import select as select_lib

# Bits fixed per pass over the weights: 2**_RADIX_BITS - 1 thresholds are
# counted in each read (sibling reductions XLA fuses into one loop).
_RADIX_BITS = 2
# Rows summed in uint8 before the int32 sum: keeps the counting vectorised.
_CHUNK = 8


def _key_types(leaves: Sequence[jax.Array]) -> tuple[Any, Any]:
  """The float type the magnitudes are compared in and its same-width int.

  Leaves that all share one 16-bit float type stay 16-bit (half the bits to
  bisect); any float64 leaf makes everything float64; the rest is float32, into
  which bfloat16 and float16 embed exactly.
  """
  dtypes = {jnp.dtype(leaf.dtype) for leaf in leaves}
  if len(dtypes) == 1:
    (only,) = dtypes
    if jnp.issubdtype(only, jnp.floating) and only.itemsize == 2:
      return only, jnp.int16
  if jnp.dtype(jnp.float64) in dtypes:
    return jnp.float64, jnp.int64
  return jnp.float32, jnp.int32


def _bits(leaf: jax.Array, ftype: Any, itype: Any) -> jax.Array:
  """``|leaf|`` as order-preserving signed-integer bits."""
  return lax.bitcast_convert_type(jnp.abs(leaf).astype(ftype), itype)


def shard_counts(x: Any) -> tuple[int, ...]:
  """Per axis of ``x``, into how many shards an explicit sharding splits it.

  Known at trace time only for explicit-mode meshes (``jax.typeof(x)``); 1 for
  every axis otherwise (auto mode: XLA places the shards).
  """
  ones = (1,) * np.ndim(x)
  try:
    sharding = jax.typeof(x).sharding
    sizes = dict(sharding.mesh.shape)
    spec = tuple(sharding.spec) + (None,) * len(ones)
  except (AttributeError, TypeError, ValueError):
    return ones
  counts = []
  for entry in spec[: len(ones)]:
    names = (
        () if entry is None else (entry,) if isinstance(entry, str) else entry
    )
    counts.append(int(np.prod([sizes.get(n, 1) for n in names])))
  return tuple(counts)


def _sharding_key(x: Any) -> str | None:
  """The explicit sharding spec of ``x`` as a string (None in auto mode)."""
  try:
    return str(jax.typeof(x).sharding.spec)
  except (AttributeError, TypeError, ValueError):
    return None


def _count_rows(predicate: jax.Array, keep: int = 1) -> jax.Array:
  """Number of True entries per index of the ``keep`` leading axes (int32).

  One other axis is split into runs of up to ``_CHUNK`` neighbouring rows,
  summed in uint8 (vectorised about 8x better on CPU than an int32 sum), then
  the rest is summed in int32. No reshape crosses axes: an axis sharded into
  blocks of a multiple of the run length stays local, so the count is one
  local sum plus an all-reduce of the few counts. Under an explicit sharding
  the run divides the block; under auto sharding the last axis is preferred
  (with leaves stacked, a sharded leading axis whose block is not a multiple of
  the run made XLA all-reduce the uint8 partial sums: tests/test_sharded_hlo.py,
  ``fsdp_first``).
  """
  shape = predicate.shape
  if len(shape) == keep:
    return predicate.astype(jnp.int32)
  last = len(shape) - 1
  block = [
      n // s if n % s == 0 else 1
      for n, s in zip(shape, shard_counts(predicate))
  ]
  # Auto mode sees no shards: an axis whose size is a multiple of _CHUNK * 8
  # keeps whole runs in every block of an up-to-8-way split of that axis (a
  # 2048x1000 head split 8 ways on its outputs has blocks of 125: runs along
  # them straddle shards, and XLA gathers the partial sums).
  axis = max(
      range(keep, len(shape)),
      key=lambda a: (
          math.gcd(block[a], _CHUNK),
          shape[a] % (_CHUNK * 8) == 0,
          a == last,
          shape[a],
      ),
  )
  run = math.gcd(block[axis], _CHUNK)
  if run == 1:
    return jnp.sum(
        predicate, axis=tuple(range(keep, len(shape))), dtype=jnp.int32
    )
  runs = predicate.astype(jnp.uint8).reshape(
      shape[:axis] + (shape[axis] // run, run) + shape[axis + 1 :]
  )
  return jnp.sum(
      jnp.sum(runs, axis=axis + 1, dtype=jnp.uint8),
      axis=tuple(range(keep, len(shape))),
      dtype=jnp.int32,
  )


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """Row-major flat index of every entry, built from iotas in ``shape`` itself."""
  index, stride = jnp.zeros(shape, jnp.int32), 1
  for axis in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.int32, shape, axis) * stride
    stride *= shape[axis]
  return index


def _radix_search(
    nbits: int,
    itype: Any,
    num_groups: int,
    count: Any,
    ok: Any,
) -> jax.Array:
  """Per group, the largest ``v`` in ``[0, 2**nbits)`` with ``ok`` true at ``v``.

  ``ok`` must be monotone (true up to the answer, false above) and true at 0.
  ``count(candidates)`` maps ``(num_groups, c)`` candidates to ``(num_groups, c)``
  int32 counts, one read of the weights for all of them; ``ok(counts)`` is
  elementwise. Each pass fixes ``_RADIX_BITS`` bits of the answer, top down.
  """
  passes = -(-nbits // _RADIX_BITS)
  digits = jnp.arange(1, 2**_RADIX_BITS, dtype=itype)

  def body(i, prefix):
    shift = ((passes - 1 - i) * _RADIX_BITS).astype(itype)
    candidates = prefix[:, None] | (digits << shift)
    # Digits past the top bit wrap negative: never ok.
    good = ok(count(candidates)) & (candidates >= 0)
    best = jnp.sum(
        good, axis=1, dtype=itype
    )  # monotone: ok digits are a prefix
    return prefix | (best << shift)

  return lax.fori_loop(0, passes, body, jnp.zeros((num_groups,), itype))


def _rows(values: jax.Array, index: np.ndarray, ndim: int) -> jax.Array:
  """``values[..., index]`` shaped to broadcast on a ``(G, ...)`` stack of rank
  ``ndim``: one value per row (``values`` of shape ``(n,)``, n = 1 broadcast),
  or per candidate and row (``(c, n)`` -> ``(c, G, 1, ..., 1)``)."""
  if values.shape[-1] > 1:
    picked = values[..., index]
  else:
    picked = jnp.broadcast_to(values, values.shape[:-1] + index.shape)
  return picked.reshape(picked.shape + (1,) * (ndim - 1))


def _topk_masks(
    leaves: Sequence[jax.Array], k: jax.Array, per_leaf: bool
) -> list[jax.Array]:
  """Masks keeping exactly the ``k`` largest ``|w|`` (ties: lower flat index).

  One group of all leaves (``k`` of shape ``(1,)``), or with ``per_leaf`` one
  group per leaf (``k`` of shape ``(len(leaves),)``).

  Leaves of one shape (and explicit sharding) are stacked once into a
  ``(G, *shape)`` array of keys, so every pass is one count per distinct shape,
  not per leaf: the compiled program grows with the number of shapes (ResNet-50:
  21, BERT: 4), which keeps compilation short.
  """
  if not leaves:
    return []
  ftype, itype = _key_types(leaves)
  k = jnp.asarray(k, jnp.int32)
  num_groups = len(k)
  sizes = np.asarray([int(np.prod(x.shape)) for x in leaves])
  by_shape: dict[Any, list[int]] = {}
  for i, x in enumerate(leaves):
    by_shape.setdefault((tuple(x.shape), _sharding_key(x)), []).append(i)
  members = [np.asarray(ix) for ix in by_shape.values()]
  stacks = [
      jnp.stack([_bits(leaves[i], ftype, itype) for i in ix]) for ix in members
  ]
  # Concatenated per-stack rows back to leaf order.
  to_leaf_order = np.argsort(np.concatenate(members), kind="stable")

  def leaf_counts(predicate, keep=1):
    """Counts of ``predicate(stack, members)`` per leaf, in leaf order.

    With ``keep=2`` the predicate has a candidate axis after the stack axis:
    ``(L, c)``.
    """
    rows = [
        _count_rows(predicate(s, ix), keep) for s, ix in zip(stacks, members)
    ]
    return jnp.concatenate(rows)[to_leaf_order]

  def count_at_least(candidates):
    # All candidates of a stack in one compare-and-count, (G, c, *shape):
    # the candidates of one leaf are compared while it is in cache.
    counts = leaf_counts(
        lambda s, ix: s[:, None]
        >= jnp.swapaxes(_rows(candidates.T, ix, s.ndim), 0, 1),
        keep=2,
    )
    return counts if per_leaf else jnp.sum(counts, axis=0)[None]

  threshold = _radix_search(
      jnp.iinfo(itype).bits - 1,  # |w| has no sign bit
      itype,
      num_groups,
      count_at_least,
      lambda counts: counts >= k[:, None],
  )
  above_and_tied = leaf_counts(
      lambda s, ix: jnp.stack(
          [s > _rows(threshold, ix, s.ndim), s == _rows(threshold, ix, s.ndim)],
          axis=1,
      ),
      keep=2,
  ).T
  leaf_ties = above_and_tied[1]
  if per_leaf:
    above, ties = above_and_tied
  else:
    above, ties = jnp.sum(above_and_tied, axis=1)[:, None]
  need = k - above  # how many entries equal to the threshold each group keeps
  if per_leaf:
    leaf_need = need
  else:
    # Earlier leaves keep all their ties first: the cut falls in one leaf.
    leaf_need = jnp.clip(
        need[0] - (jnp.cumsum(leaf_ties) - leaf_ties), 0, leaf_ties
    )

  def every_tie_kept():
    return jnp.asarray(sizes, jnp.int32)

  def lower_index_wins():
    # One search for every leaf in the same passes (no branch per leaf); a
    # leaf that keeps all or none of its ties is settled in its first pass.
    cut = _tie_cut_stacked(stacks, members, threshold, leaf_need, sizes)
    return jnp.where(leaf_need >= leaf_ties, sizes, cut[to_leaf_order])

  # Per leaf, ties of flat index below the cut are kept. Random floats rarely
  # tie at the threshold; then the index search is skipped.
  cuts = lax.cond(jnp.all(need >= ties), every_tie_kept, lower_index_wins)
  leaf_threshold = (
      threshold if per_leaf else jnp.broadcast_to(threshold, (len(leaves),))
  )
  masks = []
  for i, x in enumerate(leaves):
    b = _bits(x, ftype, itype)
    t = leaf_threshold[i]
    masks.append((b > t) | ((b == t) & (_flat_index(b.shape) < cuts[i])))
  return masks


def _tie_cut_stacked(
    stacks: Sequence[jax.Array],
    members: Sequence[np.ndarray],
    threshold: jax.Array,
    need: jax.Array,
    sizes: np.ndarray,
) -> jax.Array:
  """Per leaf (in stack order), the smallest J with ``need`` ties below J.

  A tie is an entry equal to the leaf's threshold (``threshold`` has one entry
  per leaf, or one for all); ``need`` is per leaf, in leaf order. The radix
  search on the flat index instead of the value: the largest L with fewer than
  ``need`` ties of index < L, plus one (0 when need is 0). All leaves are
  searched in the same passes, one count per stack.
  """
  tied = [s == _rows(threshold, ix, s.ndim) for s, ix in zip(stacks, members)]
  index = [_flat_index(s.shape[1:])[None] for s in stacks]
  starts = np.cumsum([0] + [len(ix) for ix in members])
  own = [np.arange(len(ix)) + o for ix, o in zip(members, starts)]

  def count_below(candidates):
    rows = [
        _count_rows(
            t[:, None]
            & (i[:, None] < jnp.swapaxes(_rows(candidates.T, o, t.ndim), 0, 1)),
            2,
        )
        for t, i, o in zip(tied, index, own)
    ]
    return jnp.concatenate(rows)

  need_here = need[np.concatenate(members)]
  largest_short = _radix_search(
      max(int(sizes.max()).bit_length(), 1),
      jnp.int32,
      len(need_here),
      count_below,
      lambda counts: counts < need_here[:, None],
  )
  return jnp.where(need_here > 0, largest_short + 1, 0)


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
        [x for _, x in chosen], jnp.reshape(k, (1,)), per_leaf=False
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
        [x for _, x in pruned], plan.kept_at(index), per_leaf=True
    )
    return base.compress_with(
        params, {name: m for (name, _), m in zip(pruned, masks)}
    )

  _attach_checks(compress, dist.levels, owner)
  return compress

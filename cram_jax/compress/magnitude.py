"""Exact magnitude pruning: global (over all prunable leaves) and per layer.

Both keep exactly ``round((1 - s) * N)`` weights of largest ``|w|``; among equal
magnitudes at the threshold the lower flat index wins (flat index = leaves in
``jax.tree`` flatten order, row-major inside a leaf), so the mask is a pure
function of the values. The reference PyTorch code keeps one weight fewer (its
threshold test is a strict ``>`` against the k-th value); we keep exactly k.
Layer-wise pruning takes its per-leaf counts from a sparsity distribution
(:mod:`cram_jax.compress.distribution`: uniform, ERK or a user map).

How it stays fast: no sort, no concatenated copy of the model, no stored
keys. Non-negative IEEE floats order exactly like their bits read as signed
integers, so one fused pass over the leaves counts the weights at least a
candidate key (computed from the leaf inside the pass). Ranking by key, then
flat index, the k-th position is found by a search that counts 2 candidates
per pass: bracketed first on a strided sample (one weight in 64), then
interpolated from the counts, until a candidate has exactly k weights at or
before it; ties at the threshold continue the search among the flat indices
of the tied weights (:func:`_search`). A leaf with no entry between the
search's ends is not read, so the last passes read few leaves: global float32
masks read the weights 4-5 times on ResNet-50- and BERT-sized trees. Counts
never reshape across axes (see :func:`_count_rows`), so sharded parameters
need only all-reduces of small count vectors. On a GPU, where every step of
that search waits for the host, a fixed number of counting passes finds the
same cut (:mod:`cram_jax.compress.radix`, the ``schedule=`` option).
docs/masks.md has the details.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cram_jax.compress import base, distribution, radix, validate
from cram_jax.compress import select as select_lib

# At most this many neighbouring entries along one axis are summed in uint8
# before the int32 sum. Measured on CPU (BERT-base, ResNet-50 kernels), runs of
# 32 count up to 2.5x faster than runs of 8; runs of 48 or more fall off a
# cliff (XLA emits the reduction differently).
_RUN = 32


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
  """``|leaf|`` as order-preserving signed-integer bits of type ``ftype``.

  Non-negative IEEE floats order like their bits (NaN above infinity). The
  sign bit is cleared with an integer mask, which is what ``abs`` does to an
  IEEE float, but XLA on CPU computes a 16-bit float's ``abs`` in float32 and
  back, 3-5x slower.
  """
  if leaf.dtype != ftype:
    leaf = leaf.astype(ftype)  # 16-bit floats embed exactly in float32
  return lax.bitcast_convert_type(leaf, itype) & jnp.iinfo(itype).max


def magnitude_keys(x: jax.Array) -> jax.Array:
  """Integer keys of float ``x`` that order exactly like ``|x|``.

  The bits of ``|x|`` in ``x``'s own width for 16- and 64-bit floats, in
  float32 otherwise (see :func:`_key_types`).
  """
  return _bits(x, *_key_types([x]))


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


def _count_rows(
    predicate: jax.Array, keep: int = 1, runs: bool = True
) -> jax.Array:
  """Number of True entries per index of the ``keep`` leading axes (int32).

  ``runs=False`` sums in int32 at once (for small arrays, such as samples
  whose axes are too short to keep runs inside every shard).

  One other axis is split into runs of up to ``_RUN`` neighbouring entries,
  summed in uint8 (vectorised far better on CPU than an int32 sum), then the
  rest is summed in int32. No reshape crosses axes: an axis sharded into
  blocks of a multiple of the run length stays local, so the count is one
  local sum plus an all-reduce of the few counts. A sharded axis whose block
  is not a multiple of the run would make XLA all-reduce the uint8 partial
  sums (tests/test_sharded_hlo.py), so under auto sharding (no shards known
  here) a run must also divide an 8-way split of its axis. Longer runs win,
  then the last axis, then a longer axis.
  """
  shape = predicate.shape
  if len(shape) == keep:
    return predicate.astype(jnp.int32)
  last = len(shape) - 1
  shards = shard_counts(predicate)

  def run_along(a):
    n, s = shape[a], shards[a]
    if s > 1:  # known blocks: the run divides each
      return math.gcd(n // s if n % s == 0 else 1, _RUN)
    # Auto mode sees no shards: the run divides a block of any split of the
    # axis up to 8 ways (a 2048x1000 head split 8 ways on its outputs has
    # blocks of 125: runs along them straddle shards).
    return math.gcd(n // 8 if n % 8 == 0 else 1, _RUN)

  axis = max(
      range(keep, len(shape)),
      key=lambda a: (run_along(a), a == last, shape[a]),
  )
  run = run_along(axis) if runs else 1
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


def _opaque(values: np.ndarray) -> tuple[jax.Array, ...]:
  """``values`` as traced int32 scalars, not constants.

  Per-leaf numbers (a group, a flat offset) given this way to a ``lax.cond``
  stay parameters of its branches (a constant would be folded into each
  branch), so same-shaped leaves compile to one shared kernel instead of one
  each: XLA's compile time grows with the number of distinct kernels.
  """
  return lax.optimization_barrier(tuple(jnp.int32(v) for v in values))


# Leaves smaller than this skip the condition of :func:`_branch_per_leaf`:
# reading them costs less than the condition's compile time (about 15% of a
# small tree's compile; no measurable run-time change on ResNet-50 or BERT).
_BRANCH_MIN = 65536


def _branch_per_leaf(pred, on, off, leaves, shared, per_leaf, index):
  """Per leaf ``i``: ``lax.cond(pred[i], on, off, leaf, *shared, *numbers)``.

  ``on`` must be right for every leaf, ``off`` is a shortcut where ``pred``
  holds: leaves under ``_BRANCH_MIN`` entries always take ``on``.
  ``numbers`` are leaf ``i``'s entries of ``per_leaf`` (tuples from
  :func:`_opaque`): they reach the branches as operands, not constants, so
  leaves of one shape share one compiled kernel. ``pred[i]`` is read at
  ``index[i]`` (from :func:`_opaque`) for the same reason: a slice at a
  constant offset is one more kernel per leaf (in a loop; outside one XLA
  folds the index back to a constant).
  """
  out = []
  for i, x in enumerate(leaves):
    args = (x, *shared, *(p[i] for p in per_leaf))
    if x.size < _BRANCH_MIN:
      out.append(on(*args))
    else:
      (which,) = lax.dynamic_slice(
          pred, (index[i],), (1,), allow_negative_indices=False
      )
      out.append(lax.cond(which, on, off, *args))
  return out


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """Row-major flat index of every entry, built from iotas in ``shape`` itself."""
  index, stride = jnp.zeros(shape, jnp.int32), 1
  for axis in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.int32, shape, axis) * stride
    stride *= shape[axis]
  return index


# Candidates counted per group in each pass over the weights (and the sample:
# 8 there took fewer passes but more time, measured on ResNet-50 and BERT).
_CANDIDATES = 2
# The bracketing search reads about one weight in _SAMPLE_STRIDE.
_SAMPLE_STRIDE = 64
# Interpolated candidates sit this many standard deviations of rank either
# side of the estimate.
_SPREAD = 3.0
# The first pass on all weights counts candidates this far inside the sample's
# bracket (as shares of its keys): the bracket spans 4 standard deviations of
# the sample's error either side, and the threshold fell in the inner 40% for
# 108 of 113 ResNet-50 and BERT-base leaves. When it does not, the next pass
# counts the bracket's end (:func:`_fall_back`). Counting the bracket's ends
# first took about one pass more per search.
_INNER = 0.3


def _per_candidate(values: jax.Array, ndim: int) -> jax.Array:
  """``(c,)`` values shaped ``(1, c, 1, ..., 1)`` against a ``(1, *shape)`` view."""
  return values.reshape((1, -1) + (1,) * (ndim - 1))


# Jitted so that a compressor called eagerly compiles once per tree structure:
# op by op, its while loops were traced and compiled anew on every call (about
# 0.5 s even for a 4x4 leaf). Inside a caller's jit it is simply inlined.
@functools.partial(jax.jit, static_argnames=("per_leaf", "schedule"))
def _topk(
    leaves: Sequence[jax.Array],
    k: jax.Array,
    per_leaf: bool,
    schedule: str = "auto",
) -> list[tuple[jax.Array, jax.Array]]:
  """Per leaf ``(pruned leaf, mask)``, keeping exactly the ``k`` largest ``|w|``
  (ties: lower flat index) and zeroing the rest.

  One group of all leaves (``k`` of shape ``(1,)``), or with ``per_leaf`` one
  group per leaf (``k`` of shape ``(len(leaves),)``). Within a group the
  entries are ranked by key, then by flat index (leaves in order, row-major
  inside a leaf); the mask keeps the first ``k``.

  ``schedule``: how the cut is found, with the same result: ``"search"``
  (:func:`_topk_searched`, few passes, for CPUs), ``"digits"``
  (:func:`_topk_by_digits`, fixed passes, for GPUs) or ``"auto"``: digits
  where the program is compiled for a GPU, search elsewhere.
  """
  if not leaves:
    return []
  leaves = list(leaves)
  searched = functools.partial(_topk_searched, per_leaf=per_leaf)
  by_digits = functools.partial(_topk_by_digits, per_leaf=per_leaf)
  if schedule == "auto":
    return lax.platform_dependent(
        leaves, k, cuda=by_digits, rocm=by_digits, default=searched
    )
  return {"search": searched, "digits": by_digits}[schedule](leaves, k)


def _leaf_layout(leaves: Sequence[jax.Array], per_leaf: bool):
  """``(sizes, group_of, offsets, group_sizes)`` as NumPy arrays: each leaf's
  size, group, flat offset in its group, and each group's size."""
  sizes = np.asarray([int(np.prod(x.shape)) for x in leaves])
  if per_leaf:
    return sizes, np.arange(len(sizes)), 0 * sizes, sizes
  offsets = np.cumsum(sizes) - sizes  # flat index of a leaf's first entry
  return sizes, np.zeros(len(sizes), int), offsets, sizes.sum(keepdims=True)


def _kept_before_cut(x, keys, t, cut):
  """``(pruned x, mask)``: keys above ``t``, and those equal to it at flat
  indices below ``cut``."""
  mask = (keys > t) | ((keys == t) & (_flat_index(x.shape) < cut))
  return jnp.where(mask, x, jnp.zeros((), x.dtype)), mask


def _topk_by_digits(
    leaves: list[jax.Array], k: jax.Array, per_leaf: bool
) -> list[tuple[jax.Array, jax.Array]]:
  """:func:`_topk` by :func:`radix.digit_search`: a fixed number of passes
  over every leaf and at most one branch, the schedule that pays on a GPU."""
  ftype, itype = _key_types(leaves)
  bits = jnp.iinfo(itype).bits - 1  # |w| has no sign bit
  k = jnp.asarray(k, jnp.int32)
  num_groups = len(k)
  sizes, group_of, _, _ = _leaf_layout(leaves, per_leaf)
  # Operands, not constants: same-shaped leaves share their kernels.
  leaf_group = _opaque(group_of)
  leaf_index = _opaque(np.arange(len(leaves)))

  def keys(x):
    return _bits(x, ftype, itype)

  # Counted as in the search, candidates on a leading axis: on an H100 that
  # took 0.7x the time of a sum with the candidates on the last axis and 0.6x
  # that of one sum per candidate, over the ResNet-50 and BERT-base trees
  # (global and layer-wise, float32 and bfloat16; candidates last was faster
  # only for BERT-base float32 global, by 1.7x).
  def count_each(cand, cand_row, test):
    """Per leaf ``i``, the entries where ``test(x, view, i, c)`` holds for
    each of its candidates ``c`` (row ``cand_row[i]`` of ``cand``)."""
    rows = []
    for x, row, i in zip(leaves, cand_row, leaf_index):
      v = x[None]
      c = _per_candidate(
          lax.dynamic_index_in_dim(cand, row, keepdims=False), v.ndim
      )
      rows.append(_count_rows(test(x, v, i, c), 2)[0])
    return jnp.stack(rows)

  def count_keys(cand):  # per leaf, the weights at least each candidate key
    return count_each(
        cand, leaf_group, lambda x, v, i, c: keys(v)[:, None] >= c
    )

  threshold, at_t, above_t = radix.digit_search(
      count_keys,
      lambda counts: counts >= k[:, None],
      sizes,
      group_of,
      num_groups,
      bits,
      itype,
  )
  # Ties (key == threshold) kept: the first ``need`` of each group, leaves in
  # order. With k = 0 the threshold is the top key and nothing is kept.
  ties = at_t - above_t
  if num_groups == len(leaves):
    need, before = k - above_t, 0
  else:
    need, before = k - jnp.sum(above_t), jnp.cumsum(ties) - ties
  keep = need[group_of] - before
  t_leaf = threshold[group_of]
  split = (keep > 0) & (keep < ties)

  def split_cuts(_):
    # Per leaf, the flat index after its keep-th tie: the largest q with fewer
    # than keep ties before it, plus one.
    def tied_before(x, v, i, c):
      t = lax.dynamic_index_in_dim(t_leaf, i, keepdims=False)
      return (keys(v) == t)[:, None] & (_flat_index(x.shape)[None, None] < c)

    def count_ties(cand):
      return count_each(cand, leaf_index, tied_before)

    wanted = jnp.where(split, keep, 1)
    last, _, _ = radix.digit_search(
        count_ties,
        lambda counts: counts < wanted[:, None],
        np.zeros(len(leaves), np.int32),
        np.arange(len(leaves)),
        len(leaves),
        max(int(sizes.max()).bit_length(), 1),
        jnp.int32,
    )
    return last + 1

  cuts = lax.cond(
      jnp.any(split),
      split_cuts,
      lambda _: jnp.zeros(len(leaves), jnp.int32),
      None,
  )
  cuts = jnp.where(
      keep >= ties, jnp.asarray(sizes, jnp.int32), jnp.where(split, cuts, 0)
  )

  return [
      _kept_before_cut(
          x,
          keys(x),
          lax.dynamic_index_in_dim(t_leaf, i, keepdims=False),
          lax.dynamic_index_in_dim(cuts, i, keepdims=False),
      )
      for x, i in zip(leaves, leaf_index)
  ]


def _topk_searched(
    leaves: list[jax.Array], k: jax.Array, per_leaf: bool
) -> list[tuple[jax.Array, jax.Array]]:
  """:func:`_topk` by :func:`_search`: few passes, skipping the leaves it
  does not need (a data-dependent loop and a branch per leaf)."""
  ftype, itype = _key_types(leaves)
  top_key = 2 ** (jnp.iinfo(itype).bits - 1) - 1  # |w| has no sign bit
  k = jnp.asarray(k, jnp.int32)
  num_groups = len(k)
  sizes, group_of, offsets, group_sizes = _leaf_layout(leaves, per_leaf)
  leaf_group = _opaque(group_of)
  leaf_index = _opaque(np.arange(len(leaves)))
  # Each leaf as ``(1, *shape)``, a free reshape. Its keys are computed inside
  # every pass (a fused bit operation) and never stored: no copy of the model.
  views = [x[None] for x in leaves]

  def keys(view):
    return _bits(view, ftype, itype)

  def counter(arrays, weights, full):
    """``count(key_cand, index_cand, read)``: per leaf, the (weighted) entries
    at or before each of its group's candidates ``(key, i)`` in the ranking: a
    larger key, or the same key and a flat index at most ``group size - 1 -
    i``. With ``full``, all weights, and only leaves with ``read`` set are
    counted (the search knows the others' counts); else samples, ranked by key
    alone, all counted."""

    def sampled(i, a, key_cand):
      # Small, with short axes: a plain int32 sum.
      before = keys(a)[:, None] >= _per_candidate(key_cand[group_of[i]], a.ndim)
      return _count_rows(before, 2, runs=False) * weights[i]

    if full:  # a leaf's last flat index in its group's ranking
      leaf_last = _opaque(group_sizes[group_of] - 1 - offsets)

    def counted(a, key_cand, index_cand, g, last):
      b = keys(a)[:, None]
      at = lax.dynamic_index_in_dim(key_cand, g, keepdims=False)
      at = _per_candidate(at, a.ndim)
      bound = last - lax.dynamic_index_in_dim(index_cand, g, keepdims=False)
      bound = _per_candidate(bound, a.ndim)
      index = _flat_index(a.shape[1:])[None, None]
      before = (b > at) | ((b == at) & (index <= bound))
      # While the candidates' keys differ, bound is the group's last index and
      # the index test always holds: this counts as fast as keys alone.
      return _count_rows(before, 2)

    def count(key_cand, index_cand, read):
      if not full:
        return jnp.concatenate(
            [sampled(i, a, key_cand) for i, a in enumerate(arrays)]
        )
      unread = np.zeros((1, key_cand.shape[1]), np.int32)
      # A large leaf is read only while entries of it lie between the search's
      # ends. The condition also keeps XLA from hoisting the leaf's flat
      # indices out of the loop (a stored int32 copy of the leaf, read on
      # every pass).
      rows = _branch_per_leaf(
          read,
          counted,
          lambda *_: unread,
          arrays,
          (key_cand, index_cand),
          (leaf_group, leaf_last),
          leaf_index,
      )
      return jnp.concatenate(rows)

    return count

  # 1. Bracket the threshold on a strided sample (about 1 weight in 64, each
  # standing for as many): searches for ranks a margin above and below k.
  # Leaves too small to sample much skip this (one compiled loop fewer).
  steps = [_sample_steps(v.shape, shard_counts(v)) for v in views]
  stride = np.asarray([int(np.prod(st)) for st in steps])
  wide = 2 ** (jnp.iinfo(itype).bits - 10)  # a binade of float32, bfloat16
  first = (
      _bracket(views, steps, stride, k, group_of, group_sizes, counter, wide)
      if (sizes // stride).sum() * 8 <= sizes.sum()
      else None
  )

  # 2. The exact cut on all weights: the key, then among equal keys the flat
  # index (random floats rarely tie there: the search then ends on a key with
  # exactly k entries at least it).
  none_kept = k == 0
  threshold, _, index_cut = _search(
      counter(views, [1] * len(views), True),
      k,
      group_sizes,
      group_of,
      jnp.where(none_kept, top_key, 0).astype(itype),
      jnp.full((num_groups,), top_key, itype),
      jnp.where(none_kept[group_of], 0, jnp.asarray(sizes, jnp.int32)),
      first=first,
      wide=wide,
      spans=None if per_leaf or len(leaves) == 1 else (offsets, sizes),
  )

  # Entries equal to the threshold t are kept up to flat index group size - 1
  # - index_cut: leaf i keeps the first cuts[i] of its own.
  ends = group_sizes[group_of] - offsets
  cuts = jnp.where(none_kept[group_of], 0, ends - index_cut[group_of])
  # Only the leaf where the cut falls compares flat indices (1.5x the time of
  # a plain comparison on BERT-base); elsewhere all or none of the entries
  # equal to t are kept: |w| > t - 1 or > t.
  split = (cuts > 0) & (cuts < sizes)

  def cut_of(threshold, index_cut, none_kept, g, end):
    t = lax.dynamic_index_in_dim(threshold, g, keepdims=False)
    none = lax.dynamic_index_in_dim(none_kept, g, keepdims=False)
    index = lax.dynamic_index_in_dim(index_cut, g, keepdims=False)
    return t, jnp.where(none, 0, end - index)

  # Each branch writes the pruned leaf beside its mask: one read of the leaf.
  def split_ties(x, *numbers):
    return _kept_before_cut(x, keys(x), *cut_of(*numbers))

  def by_key(x, *numbers):
    t, cut = cut_of(*numbers)
    mask = keys(x) > t - (cut >= x.size).astype(itype)
    return jnp.where(mask, x, jnp.zeros((), x.dtype)), mask

  return _branch_per_leaf(
      split,
      split_ties,
      by_key,
      leaves,
      (threshold, index_cut, none_kept),
      (leaf_group, _opaque(ends)),
      leaf_index,
  )


def _bracket(views, steps, stride, k, group_of, group_sizes, counter, wide):
  """Per group, keys ``(below, above)`` likely to bracket the threshold.

  Found on the strided sample of every view (``steps`` per axis, ``stride``
  weights each sampled weight stands for; ``wide`` as in :func:`_search`):
  the keys at ranks 4 standard deviations of the sample's error above and
  below ``k``. Only a guess: the search on all weights starts from it and
  recovers if it is wrong.
  """
  num_groups = len(k)
  itype = _key_types(views)[1]
  top_key = 2 ** (jnp.iinfo(itype).bits - 1) - 1
  samples = [_take_sample(v, st) for v, st in zip(views, steps)]
  group_stride = np.zeros(num_groups, int)  # the coarsest sample in a group
  np.maximum.at(group_stride, group_of, stride)
  rest = jnp.minimum(k, group_sizes - k).astype(jnp.float32)
  margin = (4 * np.sqrt(group_stride) * jnp.sqrt(rest)).astype(jnp.int32)
  margin = margin + 2 * group_stride
  sample_count = counter(samples, [int(r) for r in stride], False)

  def both_targets(key_cand, index_cand, read):
    # Two searches (groups 0..G-1 and G..2G-1) share one pass: every leaf
    # counts its group's candidates of both, (L, 2c), split back to (2L, c).
    del index_cand, read
    pairs = jnp.concatenate(jnp.split(key_cand, 2), axis=1)
    return jnp.concatenate(
        jnp.split(sample_count(pairs, None, None), 2, axis=1)
    )

  targets = jnp.concatenate(
      [jnp.minimum(k + margin, group_sizes), jnp.maximum(k - margin, 1)]
  )
  twice = np.tile(group_sizes, 2)
  sizes = np.asarray([int(np.prod(v.shape)) for v in views])
  found, found_top, _ = _search(
      both_targets,
      targets,
      np.ones_like(twice),
      np.concatenate([group_of, group_of + num_groups]),
      jnp.zeros(twice.shape, itype),
      jnp.full(twice.shape, top_key, itype),
      jnp.asarray(np.tile(sizes, 2), jnp.int32),
      wide=wide,
      within=np.tile(group_stride, 2),
  )
  below = found[:num_groups]
  above = jnp.minimum(found_top[num_groups:], top_key - 1) + 1
  return below, above


def _sample_steps(shape: tuple[int, ...], shards: tuple[int, ...]) -> list[int]:
  """Per axis of a ``(1, *shape)`` view, the step of its strided sample.

  The steps multiply to at most ``_SAMPLE_STRIDE``. Major axes come first (a
  sampled row is read whole and the rows between are skipped). A step divides
  the axis' block on every device, so sampling stays local to each shard:
  under an explicit sharding the block is known; in auto mode an axis is
  assumed split up to 8 ways.
  """
  steps = [1] * len(shape)
  left = _SAMPLE_STRIDE
  last = len(shape) - 1
  for axis in sorted(
      range(1, len(shape)), key=lambda a: (a == last, -shape[a])
  ):
    n = shape[axis]
    if shards[axis] > 1:
      block = n // shards[axis] if n % shards[axis] == 0 else 1
    else:
      block = n // 8 if n % 8 == 0 else n
    steps[axis] = math.gcd(block, left)
    left //= steps[axis]
  return steps


def _take_sample(view: jax.Array, steps: Sequence[int]) -> jax.Array:
  """Entry 0 of every run of ``steps[a]`` along each axis ``a``.

  Each axis is split where it stands, never reshaped across axes.
  """
  for axis, step in enumerate(steps):
    if step > 1:
      shape = view.shape
      view = view.reshape(
          shape[:axis] + (shape[axis] // step, step) + shape[axis + 1 :]
      )
      view = lax.index_in_dim(view, 0, axis + 1, keepdims=False)
  return view


def _interpolate(lo, top, cnt_lo, cnt_up, target, even):
  """``_CANDIDATES`` increasing candidates in ``(lo, top]`` per group.

  ``cnt_lo`` entries rank at or before ``lo`` and ``cnt_up`` before ``top +
  1``; the count crosses ``target`` in between. As if those entries were
  spread evenly, the candidates sit ``_SPREAD`` standard deviations of rank
  either side of the crossing; where ``even``, they split the interval into
  equal parts instead.
  """
  c = _CANDIDATES
  width = (top - lo).astype(jnp.float32) + 1
  inside = jnp.maximum(cnt_lo - cnt_up, 1).astype(jnp.float32)
  f = (cnt_lo - target).astype(jnp.float32) / inside
  sigma = jnp.minimum(
      _SPREAD * jnp.sqrt(f * (1 - f) * inside) + 1, inside / (2 * c + 2) + 0.5
  )
  spread = jnp.linspace(-1.0, 1.0, c, dtype=jnp.float32)
  interp = ((f * inside)[:, None] + spread * sigma[:, None]) * (width / inside)[
      :, None
  ]
  uniform = jnp.arange(1, c + 1, dtype=jnp.float32) / (c + 1) * width[:, None]
  offset = jnp.where(even[:, None], uniform, interp)
  return _at_offsets(lo, top, offset, least=1)


def _at_offsets(lo, top, offset, least):
  """Keys ``lo + offset`` per group for float ``(groups, c)`` offsets, kept
  in ``[lo + least, top]`` (``least`` is 0 or 1) and exact in ``lo``'s type:
  a float32 offset near ``top - lo`` may round past it."""
  # The largest float32 that converts to lo's type without overflow.
  below_max = float(
      np.nextafter(
          np.float32(2.0 ** (jnp.iinfo(lo.dtype).bits - 1)), np.float32(0)
      )
  )
  offset = jnp.clip(offset, float(least), below_max).astype(lo.dtype)
  offset = jnp.maximum(jnp.minimum(offset, (top - lo)[:, None]), least)
  return lo[:, None] + offset


def _spaced(lo: jax.Array, top: jax.Array, shares: jax.Array) -> jax.Array:
  """``(groups, c)`` keys at ``shares`` (in [0, 1]) of the way from ``lo``
  to ``top``."""
  width = (top - lo).astype(jnp.float32)[:, None]
  return _at_offsets(lo, top, width * shares, least=0)


def _inside_bracket(below: jax.Array, above: jax.Array) -> jax.Array:
  """The first pass's candidates: ``_INNER`` of the way in from either end."""
  shares = jnp.linspace(_INNER, 1 - _INNER, _CANDIDATES, dtype=jnp.float32)
  return _spaced(below, above, shares)


def _fall_back(key_cand, key_lo, key_top, below, above):
  """``key_cand``, except where the first pass missed the inner bracket.

  The threshold then lies between an end of the bracket (``below`` or
  ``above``) and a counted candidate, most likely: the next candidates start
  at that end and split the rest evenly. Interpolating from the search's
  far end (0 or the top key) would take several passes to come back.
  """
  c = _CANDIDATES
  low = (key_lo < below) & (below <= key_top)
  # Either way a candidate lies above key_lo: each pass makes progress.
  high = ~low & (key_lo < above) & (above < key_top)
  from_below = _spaced(below, key_top, jnp.arange(c, dtype=jnp.float32) / c)
  up_to_above = _spaced(
      key_lo, above, jnp.arange(1, c + 1, dtype=jnp.float32) / c
  )
  return jnp.where(
      low[:, None],
      from_below,
      jnp.where(high[:, None], up_to_above, key_cand),
  )


def _narrow_to_leaf(s, target, size, spans):
  """State ``s`` of one group of several leaves, narrowed to one leaf on ties.

  Once the search is among the flat indices of one key, the per-leaf counts
  at its ends say which leaf holds the target-th entry (leaves come in flat
  order). The ends move to that leaf's first and last flat index, whose
  counts are known without reading anything, so only that leaf is read
  after. ``spans`` are the leaves' flat offsets and sizes.
  """
  key_lo, key_top, i_lo, i_top, even, leaf_lo, leaf_up = s
  offsets, sizes = (jnp.asarray(a, jnp.int32) for a in spans)
  between = jnp.cumsum(leaf_lo - leaf_up)
  at = jnp.argmax(jnp.sum(leaf_up) + between >= target[0])
  on_index = key_lo == key_top
  # A position i stands for flat indices up to size - 1 - i.
  last, first = size - offsets[at] - sizes[at], size - offsets[at] - 1
  order = jnp.arange(len(sizes))
  return (
      key_lo,
      key_top,
      jnp.where(on_index, jnp.maximum(i_lo, last), i_lo),
      jnp.where(on_index, jnp.minimum(i_top, first), i_top),
      even,
      jnp.where(on_index & (order > at), leaf_up, leaf_lo),
      jnp.where(on_index & (order < at), leaf_lo, leaf_up),
  )


def _search(
    count,
    target,
    size,
    group_of,
    key_lo,
    key_top,
    leaf_lo,
    first=None,
    wide=None,
    within=0,
    spans=None,
):
  """Per group, the ``target``-th entry in the ranking (key desc, index asc).

  A position in the ranking is a pair ``(key, i)`` standing for the entries
  of that key and flat index at most ``size - 1 - i``. Leaf ``l`` belongs to
  group ``group_of[l]``; ``count(key_cand, index_cand, read)`` maps ``(groups,
  c)`` candidate pairs to ``(leaves, c)`` counts of the entries of each leaf
  at or before each candidate (non-increasing along the ranking), and may skip
  the leaves that are not ``read``. On entry, per group, no entry has a key
  above ``key_top``, and ``leaf_lo`` holds, per leaf, the count at ``(key_lo,
  0)``, which sums to at least ``target``.

  Each pass counts ``_CANDIDATES`` candidates and keeps the part where the
  count crosses ``target``: first between keys, then, once one key is left
  (ties), between flat indices of that key. It stops when exactly ``target``
  entries rank at or before ``(key, i)`` (random floats usually stop on a key),
  or when the interval is one position. ``first``, per group keys ``(below,
  above)`` guessed from a sample to bracket the target, places the first
  pass's candidates inside the bracket (:func:`_inside_bracket`), and the next
  pass's at its end if the target fell outside them (:func:`_fall_back`).
  Then candidates interpolate the count linearly between the ends
  (:func:`_interpolate`). A pass that leaves more
  than half the entries in play, or an interval of keys wider than ``wide``
  (where the count is far from linear in the key), is followed by a pass with
  evenly spaced candidates, so the interval shrinks geometrically.

  The per-leaf counts at both ends are kept: a leaf whose counts there are
  equal has no entry in between, so its count at any candidate is known and
  it is not read. Near the end, few leaves are read: those holding the last
  entries in play, or with ties, the one leaf holding the target: with
  ``spans`` (one group of several leaves: their flat offsets and sizes), the
  search among one key's flat indices narrows to it at once
  (:func:`_narrow_to_leaf`).

  With ``within``, a group also stops once at most that many entries are
  left between the ends (a bracket is enough).

  Returns ``(key, key_top, i)``: the position found (the interval's low end)
  and the interval's last key.
  """
  size = jnp.asarray(size, jnp.int32)
  num_groups = len(size)

  def totals(s):
    return (
        radix.group_sum(s[5], group_of, num_groups),
        radix.group_sum(s[6], group_of, num_groups),
    )

  state = (
      key_lo,
      key_top,
      jnp.where(key_lo == key_top, size, 0),
      jnp.where(key_lo == key_top, size, size - 1),
      jnp.zeros(size.shape, bool),
      leaf_lo,
      jnp.zeros_like(leaf_lo),
  )

  def active(s):
    key_lo, key_top, i_lo, i_top = s[:4]
    cnt_lo, cnt_up = totals(s)
    return (
        (cnt_lo != target)
        & ((key_lo < key_top) | (i_lo < i_top))
        & (cnt_lo - cnt_up > within)
    )

  def candidates(s, key_first=None):
    key_lo, key_top, i_lo, i_top, even, leaf_lo, leaf_up = s
    cnt_lo, cnt_up = totals(s)
    on_keys = key_lo < key_top
    live = active(s)
    if key_first is None:
      wider = even if wide is None else even | (key_top - key_lo > wide)
      key_first = _interpolate(key_lo, key_top, cnt_lo, cnt_up, target, wider)
      if first is not None:
        key_first = _fall_back(key_first, key_lo, key_top, *first)
    key_cand = jnp.where((live & on_keys)[:, None], key_first, key_lo[:, None])
    index_cand = _interpolate(i_lo, i_top, cnt_lo, cnt_up, target, even)
    index_cand = jnp.where(
        (live & ~on_keys)[:, None],
        index_cand,
        jnp.where(on_keys, 0, i_lo)[:, None],
    )
    read = live[group_of] & (leaf_lo != leaf_up)
    return key_cand, index_cand, read

  def body(carry):
    s, (key_cand, index_cand, read) = carry
    key_lo, key_top, i_lo, i_top, _, leaf_lo, leaf_up = s
    cnt_lo, cnt_up = totals(s)
    on_keys = (key_lo < key_top)[:, None]
    live = active(s)
    leaf_counts = jnp.where(
        read[:, None], count(key_cand, index_cand, read), leaf_lo[:, None]
    )
    counts = radix.group_sum(leaf_counts, group_of, num_groups)
    # Counts fall along the candidates: those reaching target are a prefix.
    ok = counts >= target[:, None]
    new_key_lo = jnp.max(jnp.where(ok, key_cand, key_lo[:, None]), axis=1)
    new_key_top = jnp.min(
        jnp.where(ok | ~on_keys, key_top[:, None], key_cand - 1), axis=1
    )
    new_i_lo = jnp.max(
        jnp.where(ok & ~on_keys, index_cand, i_lo[:, None]), axis=1
    )
    new_i_top = jnp.min(
        jnp.where(ok | on_keys, i_top[:, None], index_cand - 1), axis=1
    )
    # The per-leaf counts at the new ends: the last candidate reaching target
    # and the first one short of it.
    num_ok = jnp.sum(ok, axis=1)[group_of]
    c = key_cand.shape[1]

    def at(j):
      picked = jnp.clip(j, 0, c - 1)[:, None]
      return jnp.take_along_axis(leaf_counts, picked, axis=1)[:, 0]

    new_leaf_lo = jnp.where(num_ok > 0, at(num_ok - 1), leaf_lo)
    new_leaf_up = jnp.where(num_ok < c, at(num_ok), leaf_up)
    new_cnt_lo = radix.group_sum(new_leaf_lo, group_of, num_groups)
    new_cnt_up = radix.group_sum(new_leaf_up, group_of, num_groups)
    # Interpolation missed (more than half the entries still in play): the
    # next pass splits the interval evenly; not the first pass among the
    # flat indices of one key, whose count was never interpolated.
    missed = 2 * (new_cnt_lo - new_cnt_up) > cnt_lo - cnt_up
    keys_just_closed = on_keys[:, 0] & (new_key_lo == new_key_top)
    even = missed & ~keys_just_closed
    # A settled group keeps its state (its leaves may not have been counted).
    groups = tuple(
        jnp.where(live, new, old)
        for new, old in zip(
            (new_key_lo, new_key_top, new_i_lo, new_i_top, even), s[:5]
        )
    )
    leaves = tuple(
        jnp.where(live[group_of], new, old)
        for new, old in zip((new_leaf_lo, new_leaf_up), s[5:])
    )
    s = groups + leaves
    if spans is not None:
      s = _narrow_to_leaf(s, target, size, spans)
    return s, candidates(s)

  s, _ = lax.while_loop(
      lambda carry: jnp.any(active(carry[0])),
      body,
      (
          state,
          candidates(state, None if first is None else _inside_bracket(*first)),
      ),
  )
  return s[0], s[1], s[2]


def _level_counts(levels: tuple[Any, ...], size: int) -> jax.Array | int:
  counts = [base.kept_count(s, size) for s in levels]
  if len(counts) == 1:
    return counts[0]
  return jnp.stack([jnp.asarray(c, jnp.int32) for c in counts])


def check_level(level: Any, num_levels: int, owner: str) -> Any:
  """Checks ``level``, an index into the ``num_levels`` sparsities; returns it.

  A concrete level (a Python or NumPy int, a concrete integer array) out of
  range is a ValueError here, before any tracing. A traced level is checked
  for dtype and shape at trace time and for its range at run time: out of
  range raises when the compiled function runs (a ``ValueError`` carrying
  the message on CPU; see :func:`validate.check_traced_range`, part of the returned
  level), never a clamp.
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
    return validate.check_traced_range(level, 0, num_levels - 1, message)
  if not 0 <= int(level) < num_levels:
    raise ValueError(f"{message}{int(level)}")
  return level


def _level_index(key: Any, level: Any, num_levels: int, owner: str) -> Any:
  """``level`` when given (a sweep over the levels, one compilation), else sampled."""
  if level is None:
    return base.sample_index(key, num_levels, owner)
  if key is not None:
    base.as_key(key, owner)
  return jnp.asarray(check_level(level, num_levels, owner), jnp.int32)


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


SCHEDULES = ("auto", "search", "digits")


def check_schedule(schedule: Any, owner: str) -> None:
  """The ``schedule=`` option of the magnitude compressors (see
  :func:`global_magnitude`)."""
  is_str = isinstance(schedule, str)
  if not is_str or schedule not in SCHEDULES:
    raise (ValueError if is_str else TypeError)(
        f"{owner}: schedule must be one of {', '.join(map(repr, SCHEDULES))}, "
        f"got {validate.short(schedule)}"
    )


def _pick(counts: Any, index: jax.Array) -> Any:
  return counts if jnp.ndim(counts) == 0 else counts[index]


@validate.factory
def global_magnitude(
    sparsity: float | Sequence[float] | jax.Array,
    *,
    select: select_lib.Selector | None = None,
    include: select_lib.Patterns = None,
    exclude: select_lib.Patterns = None,
    schedule: str = "auto",
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
    schedule: how the exact cut is found; every schedule gives the same masks,
      bit for bit. ``"search"``: few passes over the weights, skipping leaves
      it does not need (fastest on CPUs); ``"digits"``: a fixed number of
      passes over every leaf and no per-leaf branch (fastest on GPUs, where a
      data-dependent branch waits for the host); ``"auto"`` (default): digits
      in a program compiled for a GPU, search elsewhere (decided when the
      program is lowered, see ``jax.lax.platform_dependent``). Both need only
      small all-reduces on sharded parameters.

  Returns:
    ``compress(params, key=None, *, level=None) -> (compressed_params, masks)``;
    ``level`` picks ``sparsity[level]`` instead of sampling (it may be traced, so
    one compiled function sweeps every level with exact counts). A concrete
    ``level`` out of range is a ValueError at once; a traced one is checked
    when the compiled function runs and raises there (a ``ValueError``
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
  check_schedule(schedule, owner)

  def compress(
      params: Any, key: Any = None, *, level: Any = None
  ) -> tuple[Any, Any]:
    chosen = select_lib.selected(params, rule, owner=owner)
    size = sum(int(np.prod(jnp.shape(x))) for _, x in chosen)
    k = _pick(
        _level_counts(levels, size),
        _level_index(key, level, len(levels), owner),
    )
    outputs = _topk(
        [x for _, x in chosen],
        jnp.reshape(k, (1,)),
        per_leaf=False,
        schedule=schedule,
    )
    return base.replace_leaves(
        params, {name: out for (name, _), out in zip(chosen, outputs)}
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
    schedule: str = "auto",
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
  check_schedule(schedule, owner)

  def compress(
      params: Any, key: Any = None, *, level: Any = None
  ) -> tuple[Any, Any]:
    chosen = select_lib.selected(params, rule, owner=owner)
    index = _level_index(key, level, dist.num_levels, owner)
    plan = dist.plan([(name, jnp.shape(x)) for name, x in chosen], owner)
    pruned = [c for c, dense in zip(chosen, plan.dense) if not dense]
    # One group per leaf: every leaf is bisected in the same passes.
    outputs = _topk(
        [x for _, x in pruned],
        plan.kept_at(index),
        per_leaf=True,
        schedule=schedule,
    )
    return base.replace_leaves(
        params, {name: out for (name, _), out in zip(pruned, outputs)}
    )

  _attach_checks(compress, dist.levels, owner)
  return compress

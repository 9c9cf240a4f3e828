"""Sparsity distributions: how a target sparsity is split over the prunable leaves.

A distribution turns the prunable leaves of a params tree (their paths and
shapes) into a kept count per leaf, or None for a leaf left dense; the values
are never looked at. Pass one to :func:`~cram_jax.compress.layerwise_magnitude`,
which then keeps exactly that many weights of largest ``|w|`` in each leaf::

  layerwise_magnitude(erk(0.9))                           # RigL's ERK split
  layerwise_magnitude(erk([0.5, 0.7, 0.9]))               # CrAM-Multi + ERK
  layerwise_magnitude({"conv_init": None, ".*": 0.9})     # a user map

Three kinds, in the spirit of jaxpruner's ``sparsity_distributions``:

* :func:`uniform` (what a plain number means): every prunable leaf of n weights
  keeps ``round((1 - s) * n)``.
* :func:`erk` (Erdős–Rényi-Kernel, Evci et al. 2020): a leaf's density is
  proportional to ``sum(shape) / prod(shape)``, so that the leaves together keep
  exactly ``round((1 - s) * N)`` of their N weights.
* :func:`custom`: ``{leaf-path regex: sparsity or None}``, first match wins.

A distribution may hold several levels (a list of targets); the compressor then
samples one per call or takes ``level=``. The per-leaf counts of every level are
computed in Python from the static shapes when the compressor is traced, as a
``(levels, leaves)`` table; the compiled step only indexes it.

Calling a distribution on params shows its split without pruning anything:
``erk(0.9)(params)`` is a tree of per-leaf sparsities (``1 - kept / n``, the
exact fractions that will be pruned), None where a leaf is not pruned; and
``erk(0.9).kept(params)`` the kept counts. Abstract params
(``jax.ShapeDtypeStruct`` from ``jax.eval_shape``) are enough.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cram_jax.compress import base, validate
from cram_jax.compress import select as select_lib

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Plan:
  """Kept counts per level and leaf for one list of prunable leaves.

  Attributes:
    paths: the prunable leaves' paths, in flatten order.
    sizes: their numbers of weights.
    dense: True for a leaf the distribution leaves alone (its mask is None).
    counts: ``counts[level][i]``, the kept count of leaf i at that level (an
      int, or a traced int32 for a traced sparsity); None for dense leaves.
  """

  paths: tuple[str, ...]
  sizes: tuple[int, ...]
  dense: tuple[bool, ...]
  counts: tuple[tuple[Any, ...], ...]

  def kept_at(self, index: Any) -> jax.Array:
    """The ``(non-dense leaves,)`` int32 kept counts at level ``index``."""
    rows = [
        [c for c, d in zip(row, self.dense) if not d] for row in self.counts
    ]
    concrete = all(isinstance(c, int) for row in rows for c in row)
    if concrete:
      table = jnp.asarray(np.asarray(rows, np.int32).reshape(len(rows), -1))
    else:
      table = jnp.stack(
          [jnp.stack([jnp.asarray(c, jnp.int32) for c in row]) for row in rows]
      )
    return table[0] if len(rows) == 1 else table[index]


class Distribution:
  """Base class: a per-leaf split of a target sparsity, possibly at several levels.

  Subclasses set ``levels`` (one entry per level) and implement
  :meth:`_counts`. Use :func:`uniform`, :func:`erk` or :func:`custom`.
  """

  levels: tuple[Any, ...]
  name: str

  def __repr__(self) -> str:
    return self.name

  @property
  def num_levels(self) -> int:
    return len(self.levels)

  def _counts(
      self, paths: Sequence[str], shapes: Sequence[Shape], owner: str
  ) -> tuple[list[bool], list[list[Any]]]:
    raise NotImplementedError

  def plan(
      self, leaves: Sequence[tuple[str, Shape]], owner: str | None = None
  ) -> Plan:
    """The :class:`Plan` for the prunable leaves ``[(path, shape), ...]``.

    Raises ValueError (naming ``owner``, the leaf and the value) when the
    distribution does not fit these leaves: a pattern that decides no leaf, a
    leaf no pattern matches, a target ERK cannot reach, ...
    """
    owner = owner or repr(self)
    paths = tuple(p for p, _ in leaves)
    shapes = tuple(tuple(int(d) for d in s) for _, s in leaves)
    dense, counts = self._counts(paths, shapes, owner)
    if all(dense):
      raise ValueError(
          f"{owner}: every prunable leaf is left dense by {self!r} (leaves: "
          f"{list(paths)[:8]}); nothing would be pruned"
      )
    return Plan(
        paths=paths,
        sizes=tuple(math.prod(s) for s in shapes),
        dense=tuple(dense),
        counts=tuple(tuple(row) for row in counts),
    )

  def _leaf_plan(
      self, params: Any, select: select_lib.Selector | None, level: Any
  ) -> tuple[Plan, int]:
    owner = repr(self)
    select = select_lib.DEFAULT if select is None else select
    select_lib.check_selector(select, owner)
    chosen = select_lib.selected(params, select, owner=owner)
    plan = self.plan([(p, jnp.shape(x)) for p, x in chosen], owner)
    validate.check_int(
        level, "level", owner, minimum=0, maximum=self.num_levels - 1
    )
    return plan, int(level)

  def kept(
      self,
      params: Any,
      select: select_lib.Selector | None = None,
      *,
      level: int = 0,
  ) -> Any:
    """A tree like ``params``: each pruned leaf's kept count, None elsewhere."""
    plan, level = self._leaf_plan(params, select, level)
    by_path = {
        p: None if d else c
        for p, d, c in zip(plan.paths, plan.dense, plan.counts[level])
    }
    return jax.tree_util.tree_map_with_path(
        lambda p, _: by_path.get(select_lib.path_str(p)), params
    )

  def __call__(
      self,
      params: Any,
      select: select_lib.Selector | None = None,
      *,
      level: int = 0,
  ) -> Any:
    """A tree like ``params``: each pruned leaf's sparsity ``1 - kept / n``.

    None for leaves that are not selected or that the distribution leaves
    dense; an empty leaf has sparsity 0.
    """
    plan, level = self._leaf_plan(params, select, level)
    by_path = {}
    for p, n, d, c in zip(
        plan.paths, plan.sizes, plan.dense, plan.counts[level]
    ):
      by_path[p] = None if d else (1.0 - c / n if n else 0.0)
    return jax.tree_util.tree_map_with_path(
        lambda p, _: by_path.get(select_lib.path_str(p)), params
    )


class _Uniform(Distribution):

  def __init__(self, sparsity: Any, name: str):
    self.name = name
    self.levels = base.as_levels(sparsity, name)

  def _counts(self, paths, shapes, owner):
    del paths, owner
    sizes = [math.prod(s) for s in shapes]
    return [False] * len(shapes), [
        [base.kept_count(s, n) for n in sizes] for s in self.levels
    ]


def uniform(sparsity: float | Sequence[float] | jax.Array) -> Distribution:
  """Every prunable leaf of n weights keeps ``round((1 - s) * n)``.

  The same as passing the plain number: ``layerwise_magnitude(uniform(0.9))``
  is ``layerwise_magnitude(0.9)``. A list samples one level per call; a traced
  scalar works under ``jit``. The total kept count is the sum of the per-leaf
  roundings, which may differ from ``round((1 - s) * N)`` by up to half the
  number of leaves.
  """
  name = f"uniform({validate.short(sparsity)})"
  return _Uniform(sparsity, name)


def erk_counts(
    shapes: Sequence[Shape],
    sparsity: float,
    dense: Sequence[bool] | None = None,
    *,
    owner: str = "erk",
    paths: Sequence[str] | None = None,
) -> list[int]:
  """ERK kept counts for leaves of ``shapes``; their total is exactly ``K``.

  ``K = round((1 - sparsity) * N)``, N the number of weights of all the leaves
  (those in ``dense`` included: they keep all theirs). A leaf's ideal kept count
  is ``eps * sum(shape) / prod(shape) * prod(shape) = eps * sum(shape)``; leaves
  where that exceeds their size keep every weight and eps is re-solved for the
  others until none exceeds (removing a saturated leaf only raises eps, so the
  fixed point is the one of jaxpruner's one-at-a-time loop). The arithmetic is
  exact (integers): the ideal counts ``B * sum(shape_i) / S`` are rounded by
  largest remainder, ties to the lower leaf index, so they sum to K.
  Empty leaves keep 0 and take no part.
  """
  dense = [False] * len(shapes) if dense is None else list(dense)
  names = (
      list(paths) if paths is not None else [str(i) for i in range(len(shapes))]
  )
  sizes = [math.prod(s) for s in shapes]
  for name, shape in zip(names, shapes):
    if len(shape) == 0:
      raise ValueError(
          f"{owner}: leaf '{name}' is a scalar; ERK weighs a leaf by "
          "sum(shape) / prod(shape) and needs ndim >= 1 (exclude it with "
          "select=)"
      )
  target = int(round((1.0 - float(sparsity)) * sum(sizes)))
  whole = {i for i, d in enumerate(dense) if d}
  whole_size = sum(sizes[i] for i in whole)
  if whole_size > target:
    raise ValueError(
        f"{owner}: the leaves kept dense "
        f"({[names[i] for i in sorted(whole)][:6]}) hold {whole_size} of the "
        f"{sum(sizes)} weights, more than the {target} that sparsity "
        f"{float(sparsity)!r} keeps; lower the sparsity or keep fewer leaves "
        "dense"
    )
  free = {i for i, n in enumerate(sizes) if n == 0 and i not in whole}
  while True:
    rest = [i for i in range(len(sizes)) if i not in whole and i not in free]
    budget = target - sum(sizes[i] for i in whole)
    weight = sum(sum(shapes[i]) for i in rest)
    # eps * sum(shape_i) > size_i, with eps = budget / weight, in integers.
    saturated = [i for i in rest if budget * sum(shapes[i]) > weight * sizes[i]]
    if not saturated:
      break
    whole.update(saturated)
  counts = [sizes[i] if i in whole else 0 for i in range(len(sizes))]
  if rest:
    ideal = [(budget * sum(shapes[i]), i) for i in rest]
    for value, i in ideal:
      counts[i] = value // weight
    short = budget - sum(counts[i] for i in rest)
    by_remainder = sorted(ideal, key=lambda vi: (-(vi[0] % weight), vi[1]))
    for _, i in by_remainder[:short]:
      counts[i] += 1
  return counts


class _ERK(Distribution):

  def __init__(self, sparsity: Any, dense: Any, name: str):
    self.name = name
    levels = base.as_levels(sparsity, name)
    for s in levels:
      if validate.is_traced(s):
        raise TypeError(
            f"{name}: ERK needs a concrete target sparsity (the split is "
            f"computed in Python from the shapes), got {validate.short(s)}; "
            "for a traced sparsity use layerwise_magnitude(s) (uniform)"
        )
    self.levels = tuple(float(s) for s in levels)
    self._dense_raw = dense
    self._dense = select_lib.as_patterns(dense, "dense", name)

  def _counts(self, paths, shapes, owner):
    dense = [any(p.search(path) for p in self._dense) for path in paths]
    for pattern in self._dense:
      if not any(pattern.search(path) for path in paths):
        raise ValueError(
            f"{owner}: dense pattern {pattern.pattern!r} matches no prunable "
            f"leaf (prunable leaves: {list(paths)[:8]})"
        )
    counts = [
        erk_counts(
            shapes, s, dense, owner=f"{owner} at sparsity {s!r}", paths=paths
        )
        for s in self.levels
    ]
    return dense, counts


def erk(
    sparsity: float | Sequence[float],
    *,
    dense: str | Sequence[str] | None = None,
) -> Distribution:
  """Erdős–Rényi-Kernel split (Evci et al., "Rigging the Lottery", 2020).

  A leaf's density is proportional to ``sum(shape) / prod(shape)``:
  ``(kh + kw + in + out) / (kh * kw * in * out)`` for a Flax conv kernel
  ``(kh, kw, in, out)``, ``(in + out) / (in * out)`` for a dense kernel
  ``(in, out)``, and the same formula for any other ``ndim >= 1`` (a 3-D
  ``DenseGeneral`` kernel ``(in, heads, head_dim)`` is weighed as a 3-axis
  tensor, as jaxpruner does; a scalar leaf is an error). The scale is chosen so
  that the prunable leaves together keep exactly ``round((1 - s) * N)`` of their
  N weights; a leaf that would exceed density 1 is kept whole and the others are
  re-scaled, until none exceeds. Per-leaf counts are rounded by largest
  remainder (see :func:`erk_counts`), so the total is exact. A saturated leaf
  still gets a mask (all True); only ``dense`` leaves get None.

  Args:
    sparsity: the overall target in [0, 1], or a list of targets (levels; one
      is sampled per call, or chosen by ``level=``). Must be concrete.
    dense: regex(es) on the leaf path (``re.search``) for leaves kept whole and
      left unmasked; their weights still count in N, so the others are pruned
      harder. Each pattern must match a prunable leaf.

  Raises:
    ValueError: a target outside [0, 1]; when the compressor runs, a ``dense``
      pattern matching no prunable leaf, or dense leaves holding more weights
      than the target keeps.
  """
  name = f"erk({validate.short(sparsity)}" + (
      f", dense={dense!r})" if dense is not None else ")"
  )
  return _ERK(sparsity, dense, name)


_REQUIRED = object()


class _Custom(Distribution):

  def __init__(self, mapping: Any, default: Any, name: str):
    self.name = name
    if not isinstance(mapping, Mapping) or not mapping:
      raise TypeError(
          f"{name}: the map must be a non-empty dict {{leaf-path regex: "
          f"sparsity or None}}, got {validate.short(mapping)}"
      )
    entries = []
    for key, value in mapping.items():
      if not isinstance(key, str):
        raise TypeError(
            f"{name}: map keys must be regex strings, got {validate.short(key)}"
        )
      try:
        pattern = re.compile(key)
      except re.error as e:
        raise ValueError(
            f"{name}: pattern {key!r} is not a valid regex: {e}"
        ) from None
      entries.append((pattern, self._value(value, f"{name}: pattern {key!r}")))
    self._entries = tuple(entries)
    self._default = (
        _REQUIRED
        if default is _REQUIRED
        else self._value(default, f"{name}: default")
    )
    lengths = {
        len(v)
        for v in [v for _, v in entries] + [self._default]
        if isinstance(v, tuple) and len(v) > 1
    }
    if len(lengths) > 1:
      raise ValueError(
          f"{name}: lists of levels must all have the same length, got "
          f"lengths {sorted(lengths)}"
      )
    num = lengths.pop() if lengths else 1
    self.levels = tuple(
        {
            k: None if v is None else v[i if len(v) > 1 else 0]
            for k, (_, v) in zip(mapping, entries)
        }
        for i in range(num)
    )

  @staticmethod
  def _value(value: Any, owner: str) -> tuple[Any, ...] | None:
    if value is None:
      return None
    if isinstance(value, (list, tuple)) and any(v is None for v in value):
      raise TypeError(
          f"{owner}: None cannot be one of a list of levels, got "
          f"{validate.short(value)}; None (alone) leaves a leaf dense at "
          "every level, 0.0 keeps it whole but masked"
      )
    return base.as_levels(value, owner)

  def _counts(self, paths, shapes, owner):
    decided = [0] * len(self._entries)
    values = []
    for path in paths:
      for j, (pattern, value) in enumerate(self._entries):
        if pattern.search(path):
          decided[j] += 1
          values.append(value)
          break
      else:
        if self._default is _REQUIRED:
          raise ValueError(
              f"{owner}: prunable leaf '{path}' matches no pattern of the map "
              f"{[p.pattern for p, _ in self._entries]}; add a pattern for it "
              "(e.g. '.*' last) or pass default="
          )
        values.append(self._default)
    for (pattern, _), n in zip(self._entries, decided):
      if not n:
        matched = [p for p in paths if pattern.search(p)]
        why = (
            f"its leaves {matched[:4]} are taken by earlier patterns"
            if matched
            else f"it matches no prunable leaf (prunable leaves: {list(paths)[:8]})"
        )
        raise ValueError(
            f"{owner}: pattern {pattern.pattern!r} decides no leaf: {why}"
        )
    sizes = [math.prod(s) for s in shapes]
    dense = [v is None for v in values]
    counts = [
        [
            None if v is None else base.kept_count(v[i if len(v) > 1 else 0], n)
            for v, n in zip(values, sizes)
        ]
        for i in range(self.num_levels)
    ]
    return dense, counts


def custom(
    mapping: Mapping[str, Any], *, default: Any = _REQUIRED
) -> Distribution:
  """A user map ``{leaf-path regex: sparsity, a list of levels, or None}``.

  Each prunable leaf takes the value of the first pattern (``re.search`` on its
  ``'a/b/kernel'`` path, in the map's order) that matches it: a sparsity s keeps
  ``round((1 - s) * n)`` of its n weights, None leaves it dense (mask None). A
  plain dict given to ``layerwise_magnitude`` means ``custom(dict)``.

  Args:
    mapping: e.g. ``{"conv_init": None, "head": 0.8, ".*": 0.9}``. A value may
      be a list of levels; all such lists must have the same length L, and
      scalars stand for every level.
    default: the value for prunable leaves no pattern matches (a sparsity, a
      list, or None for dense). Without it, such a leaf is a ValueError.

  Raises:
    TypeError/ValueError: at once for a bad map, regex or sparsity; when the
      compressor runs, for a pattern that decides no leaf (it matches none, or
      every leaf it matches is taken by an earlier pattern: a typo or dead
      entry) and for an unmatched leaf without ``default``.
  """
  name = f"custom({validate.short(mapping)})"
  return _Custom(mapping, default, name)


def as_distribution(sparsity: Any, owner: str) -> Distribution:
  """A Distribution as given, a dict as :func:`custom`, anything else as
  :func:`uniform` (a number, a list of levels, a traced scalar)."""
  if isinstance(sparsity, Distribution):
    return sparsity
  if isinstance(sparsity, Mapping):
    return custom(sparsity)
  dist = _Uniform.__new__(_Uniform)
  dist.name = owner
  dist.levels = base.as_levels(sparsity, owner)
  return dist

"""Which leaves of a params pytree are prunable.

A leaf is addressed by its key path written as a '/'-joined string, e.g.
``'params/Conv_0/kernel'`` for Linen params or ``'encoder/layer/0/kernel'`` for an
NNX ``State``. A :class:`Selection` is a predicate ``(path, leaf) -> bool``; every
compressor takes one, so the same rule works for Linen, NNX or plain dicts.

The default rule is docs/method.md section 3: every floating-point leaf with ``ndim >= 2``
(conv and dense kernels, the first conv and the classifier included); biases and
normalisation scales are never pruned.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Patterns = str | Sequence[str] | None


def path_str(path: tuple[Any, ...]) -> str:
  """Writes a JAX key path as ``'a/b/0/kernel'``.

  The trailing ``.value`` of a ``flax.nnx`` Variable is dropped, so that
  ``nnx.state(model)`` and its ``nnx.as_pure`` version (what ``nnx.Optimizer``
  passes to ``init`` and to ``update``) have the same, Linen-style paths.
  """
  if path and path[-1] == jax.tree_util.GetAttrKey("value"):
    path = path[:-1]
  parts = []
  for entry in path:
    if isinstance(entry, jax.tree_util.DictKey):
      parts.append(str(entry.key))
    elif isinstance(entry, jax.tree_util.GetAttrKey):
      parts.append(entry.name)
    elif isinstance(entry, jax.tree_util.SequenceKey):
      parts.append(str(entry.idx))
    elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
      parts.append(str(entry.key))
    else:
      parts.append(str(entry))
  return "/".join(parts)


def as_patterns(
    patterns: Patterns, option: str, owner: str = "Selection"
) -> tuple[re.Pattern[str], ...]:
  """Compiles ``option``'s regex string or list of them (None: no pattern).

  Raises:
    TypeError: not a string or a list of strings.
    ValueError: an empty list, or a pattern that is not a valid regex.
  """
  if patterns is None:
    return ()
  if isinstance(patterns, (str, re.Pattern)):
    patterns = (patterns,)
  elif not isinstance(patterns, (list, tuple)):
    raise TypeError(
        f"{owner}: {option} must be a regex string or a list of them, got "
        f"{patterns!r}"
    )
  if not patterns:
    raise ValueError(
        f"{owner}: {option} is an empty list; use None for "
        + {"include": "every leaf", "exclude": "no exclusion"}.get(
            option, "none"
        )
    )
  compiled = []
  for p in patterns:
    if isinstance(p, re.Pattern) and isinstance(p.pattern, str):
      compiled.append(p)
      continue
    if not isinstance(p, str):
      raise TypeError(f"{owner}: {option} patterns must be strings, got {p!r}")
    try:
      compiled.append(re.compile(p))
    except re.error as e:
      raise ValueError(
          f"{owner}: {option} pattern {p!r} is not a valid regex: {e}"
      ) from None
  return tuple(compiled)


def is_float(leaf: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(leaf), jnp.floating)


@dataclasses.dataclass(frozen=True)
class Selection:
  """A key-path rule for prunable leaves.

  A leaf is selected when it has ``ndim >= min_ndim``, its path matches one of
  ``include`` (``re.search``; all leaves when ``include`` is None) and none of
  ``exclude``. Without ``include``, non-float leaves are skipped silently; a
  non-float leaf matched by an explicit ``include`` is an error, since it cannot
  be pruned by magnitude.

  Example::

    # Keep the first conv and the classifier dense (the reference's uniform runs).
    Selection(exclude=(r"^params/conv_init/", r"/head/"))
  """

  include: Patterns = None
  exclude: Patterns = None
  min_ndim: int = 2

  def __post_init__(self):
    object.__setattr__(self, "_include", as_patterns(self.include, "include"))
    object.__setattr__(self, "_exclude", as_patterns(self.exclude, "exclude"))
    if isinstance(self.min_ndim, bool) or not isinstance(self.min_ndim, int):
      raise TypeError(
          f"Selection: min_ndim must be an int, got {self.min_ndim!r}"
      )
    if self.min_ndim < 0:
      raise ValueError(
          f"Selection: min_ndim must be a non-negative int, got {self.min_ndim!r}"
      )

  def __call__(self, path: str, leaf: Any) -> bool:
    if self._include and not any(p.search(path) for p in self._include):
      return False
    if any(p.search(path) for p in self._exclude):
      return False
    if jnp.ndim(leaf) < self.min_ndim:
      return False
    if not is_float(leaf):
      if self._include:
        raise TypeError(
            f"Selection: leaf '{path}' matches include={self.include!r} but has "
            f"dtype {jnp.result_type(leaf)}, not a floating-point type"
        )
      return False
    return True


DEFAULT = Selection()

Selector = Selection | Callable[[str, Any], bool]


def resolve(
    select: Selector | None = None,
    include: Patterns = None,
    exclude: Patterns = None,
    *,
    owner: str = "compressor",
) -> Selector:
  """Turns a compressor's ``select``/``include``/``exclude`` options into one rule."""
  if select is not None and (include is not None or exclude is not None):
    raise ValueError(
        f"{owner}: pass either select= or include=/exclude=, not both"
    )
  if select is None:
    return Selection(include=include, exclude=exclude)
  check_selector(select, owner)
  return select


def check_selector(select: Any, owner: str) -> None:
  """TypeError unless ``select`` is a Selection or ``(path, leaf) -> bool``."""
  if not callable(select):
    hint = (
        f"; for a path pattern use include={select!r} or "
        f"Selection(include={select!r})"
        if isinstance(select, str)
        else ""
    )
    raise TypeError(
        f"{owner}: select must be a Selection or a callable (path, leaf) -> "
        f"bool, got {select!r}{hint}"
    )


def _decide(select: Selector, name: str, leaf: Any, owner: str) -> bool:
  """``select(name, leaf)``, which must answer a bool known at trace time
  (it decides from static paths, shapes and dtypes, never from values)."""
  answer = select(name, leaf)
  if (
      isinstance(answer, (np.ndarray, jax.Array))
      and not isinstance(answer, jax.core.Tracer)
      and answer.shape == ()
      and answer.dtype == np.bool_
  ):
    answer = bool(answer)
  if not isinstance(answer, (bool, np.bool_)):
    raise TypeError(
        f"{owner}: select({name!r}, leaf) must return True or False, got "
        f"{answer!r}"
    )
  return bool(answer)


def selected(
    params: Any, select: Selector = DEFAULT, *, owner: str = "compressor"
):
  """Returns ``[(path, leaf), ...]`` of the selected leaves, in flatten order.

  Raises ValueError when nothing is selected: a compressor that prunes nothing is
  almost always a mistyped pattern.
  """
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  chosen = []
  for path, leaf in leaves:
    name = path_str(path)
    if _decide(select, name, leaf, owner):
      if not is_float(leaf):
        raise TypeError(
            f"{owner}: leaf '{name}' is selected but has dtype "
            f"{jnp.result_type(leaf)}, not a floating-point type"
        )
      chosen.append((name, leaf))
  if not chosen:
    names = [path_str(p) for p, _ in leaves][:8]
    raise ValueError(
        f"{owner}: the selection {select!r} matches no leaf of the params tree "
        f"(first leaves: {names})"
    )
  return chosen


def selection_tree(
    params: Any, select: Selector = DEFAULT, *, owner: str = "selection_tree"
):
  """A tree of Python bools, True where ``select`` picks the leaf."""
  check_selector(select, owner)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: _decide(select, path_str(p), x, owner), params
  )

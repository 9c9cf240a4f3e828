"""What every compressor shares: the calling convention and mask-tree plumbing.

A compressor is a callable ``compressor(params, key=None) -> (compressed, masks)``.
``masks`` has the structure of ``params``: a boolean array for every compressed
leaf (True = kept) and ``None`` for leaves the compressor leaves alone. ``key`` is
a PRNG key, needed only by compressors that sample a level per call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cram_jax.compress import select as select_lib

Params = Any
Masks = Any
Compressor = Callable[..., tuple[Params, Masks]]


def _is_none(x: Any) -> bool:
  return x is None


def map_masked(
    fn: Callable[[Any, Any], Any],
    masks: Masks,
    tree: Any,
    otherwise: Callable[[Any], Any] = lambda x: x,
) -> Any:
  """``fn(mask, leaf)`` where a mask exists, ``otherwise(leaf)`` where it is None."""
  return jax.tree.map(
      lambda m, x: otherwise(x) if m is None else fn(m, x),
      masks,
      tree,
      is_leaf=_is_none,
  )


def apply_masks(masks: Masks, tree: Any) -> Any:
  """Zeroes the entries of ``tree`` where the mask is False (dtype kept)."""
  return map_masked(
      lambda m, x: jnp.where(m, x, jnp.zeros((), x.dtype)), masks, tree
  )


def check_masks(params: Params, masks: Masks, *, owner: str) -> None:
  """Raises ValueError unless ``masks`` fits ``params`` leaf for leaf."""
  p_paths = [
      select_lib.path_str(p)
      for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
  ]
  m_flat, m_def = jax.tree_util.tree_flatten_with_path(masks, is_leaf=_is_none)
  m_paths = [select_lib.path_str(p) for p, _ in m_flat]
  if p_paths != m_paths:
    missing = sorted(set(p_paths) - set(m_paths))
    extra = sorted(set(m_paths) - set(p_paths))
    raise ValueError(
        f"{owner}: the mask tree does not match the params tree "
        f"(leaves without a mask entry: {missing[:8]}; mask entries without a "
        f"leaf: {extra[:8]}); use None for leaves that are not pruned"
    )
  for (path, m), (_, x) in zip(
      m_flat, jax.tree_util.tree_flatten_with_path(params)[0]
  ):
    if m is None:
      continue
    name = select_lib.path_str(path)
    if jnp.shape(m) != jnp.shape(x):
      raise ValueError(
          f"{owner}: mask for leaf '{name}' has shape {jnp.shape(m)}, "
          f"the leaf has shape {jnp.shape(x)}"
      )
    if jnp.result_type(m) != jnp.bool_:
      raise TypeError(
          f"{owner}: mask for leaf '{name}' has dtype {jnp.result_type(m)}, not bool"
      )


def masks_for(params: Params, leaf_masks: dict[str, jax.Array]) -> Masks:
  """Builds a full mask tree from ``{path: mask}``; other leaves get None."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: leaf_masks.get(select_lib.path_str(p)), params
  )


def compress_with(
    params: Params, leaf_masks: dict[str, jax.Array]
) -> tuple[Params, Masks]:
  """Applies ``{path: mask}`` to ``params``; returns ``(compressed, masks)``."""
  masks = masks_for(params, leaf_masks)
  return apply_masks(masks, params), masks


def check_sparsity(value: Any, owner: str) -> None:
  """ValueError for a concrete sparsity outside [0, 1]; traced values pass."""
  if isinstance(value, jax.core.Tracer):
    return
  arr = np.asarray(value, dtype=np.float64)
  if arr.ndim != 0:
    raise ValueError(
        f"{owner}: sparsity must be a scalar, got shape {arr.shape}"
    )
  if not 0.0 <= float(arr) <= 1.0:  # NaN fails too
    raise ValueError(f"{owner}: sparsity must be in [0, 1], got {float(arr)!r}")


def as_levels(sparsity: Any, owner: str) -> tuple[Any, ...]:
  """A sparsity or a sequence of them (sampled uniformly per call) -> tuple of levels."""
  if isinstance(sparsity, (list, tuple)):
    if not sparsity:
      raise ValueError(f"{owner}: the list of sparsity levels is empty")
    levels = tuple(sparsity)
  else:
    levels = (sparsity,)
  for s in levels:
    check_sparsity(s, owner)
  return levels


def sample_index(key: Any, n: int, owner: str) -> jax.Array:
  """Uniform index in [0, n); n == 1 needs no key."""
  if n == 1:
    return jnp.zeros((), jnp.int32)
  if key is None:
    raise ValueError(
        f"{owner}: samples one of {n} levels per call and needs a PRNG key "
        "(compressor(params, key))"
    )
  return jax.random.randint(as_key(key), (), 0, n, dtype=jnp.int32)


def as_key(key: Any) -> jax.Array:
  """Accepts a typed key, raw uint32 key data, or an int seed; returns a typed key."""
  if isinstance(key, int):
    return jax.random.key(key)
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  if key.dtype == jnp.uint32:
    return jax.random.wrap_key_data(key)
  raise TypeError(
      f"expected a PRNG key or an int seed, got an array of dtype {key.dtype}"
  )


def random_choice(
    compressors: Sequence[Compressor],
    probabilities: Sequence[float] | None = None,
) -> Compressor:
  """A compressor that applies one of ``compressors``, chosen at random per call.

  For CrAM+-N:M: ``random_choice([n_of_m(2, 4), n_of_m(4, 8)])`` (probability 1/2
  each). The choice is traced (``lax.switch``), so one compiled step serves all.
  Leaves that some branches skip get all-True masks in the others' place, so the
  mask tree has one structure.

  Args:
    compressors: the candidates; each ``(params, key) -> (compressed, masks)``.
    probabilities: optional weights summing to 1; uniform by default.
  """
  compressors = tuple(compressors)
  if not compressors:
    raise ValueError("random_choice: needs at least one compressor")
  for i, c in enumerate(compressors):
    if not callable(c):
      raise TypeError(f"random_choice: compressors[{i}] is not callable: {c!r}")
  if probabilities is not None:
    probabilities = np.asarray(probabilities, np.float64)
    if (
        probabilities.shape != (len(compressors),)
        or np.any(probabilities < 0)
        or not np.isclose(probabilities.sum(), 1.0)
    ):
      raise ValueError(
          f"random_choice: probabilities must be {len(compressors)} non-negative "
          f"numbers summing to 1, got {probabilities.tolist()}"
      )

  def compress(params: Params, key: Any = None) -> tuple[Params, Masks]:
    if key is None:
      raise ValueError(
          "random_choice: needs a PRNG key (compressor(params, key))"
      )
    choice_key, level_key = jax.random.split(as_key(key))
    shapes = [jax.eval_shape(c, params, level_key)[1] for c in compressors]
    has_mask = [
        jax.tree.map(lambda m: m is not None, s, is_leaf=_is_none)
        for s in shapes
    ]
    union = jax.tree.map(lambda *hs: any(hs), *has_mask)

    def branch(c):
      def run(p, k):
        out, masks = c(p, k)
        masks = jax.tree.map(
            lambda u, m, x: (jnp.ones(jnp.shape(x), bool) if m is None else m)
            if u
            else None,
            union,
            masks,
            p,
            is_leaf=_is_none,
        )
        return out, masks

      return run

    if probabilities is None:
      index = jax.random.randint(choice_key, (), 0, len(compressors))
    else:
      index = jax.random.choice(
          choice_key, len(compressors), p=jnp.asarray(probabilities)
      )
    return jax.lax.switch(
        index, [branch(c) for c in compressors], params, level_key
    )

  return compress

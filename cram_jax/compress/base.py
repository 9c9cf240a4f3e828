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
from cram_jax.compress import validate

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
  """``fn(mask, leaf)`` where a mask exists, ``otherwise(leaf)`` where it is None.

  Leaves are paired by key path (see :func:`check_masks`); the result has the
  structure of ``tree``.
  """
  leaves, treedef = jax.tree.flatten(tree)
  mask_leaves = jax.tree.leaves(masks, is_leaf=_is_none)
  return jax.tree.unflatten(
      treedef,
      [
          otherwise(x) if m is None else fn(m, x)
          for m, x in zip(mask_leaves, leaves)
      ],
  )


def _zero_unkept(mask: jax.Array, x: jax.Array) -> jax.Array:
  return jnp.where(mask, x, jnp.zeros((), x.dtype))


def apply_masks(masks: Masks, tree: Any, *, owner: str = "apply_masks") -> Any:
  """Zeroes the entries of ``tree`` where the mask is False (dtype kept).

  ``masks`` must fit ``tree`` exactly (see :func:`check_masks`): a mask that
  merely broadcasts against its leaf is an error, not a silent broadcast.
  """
  masks = check_masks(tree, masks, owner=owner)
  return map_masked(_zero_unkept, masks, tree)


def check_masks(
    params: Params, masks: Masks, *, owner: str = "check_masks"
) -> Masks:
  """Raises unless ``masks`` fits ``params`` leaf for leaf; returns the masks.

  Leaves are paired by key path. Every mask entry is None (leaf not
  compressed) or a bool array of exactly the leaf's shape. ValueError for a
  missing or extra leaf or a wrong shape, TypeError for a non-bool mask; the
  message names the first offending leaf. Static shapes only: free under jit.
  The masks are returned in the container types of ``params``.
  """
  if masks is None and jax.tree.leaves(params):
    raise ValueError(
        f"{owner}: masks is None; pass the mask tree returned by the "
        "compressor (None entries for leaves that are not pruned)"
    )
  return validate.check_same_tree(
      params,
      masks,
      owner=owner,
      other_name="the mask tree",
      allow_none=True,
      kind="bool",
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
  return (
      map_masked(_zero_unkept, masks, params),
      masks,
  )


def replace_leaves(
    params: Params, compressed: dict[str, tuple[jax.Array, jax.Array]]
) -> tuple[Params, Masks]:
  """``(compressed, masks)`` from ``{path: (compressed leaf, mask)}``.

  For compressors that write each compressed leaf together with its mask (one
  read of the weights); other leaves are kept as they are, with None masks.
  """
  new = masks_for(params, {name: x for name, (x, _) in compressed.items()})
  masks = masks_for(params, {name: m for name, (_, m) in compressed.items()})
  return map_masked(lambda x, _: x, new, params), masks


def check_sparsity(value: Any, owner: str) -> Any:
  """A sparsity must be a real scalar in [0, 1]; returns it.

  Concrete values are checked here (ValueError/TypeError). A traced value gets
  a run-time check (:func:`validate.check_traced_range`) that is part of the
  returned value: out of range or NaN raises when the compiled function runs,
  instead of being clipped.
  """
  value = validate.check_real(value, "sparsity", owner)
  if validate.is_traced(value):
    return validate.check_traced_range(
        value, 0.0, 1.0, f"{owner}: sparsity must be in [0, 1], got "
    )
  if not 0.0 <= value <= 1.0:  # NaN fails too
    raise ValueError(f"{owner}: sparsity must be in [0, 1], got {value!r}")
  return value


def kept_count(sparsity: Any, size: int) -> Any:
  """``round((1 - sparsity) * size)``: exact in float64 for Python numbers.

  The one rounding of every magnitude compressor and distribution.

  A traced sparsity is evaluated in float32, exact while ``size < 2**24``
  (beyond that the count may be off by one: the sparsity itself is a float32).
  Its range is checked at run time by :func:`check_sparsity`.
  """
  if validate.is_traced(sparsity):
    s = jnp.asarray(sparsity, jnp.float32)
    return jnp.round((1.0 - s) * size).astype(jnp.int32)
  return int(round((1.0 - float(sparsity)) * size))


def as_levels(sparsity: Any, owner: str) -> tuple[Any, ...]:
  """A sparsity or a sequence of them (sampled uniformly per call) -> tuple of levels.

  A sequence is a list, a tuple or a 1-D array (NumPy or JAX, concrete or
  traced).
  """
  if isinstance(sparsity, (list, tuple)):
    levels = tuple(sparsity)
  elif isinstance(sparsity, (np.ndarray, jax.Array)) and np.ndim(sparsity) == 1:
    levels = tuple(sparsity[i] for i in range(sparsity.shape[0]))
  elif np.ndim(sparsity) > 1 and hasattr(sparsity, "shape"):
    raise ValueError(
        f"{owner}: sparsity must be a number or a 1-D sequence of levels, got "
        f"an array of shape {np.shape(sparsity)}"
    )
  else:
    levels = (sparsity,)
  if not levels:
    raise ValueError(f"{owner}: the list of sparsity levels is empty")
  checked = []
  for s in levels:
    value = check_sparsity(s, owner)
    # A traced level carries its run-time check; a concrete one stays as given.
    checked.append(value if validate.is_traced(s) else s)
  return tuple(checked)


def sample_index(key: Any, n: int, owner: str) -> jax.Array:
  """Uniform index in [0, n); n == 1 needs no key (a given one is still checked)."""
  if key is not None:
    key = as_key(key, owner)
  if n == 1:
    return jnp.zeros((), jnp.int32)
  if key is None:
    raise ValueError(
        f"{owner}: samples one of {n} levels per call and needs a PRNG key "
        "(compressor(params, key))"
    )
  return jax.random.randint(key, (), 0, n, dtype=jnp.int32)


def as_key(key: Any, owner: str = "as_key") -> jax.Array:
  """Accepts a typed key, raw uint32 key data, or an int seed; returns a typed key."""
  return validate.as_key(key, owner)


@validate.factory
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
  owner = "random_choice"
  if callable(compressors) or not isinstance(
      compressors, (list, tuple, np.ndarray)
  ):
    raise TypeError(
        f"{owner}: compressors must be a list of compressors, got "
        f"{validate.short(compressors)}; e.g. random_choice([n_of_m(2, 4), "
        "n_of_m(4, 8)])"
    )
  compressors = tuple(compressors)
  if not compressors:
    raise ValueError(f"{owner}: needs at least one compressor")
  for i, c in enumerate(compressors):
    validate.check_compressor(c, f"{owner}: compressors[{i}]")
  if probabilities is not None:
    if not isinstance(probabilities, (list, tuple, np.ndarray, jax.Array)):
      raise TypeError(
          f"{owner}: probabilities must be a list of numbers, got "
          f"{validate.short(probabilities)}"
      )
    probabilities = np.asarray(
        [
            validate.check_real(p, f"probabilities[{i}]", owner)
            for i, p in enumerate(probabilities)
        ],
        np.float64,
    )
    if (
        probabilities.shape != (len(compressors),)
        or not np.all(probabilities >= 0)  # NaN fails too
        or not np.isclose(probabilities.sum(), 1.0)
    ):
      raise ValueError(
          f"{owner}: probabilities must be {len(compressors)} non-negative "
          f"numbers summing to 1, got {probabilities.tolist()}"
      )

  def compress(params: Params, key: Any = None) -> tuple[Params, Masks]:
    if key is None:
      raise ValueError(f"{owner}: needs a PRNG key (compressor(params, key))")
    choice_key, level_key = jax.random.split(as_key(key, owner))
    shapes = []
    for i, c in enumerate(compressors):
      out = jax.eval_shape(c, params, level_key)
      shapes.append(
          validate.check_compressor_output(
              out, params, owner=owner, name=f"compressors[{i}]"
          )[1]
      )
    has_mask = [
        jax.tree.map(lambda m: m is not None, s, is_leaf=_is_none)
        for s in shapes
    ]
    union = jax.tree.map(lambda *hs: any(hs), *has_mask)

    def branch(c):
      def run(p, k):
        out, masks = c(p, k)
        masks = check_masks(p, masks, owner=owner)
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

"""Re-estimating BatchNorm statistics after one-shot pruning ("BN tuning").

Pruning shifts every layer's activation statistics, so the running means and
variances learnt by the dense model no longer fit. The paper's recipe (docs/method.md,
section 5): reset means to 0 and variances to 1, then run 100 train-mode forward
batches of 128 drawn from 1000 random training images (with the training
augmentation), letting BatchNorm's EMA (Flax ``momentum=0.9``) re-estimate them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cram_jax.compress import select as select_lib
from cram_jax.compress import validate


def reset_batch_stats(batch_stats: Any) -> Any:
  """Means to 0, variances to 1 (leaves named ``mean`` / ``var``, as Flax names them)."""
  owner = "reset_batch_stats"
  if isinstance(batch_stats, Mapping) and "batch_stats" in batch_stats:
    raise ValueError(
        f"{owner}: got a variables dict with a 'batch_stats' collection; pass "
        "variables['batch_stats'] itself"
    )
  found = []

  def reset(path, x):
    name = select_lib.path_str(path).rsplit("/", 1)[-1]
    if name == "mean":
      found.append(name)
      return jnp.zeros_like(x)
    if name == "var":
      found.append(name)
      return jnp.ones_like(x)
    return x

  out = jax.tree_util.tree_map_with_path(reset, batch_stats)
  if not found:
    names = [
        select_lib.path_str(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(batch_stats)[0]
    ]
    raise ValueError(
        f"{owner}: no 'mean'/'var' leaves found in batch_stats (its leaves: "
        f"{names[:8]})"
    )
  return out


def recalibrate_batch_stats(
    model: nn.Module,
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    *,
    reset: bool = True,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """Re-estimates ``batch_stats`` of a Linen model; parameters are untouched.

  Each batch runs ``model.apply(variables, batch, **apply_kwargs,
  mutable=['batch_stats'])`` (one jit-compiled step); only the new running
  statistics are kept. With the model's BatchNorm ``momentum=0.9`` this is the
  paper's EMA with momentum 0.1.

  Args:
    model: a Linen module with BatchNorm layers.
    variables: ``{'params': ..., 'batch_stats': ..., ...}``.
    batches: model inputs; an array per batch, or a tuple of positional inputs.
      The paper uses 100 batches of 128 from 1000 training images, see
      :func:`calibration_batches`.
    reset: start from mean 0 / variance 1 (the recipe) instead of the old values.
    apply_kwargs: keyword arguments selecting train mode; default ``{'train': True}``.

  Returns:
    A new variables dict with re-estimated ``batch_stats``.
  """
  owner = "recalibrate_batch_stats"
  if not isinstance(model, nn.Module):
    raise TypeError(
        f"{owner}: model must be a flax.linen Module, got {validate.short(model)}"
    )
  if not isinstance(variables, Mapping):
    raise TypeError(
        f"{owner}: variables must be a mapping {{'params': ..., "
        f"'batch_stats': ...}}, got {validate.short(variables)}"
    )
  if "batch_stats" not in variables:
    raise ValueError(
        f"{owner}: variables have no 'batch_stats' collection "
        f"(collections: {sorted(variables)})"
    )
  if apply_kwargs is not None and not isinstance(apply_kwargs, Mapping):
    raise TypeError(
        f"{owner}: apply_kwargs must be a mapping of keyword arguments, got "
        f"{validate.short(apply_kwargs)}"
    )
  validate.check_bool(reset, "reset", owner)
  if isinstance(batches, (np.ndarray, jax.Array)) or not isinstance(
      batches, Iterable
  ):
    shape = getattr(batches, "shape", None)
    raise TypeError(
        f"{owner}: batches must be an iterable of batches, got "
        + (
            f"a single array of shape {shape}; wrap it, [images], or draw "
            "batches with calibration_batches(images)"
            if shape is not None
            else validate.short(batches)
        )
    )
  kwargs = dict(apply_kwargs if apply_kwargs is not None else {"train": True})
  frozen = {k: v for k, v in variables.items() if k != "batch_stats"}
  stats = variables["batch_stats"]
  if reset:
    stats = reset_batch_stats(stats)

  step, expected = _recalibration_step(model, _hashable(kwargs, owner))
  count = 0
  for batch in batches:
    if isinstance(batch, Mapping):
      raise TypeError(
          f"{owner}: batches must be model inputs (an array or a "
          "tuple of positional inputs), got a mapping with keys "
          f"{sorted(batch)}; map it first, e.g. (b['image'] for b in batches)"
      )
    inputs = tuple(batch) if isinstance(batch, tuple) else (batch,)
    if count == 0:
      # Static shapes only: the model's own batch_stats, traced, not run.
      stats = validate.check_same_tree(
          jax.eval_shape(expected, frozen, inputs),
          stats,
          owner=owner,
          reference_name="model's batch_stats",
          other_name="variables['batch_stats']",
      )
    stats = step(frozen, stats, inputs)
    count += 1
  if count == 0:
    raise ValueError(f"{owner}: batches is empty")
  return {**frozen, "batch_stats": stats}


def _hashable(
    kwargs: dict[str, Any], owner: str
) -> tuple[tuple[str, Any], ...]:
  items = tuple(sorted(kwargs.items()))
  try:
    hash(items)
  except TypeError:
    raise TypeError(
        f"{owner}: apply_kwargs values must be hashable (they select the "
        f"compiled step), got {kwargs!r}"
    ) from None
  return items


@functools.lru_cache(maxsize=32)
def _recalibration_step(model: nn.Module, kwargs: tuple[tuple[str, Any], ...]):
  """One compiled train-mode forward per (model, kwargs): a sweep over many pruned
  copies of a model compiles it once. Also returns the function whose
  ``eval_shape`` gives the model's own ``batch_stats`` (created fresh)."""

  @jax.jit
  def step(frozen, stats, inputs):
    _, updated = model.apply(
        {**frozen, "batch_stats": stats},
        *inputs,
        mutable=["batch_stats"],
        **dict(kwargs),
    )
    return updated["batch_stats"]

  def expected(frozen, inputs):
    _, created = model.apply(
        frozen, *inputs, mutable=["batch_stats"], **dict(kwargs)
    )
    return created.get("batch_stats", {})

  return step, expected


def calibration_batches(
    images: np.ndarray,
    *,
    num_images: int = 1000,
    num_batches: int = 100,
    batch_size: int = 128,
    seed: int = 0,
    augment: (
        Callable[[np.ndarray, np.random.Generator], np.ndarray] | None
    ) = None,
) -> Iterator[np.ndarray]:
  """Batches for BN tuning: ``num_batches`` batches drawn from a random subset.

  Picks ``num_images`` training images once, then cycles through them in shuffled passes
  (with the training ``augment(batch, rng)`` applied, if given), as the paper does.
  """
  owner = "calibration_batches"
  for name, value in (
      ("num_images", num_images),
      ("num_batches", num_batches),
      ("batch_size", batch_size),
  ):
    validate.check_int(value, name, owner, minimum=1)
  seed = validate.check_int(seed, "seed", owner, minimum=0)
  if augment is not None and not callable(augment):
    raise TypeError(
        f"{owner}: augment must be a callable (batch, rng) -> batch, got "
        f"{validate.short(augment)}"
    )
  if not hasattr(images, "shape"):
    images = np.asarray(images)
  if len(images.shape) == 0 or images.shape[0] == 0:
    raise ValueError(
        f"{owner}: images must hold at least one image along axis 0, got "
        f"shape {tuple(images.shape)}"
    )
  # Validated above, at call time; the batches themselves are drawn lazily.
  return _draw_batches(
      images, num_images, num_batches, batch_size, seed, augment
  )


def _draw_batches(images, num_images, num_batches, batch_size, seed, augment):
  rng = np.random.default_rng(seed)
  subset = rng.choice(
      len(images), size=min(num_images, len(images)), replace=False
  )
  order = np.empty(0, np.int64)
  for _ in range(num_batches):
    while (
        len(order) < batch_size
    ):  # cycle through the subset in fresh shuffles, like epochs
      order = np.concatenate([order, rng.permutation(subset)])
    batch, order = images[order[:batch_size]], order[batch_size:]
    yield augment(batch, rng) if augment is not None else batch

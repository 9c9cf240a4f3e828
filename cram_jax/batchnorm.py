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
from flax import nnx
from flax.nnx import bridge

from cram_jax.compress import select as select_lib
from cram_jax.compress import validate


def reset_batch_stats(batch_stats: Any) -> Any:
  """Means to 0, variances to 1 (leaves named ``mean`` / ``var``, as Flax names them).

  Args:
    batch_stats: Linen ``variables['batch_stats']``, or an NNX
      ``nnx.state(model, nnx.BatchStat)`` (pure or not), or an ``nnx.Module``.

  Returns:
    The reset tree, of the same structure; for an ``nnx.Module``, the same
    module with its ``BatchStat`` variables reset in place.
  """
  owner = "reset_batch_stats"
  if isinstance(batch_stats, nnx.Module):
    module = batch_stats
    nnx.update(module, reset_batch_stats(nnx.state(module, nnx.BatchStat)))
    return module
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
    model: nn.Module | nnx.Module,
    variables: Mapping[str, Any] | Iterable[Any] | None = None,
    batches: Iterable[Any] | None = None,
    *,
    reset: bool = True,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> Any:
  """Re-estimates the BatchNorm statistics of a Linen or NNX model.

  Parameters are untouched. Linen: each batch runs ``model.apply(variables,
  batch, **apply_kwargs, mutable=['batch_stats'])`` (one jit-compiled step);
  only the new running statistics are kept. NNX: ``recalibrate_batch_stats(
  model, batches)`` runs ``model(batch, **apply_kwargs)`` with every BatchNorm
  in train mode (``use_running_average=False``), one jit-compiled step per
  batch, and writes the new statistics (and RNG counts) into ``model`` in
  place. With BatchNorm ``momentum=0.9`` this is the paper's EMA with momentum
  0.1.

  Args:
    model: a Linen module with BatchNorm layers, or an ``nnx.Module`` with
      ``nnx.BatchStat`` variables (native, or a zoo model from ``as_nnx``).
    variables: Linen only: ``{'params': ..., 'batch_stats': ..., ...}``. For
      an NNX model, which holds its variables, the second positional argument
      is ``batches``.
    batches: model inputs; an array per batch, or a tuple of positional inputs.
      The paper uses 100 batches of 128 from 1000 training images, see
      :func:`calibration_batches`.
    reset: start from mean 0 / variance 1 (the recipe) instead of the old values.
    apply_kwargs: keyword arguments of each call. Default ``{'train': True}``
      for a Linen model and for an ``nnx.bridge.ToNNX`` model (``as_nnx``),
      ``{}`` for a native NNX model (train mode is set on its BatchNorm layers).

  Returns:
    Linen: a new variables dict with re-estimated ``batch_stats``. NNX:
    ``model`` itself, updated in place (returned for convenience).
  """
  owner = "recalibrate_batch_stats"
  if isinstance(model, nnx.Module):
    if variables is not None and batches is not None:
      raise TypeError(
          f"{owner}: an NNX model holds its own variables; call "
          "recalibrate_batch_stats(model, batches)"
      )
    return _recalibrate_nnx(
        model,
        batches if batches is not None else variables,
        reset=reset,
        apply_kwargs=apply_kwargs,
    )
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
  _check_options(apply_kwargs, reset, batches, owner)
  kwargs = dict(apply_kwargs if apply_kwargs is not None else {"train": True})
  frozen = {k: v for k, v in variables.items() if k != "batch_stats"}
  stats = variables["batch_stats"]
  if reset:
    stats = reset_batch_stats(stats)

  step, expected = _recalibration_step(model, _hashable(kwargs, owner))
  count = 0
  for batch in batches:
    inputs = _inputs(batch, owner)
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


def _check_options(
    apply_kwargs: Any, reset: Any, batches: Any, owner: str
) -> None:
  """The options both the Linen and the NNX path take, checked alike."""
  if apply_kwargs is not None and not isinstance(apply_kwargs, Mapping):
    raise TypeError(
        f"{owner}: apply_kwargs must be a mapping of keyword arguments, got "
        f"{validate.short(apply_kwargs)}"
    )
  validate.check_bool(reset, "reset", owner)
  _check_batches(batches, owner)


def _check_batches(batches: Any, owner: str) -> None:
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


def _inputs(batch: Any, owner: str) -> tuple[Any, ...]:
  if isinstance(batch, Mapping):
    raise TypeError(
        f"{owner}: batches must be model inputs (an array or a "
        "tuple of positional inputs), got a mapping with keys "
        f"{sorted(batch)}; map it first, e.g. (b['image'] for b in batches)"
    )
  return tuple(batch) if isinstance(batch, tuple) else (batch,)


def _recalibrate_nnx(
    model: nnx.Module,
    batches: Any,
    *,
    reset: bool,
    apply_kwargs: Mapping[str, Any] | None,
) -> nnx.Module:
  """The NNX path of :func:`recalibrate_batch_stats`: in place, returns model."""
  owner = "recalibrate_batch_stats"
  if isinstance(batches, Mapping):
    raise TypeError(
        f"{owner}: an NNX model holds its own variables; call "
        "recalibrate_batch_stats(model, batches), got a mapping with keys "
        f"{sorted(batches)} as batches"
    )
  if batches is None:
    raise TypeError(
        f"{owner}: batches is missing; call recalibrate_batch_stats(model, "
        "batches)"
    )
  _check_options(apply_kwargs, reset, batches, owner)
  if not jax.tree.leaves(nnx.state(model, nnx.BatchStat)):
    raise ValueError(
        f"{owner}: the NNX model {type(model).__name__} has no nnx.BatchStat "
        "variables (no BatchNorm layer, or a bridged model not yet initialised)"
    )
  if isinstance(model, bridge.ToNNX):
    # Linen inside: train mode is a call argument, as in the Linen path.
    view = model
    default_kwargs = {"train": True}
  else:
    # Shares the variables of `model`, with every BatchNorm in train mode.
    view = nnx.view(model, use_running_average=False, raise_if_not_found=False)
    default_kwargs = {}
  kwargs = _hashable(
      dict(apply_kwargs if apply_kwargs is not None else default_kwargs), owner
  )
  graphdef, params, stats, other = nnx.split(
      view, nnx.Param, nnx.BatchStat, ...
  )
  params, stats, other = nnx.as_pure((params, stats, other))
  if reset:
    stats = reset_batch_stats(stats)
  count = 0
  for batch in batches:
    stats, other = _nnx_recalibration_step(
        graphdef, kwargs, params, stats, other, _inputs(batch, owner)
    )
    count += 1
  if count == 0:
    raise ValueError(f"{owner}: batches is empty")
  nnx.update(model, stats, other)
  return model


@functools.partial(jax.jit, static_argnums=(0, 1))
def _nnx_recalibration_step(graphdef, kwargs, params, stats, other, inputs):
  copy = nnx.merge(graphdef, params, stats, other)
  copy(*inputs, **dict(kwargs))
  _, _, stats, other = nnx.split(copy, nnx.Param, nnx.BatchStat, ...)
  return nnx.as_pure(stats), nnx.as_pure(other)


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

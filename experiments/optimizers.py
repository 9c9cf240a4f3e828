"""Optimisers by name, with the paper's learning-rate schedule.

| name | what |
|---|---|
| `sgd` | SGD, momentum 0.9, coupled weight decay (the reference base optimiser) |
| `adamw` | AdamW, decoupled weight decay (not on biases and LayerNorm) |
| `sam` | `optax.contrib.sam` around the base, SAM's normalised ascent step |
| `cram` | CrAM at one global sparsity (`config.sparsity`) |
| `cram+` | CrAM+ (adds the clean gradient) at `config.sparsity` |
| `cram+-multi` | CrAM+ with a sparsity sampled per step from `config.sparsities` |
| `cram+-nm` | CrAM+ with 2:4 or 4:8 (`config.nm_patterns`), probability 1/2 each |

The base of the CrAM and SAM variants is `config.base_optimizer` (`sgd` or `adamw`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

import cram_jax
from cram_jax import compress

NAMES = ("sgd", "adamw", "sam", "cram", "cram+", "cram+-multi", "cram+-nm")


def learning_rate_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
  """Linear warm-up, then cosine decay to 0; stepped per epoch when
  `config.schedule_per_epoch` (the reference), else per step."""
  base_lr = config.learning_rate
  total = config.num_epochs * steps_per_epoch
  warmup = config.warmup_epochs * steps_per_epoch
  per_epoch = bool(config.get("schedule_per_epoch", True))

  def schedule(step):
    position = jnp.asarray(step, jnp.float32)
    if per_epoch:  # constant within an epoch, value of its first step
      position = jnp.floor(position / steps_per_epoch) * steps_per_epoch
    # Warm-up reaches base_lr at the end of the warm-up (epoch e gets (e+1)/warmup).
    warm = base_lr * jnp.minimum(
        1.0, (position + (steps_per_epoch if per_epoch else 1)) / max(warmup, 1)
    )
    progress = jnp.clip((position - warmup) / max(total - warmup, 1), 0.0, 1.0)
    cosine = 0.5 * base_lr * (1.0 + jnp.cos(math.pi * progress))
    return jnp.where(position < warmup, warm, cosine)

  return schedule


def _decay_mask(params: Any) -> Any:
  """AdamW weight decay on kernels and embeddings only (ndim >= 2), as BERT does."""
  return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def base_optimizer(
    config: ml_collections.ConfigDict, name: str, schedule: optax.Schedule
) -> optax.GradientTransformation:
  if name == "sgd":
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(schedule, momentum=config.get("momentum", 0.9)),
    )
  if name == "adamw":
    return optax.adamw(
        schedule,
        b1=config.get("b1", 0.9),
        b2=config.get("b2", 0.999),
        eps=config.get("eps", 1e-8),
        weight_decay=config.weight_decay,
        mask=_decay_mask,
    )
  raise ValueError(
      f"base_optimizer: {name!r} is not a base optimiser; use 'sgd' or 'adamw'"
  )


def compressor_for(
    config: ml_collections.ConfigDict,
    name: str,
    select: compress.Selection | None = None,
):
  """The compressor CrAM uses during training, for optimiser `name`."""
  select = select or compress.Selection()
  if name in ("cram", "cram+"):
    return compress.global_magnitude(config.sparsity, select=select)
  if name == "cram+-multi":
    return compress.global_magnitude(list(config.sparsities), select=select)
  if name == "cram+-nm":
    # A layer whose input axis does not divide by M (the RGB stem) stays dense.
    return compress.random_choice(
        [
            compress.n_of_m(n, m, on_indivisible="skip", select=select)
            for n, m in config.nm_patterns
        ]
    )
  raise ValueError(f"compressor_for: {name!r} is not a CrAM optimiser")


def make_optimizer(
    config: ml_collections.ConfigDict,
    steps_per_epoch: int,
    *,
    select: compress.Selection | None = None,
    batch_axis_name: str | None = None,
) -> optax.GradientTransformation:
  """Builds `config.optimizer` (see the module table).

  Args:
    config: the run's config (`optimizer`, `learning_rate`, `weight_decay`, `rho`,
      `sparsity`/`sparsities`/`nm_patterns`, `num_epochs`, `warmup_epochs`, ...).
    steps_per_epoch: for the schedule.
    select: which leaves CrAM compresses (the model's default selection).
    batch_axis_name: the pmap axis, so SAM and CrAM average their second gradient.
  """
  name = config.optimizer
  if name not in NAMES:
    raise ValueError(f"config.optimizer={name!r} is not one of {NAMES}")
  schedule = learning_rate_schedule(config, steps_per_epoch)
  if name in ("sgd", "adamw"):  # ignores grad_fn: one train step for all
    return optax.with_extra_args_support(base_optimizer(config, name, schedule))
  base = base_optimizer(config, config.get("base_optimizer", "sgd"), schedule)
  if name == "sam":
    ascent = optax.chain(optax.contrib.normalize(), optax.sgd(config.rho))
    return optax.contrib.sam(
        base,
        ascent,
        sync_period=2,
        opaque_mode=True,
        batch_axis_name=batch_axis_name,
    )
  return cram_jax.cram(
      base,
      compressor_for(config, name, select),
      rho=config.rho,
      plus=name != "cram",
      key=config.seed,
      batch_axis_name=batch_axis_name,
      local_perturbation=bool(config.get("local_perturbation", False)),
  )


def uses_second_gradient(name: str) -> bool:
  """SAM and the CrAM variants need `grad_fn` in `update`."""
  return name not in ("sgd", "adamw")

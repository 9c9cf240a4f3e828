"""The optimiser a config's fields describe, with the paper's learning-rate schedule.

`config.optimizer.base` ('sgd' | 'adamw') is the optimiser that takes the step;
`config.optimizer.wrapper` wraps it: 'none', 'sam' (`optax.contrib.sam`, opaque
mode, SAM's normalised ascent of `config.sam.rho`), 'cram' (`cram_jax.cram`
with `config.cram.*`), 'gmp' (`cram_jax.gmp`, gradual magnitude pruning with
`config.gmp.*`) or 'acdc' (`cram_jax.acdc` with `config.acdc.*`); the last two
take their epochs in `config` and turn them into steps here. Every result takes
the same call,
`tx.update(grads, state, params, grad_fn=grad_fn)` with `grad_fn(params, i)`
(the base optimisers ignore `grad_fn`), so one train step serves all.
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

BASES = ("sgd", "adamw")
WRAPPERS = ("none", "sam", "cram", "gmp", "acdc")
COMPRESSORS = ("global", "layerwise", "nm", "quantize")
# How GMP and AC/DC pick the weights to prune.
PRUNING_COMPRESSORS = ("global", "layerwise", "erk")


def learning_rate_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
  """Linear warm-up, then cosine decay to 0; stepped per epoch when
  `config.schedule_per_epoch` (the reference), else per step."""
  base_lr = config.optimizer.learning_rate
  total = config.num_epochs * steps_per_epoch
  warmup = config.warmup_epochs * steps_per_epoch
  per_epoch = config.schedule_per_epoch

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
    config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
  """`config.optimizer.base` with its hyperparameters."""
  opt = config.optimizer
  if opt.base == "sgd":
    return optax.chain(
        optax.add_decayed_weights(opt.weight_decay),
        optax.sgd(schedule, momentum=opt.momentum),
    )
  if opt.base == "adamw":
    return optax.adamw(
        schedule,
        b1=opt.b1,
        b2=opt.b2,
        eps=opt.eps,
        weight_decay=opt.weight_decay,
        mask=_decay_mask,
    )
  raise ValueError(
      f"base_optimizer: config.optimizer.base={opt.base!r} is not one of "
      f"{BASES}"
  )


def _levels(values) -> Any:
  """One level as a number (no sampling), several as a list (one per step)."""
  values = list(values)
  return values[0] if len(values) == 1 else values


def _one_per_step(compressors):
  """One compressor as is, several drawn uniformly per step."""
  if len(compressors) == 1:
    return compressors[0]
  return compress.random_choice(compressors)


def compressor_for(
    config: ml_collections.ConfigDict,
    select: compress.Selection | None = None,
):
  """The compressor CrAM uses during training: `config.cram.compressor`."""
  select = select or compress.Selection()
  kind = config.cram.compressor
  if kind == "global":
    return compress.global_magnitude(
        _levels(config.cram.sparsities), select=select
    )
  if kind == "layerwise":
    return compress.layerwise_magnitude(
        _levels(config.cram.sparsities), select=select
    )
  if kind == "nm":
    # A layer whose input axis does not divide by M (the RGB stem) stays dense.
    return _one_per_step(
        [
            compress.n_of_m(n, m, on_indivisible="skip", select=select)
            for n, m in config.cram.nm_patterns
        ]
    )
  if kind == "quantize":
    return _one_per_step(
        [compress.quantize(bits, select=select) for bits in config.cram.bits]
    )
  raise ValueError(
      f"compressor_for: config.cram.compressor={kind!r} is not one of "
      f"{COMPRESSORS}"
  )


def pruning_family(kind: str, select: compress.Selection | None = None):
  """The compressor family (sparsities -> compressor) of `gmp.compressor` or
  `acdc.compressor`: one global threshold, the same sparsity in every layer,
  or RigL's ERK split."""
  select = select or compress.Selection()
  if kind == "global":
    return lambda s: compress.global_magnitude(s, select=select)
  if kind == "layerwise":
    return lambda s: compress.layerwise_magnitude(s, select=select)
  if kind == "erk":
    return lambda s: compress.layerwise_magnitude(
        compress.erk(s), select=select
    )
  raise ValueError(
      f"pruning_family: compressor={kind!r} is not one of "
      f"{PRUNING_COMPRESSORS}"
  )


def _epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
  return int(round(epochs * steps_per_epoch))


def gmp_steps(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> dict[str, int]:
  """`config.gmp`'s epochs as the steps of `cram_jax.gmp` (frequency >= 1).

  Raises:
    ValueError: naming the fields, when begin and end round to the same step.
  """
  g = config.gmp
  steps = {
      "begin_step": _epochs_to_steps(g.begin_epoch, steps_per_epoch),
      "end_step": _epochs_to_steps(g.end_epoch, steps_per_epoch),
      "frequency": max(
          1, _epochs_to_steps(g.frequency_epochs, steps_per_epoch)
      ),
  }
  if steps["end_step"] <= steps["begin_step"]:
    raise ValueError(
        f"make_optimizer: config.gmp.begin_epoch={g.begin_epoch!r} and "
        f"end_epoch={g.end_epoch!r} are both step {steps['begin_step']} at "
        f"{steps_per_epoch} steps per epoch; move them apart"
    )
  return steps


def acdc_steps(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> dict[str, int]:
  """`config.acdc`'s epochs as the steps of `cram_jax.acdc`; the final
  compressed phase is the last `acdc.final_epochs` of the run."""
  a = config.acdc
  total = config.num_train_steps or config.num_epochs * steps_per_epoch
  warmup = _epochs_to_steps(a.warmup_epochs, steps_per_epoch)
  final_start = max(
      total - _epochs_to_steps(a.final_epochs, steps_per_epoch), warmup
  )
  return {
      "dense_warmup": warmup,
      "phase_length": max(1, _epochs_to_steps(a.phase_epochs, steps_per_epoch)),
      "final_phase_start": final_start,
  }


def make_optimizer(
    config: ml_collections.ConfigDict,
    steps_per_epoch: int,
    *,
    select: compress.Selection | None = None,
    batch_axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Builds the optimiser of `config.optimizer` and its wrapper's fields.

  Args:
    config: the run's config (see experiments/configs/common.py).
    steps_per_epoch: for the schedule.
    select: which leaves CrAM, GMP and AC/DC compress (the model's default
      selection).
    batch_axis_name: the pmap axis, so SAM and CrAM average their second
      gradient (the caller averages the clean one).
  """
  wrapper = config.optimizer.wrapper
  if wrapper not in WRAPPERS:
    raise ValueError(
        f"make_optimizer: config.optimizer.wrapper={wrapper!r} is not one of "
        f"{WRAPPERS}"
    )
  base = base_optimizer(config, learning_rate_schedule(config, steps_per_epoch))
  if wrapper == "none":  # ignores grad_fn: one train step for all
    return optax.with_extra_args_support(base)
  if wrapper == "sam":
    ascent = optax.chain(optax.contrib.normalize(), optax.sgd(config.sam.rho))
    return optax.contrib.sam(
        base,
        ascent,
        sync_period=2,
        opaque_mode=True,
        batch_axis_name=batch_axis_name,
    )
  if wrapper == "gmp":
    return cram_jax.gmp(
        base,
        pruning_family(config.gmp.compressor, select),
        final_sparsity=config.gmp.final_sparsity,
        initial_sparsity=config.gmp.initial_sparsity,
        power=config.gmp.power,
        **gmp_steps(config, steps_per_epoch),
    )
  if wrapper == "acdc":
    return cram_jax.acdc(
        base,
        pruning_family(config.acdc.compressor, select),
        sparsity=config.acdc.sparsity,
        reset_momentum=config.acdc.reset_momentum,
        **acdc_steps(config, steps_per_epoch),
    )
  return cram_jax.cram(
      base,
      compressor_for(config, select),
      rho=config.cram.rho,
      plus=config.cram.plus,
      key=config.seed,
      batch_axis_name=batch_axis_name,
      local_perturbation=config.cram.local_perturbation,
  )

"""AC/DC, alternating compressed/decompressed training, as an optax transformation.

Peste et al., `AC/DC: Alternating Compressed/DeCompressed Training of Deep
Neural Networks <https://arxiv.org/abs/2106.12379>`_, NeurIPS 2021. Training
runs dense for a warm-up, then alternates compressed and dense phases of equal
length, and ends with a compressed phase that lasts until the end of training.
At the start of every compressed phase the masks are recomputed from the
magnitudes of the current (dense) weights; during the phase pruned weights are
exactly zero; in the next dense phase they restart from zero and train freely.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cram_jax.compress import base, validate
from cram_jax.gmp import (
    CompressorFamily,
    build_compressor,
    check_step,
    check_target,
    check_update_args,
    find_state,
    hold_pruned,
    initial_masks,
    magnitude_masks,
    mask_state,
)


class ACDCState(NamedTuple):
  """State of :func:`acdc`.

  Attributes:
    count: number of updates taken (int32), the step ``t`` of the phase plan.
    masks: masks of the current or most recent compressed phase (params'
      structure, None for leaves not pruned); all True before the first.
      Applied only during compressed phases. See :func:`cram_jax.gmp_masks`.
    inner_state: state of the wrapped optimizer.
    dense_params: with ``keep_dense=True``, the params at the end of the most
      recent dense phase (the dense model; the warm-up's end before any
      other), else None.
  """

  count: jax.Array
  masks: Any
  inner_state: optax.OptState
  dense_params: Any


def acdc_compressed(
    step: Any, *, dense_warmup: int, phase_length: int, final_phase_start: int
) -> Any:
  """Whether step ``step`` (int or int array) is in a compressed phase.

  Dense for ``step < dense_warmup``; then phase ``k = (step - dense_warmup) //
  phase_length`` is compressed for even k, dense for odd k; from
  ``final_phase_start`` on, compressed (the final phase).
  """
  alternating = (step >= dense_warmup) & (
      ((step - dense_warmup) // phase_length) % 2 == 0
  )
  return alternating | (step >= final_phase_start)


def acdc(
    optimizer: optax.GradientTransformation,
    compressor: CompressorFamily,
    *,
    sparsity: float,
    dense_warmup: int,
    phase_length: int,
    final_phase_start: int,
    reset_momentum: bool = False,
    keep_dense: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """AC/DC around any optax optimizer.

  Steps ``t`` (the state's count, from 0) follow :func:`acdc_compressed`: dense
  warm-up ``[0, dense_warmup)``, then compressed and dense phases of
  ``phase_length`` steps each, starting with a compressed one, and from
  ``final_phase_start`` on one compressed phase to the end of training (if
  ``final_phase_start`` falls inside a compressed phase, that phase simply
  goes on with its masks). The paper's defaults, in epochs of its 100-epoch
  ImageNet runs: warm-up 10, phases 5, final compressed phase the last 15.

  At the first step of a compressed phase, before the optimizer step, the
  masks become the compressor's masks at ``sparsity`` for the current weights
  (all of them: weights pruned in an earlier phase compete again) and the
  optimizer state is zeroed on the pruned entries. During a compressed phase
  gradients of pruned weights are zeroed and their updates are ``-params``
  (exact zeros, as in :func:`cram_jax.gmp`). In a dense phase nothing is
  masked: pruned weights restart from exactly zero.

  Args:
    optimizer: the base optimizer.
    compressor: a compressor family, as for :func:`cram_jax.gmp` (e.g.
      ``cram_jax.global_magnitude``, the paper's choice); called once with
      ``[sparsity]``.
    sparsity: the target sparsity of compressed phases, in [0, 1).
    dense_warmup: steps of dense training first, >= 0.
    phase_length: steps per compressed or dense phase, >= 1.
    final_phase_start: the step the final compressed phase starts at, >=
      ``dense_warmup``; the last ``total - final_phase_start`` steps of a run
      of ``total`` steps are compressed, so the model ends sparse.
    reset_momentum: zero the whole optimizer state shaped like the params
      (momentum, Adam moments) at every phase change, both ways.
    keep_dense: keep a copy of the params as they are at the end of every
      dense phase (the dense model) in ``state.dense_params``: one extra copy
      of the params. Read it with :func:`acdc_dense_params`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with an :class:`ACDCState`.

  Raises:
    TypeError, ValueError: here, for a bad option (naming it and its value).
  """
  owner = "acdc"
  validate.check_optimizer(optimizer, owner)
  target = check_target(sparsity, "sparsity", owner)
  warmup = check_step(dense_warmup, "dense_warmup", owner)
  length = check_step(phase_length, "phase_length", owner, minimum=1)
  final = check_step(final_phase_start, "final_phase_start", owner)
  if final < warmup:
    raise ValueError(
        f"{owner}: final_phase_start must be >= dense_warmup, got "
        f"final_phase_start={final}, dense_warmup={warmup}"
    )
  reset = validate.check_bool(reset_momentum, "reset_momentum", owner)
  keep = validate.check_bool(keep_dense, "keep_dense", owner)
  compress = build_compressor(compressor, [target], owner)
  inner = optax.with_extra_args_support(optimizer)

  def compressed_at(t):
    return acdc_compressed(
        t, dense_warmup=warmup, phase_length=length, final_phase_start=final
    )

  def init_fn(params: optax.Params) -> ACDCState:
    validate.check_floating_tree(params, owner=owner)
    return ACDCState(
        count=jnp.zeros((), jnp.int32),
        masks=initial_masks(compress, params, owner),
        inner_state=inner.init(params),
        dense_params=jax.tree.map(jnp.copy, params) if keep else None,
    )

  def update_fn(
      updates: optax.Updates,
      state: ACDCState,
      params: optax.Params | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, ACDCState]:
    updates = check_update_args(owner, state, ACDCState, params, updates)
    t = state.count
    compressed = compressed_at(t)
    # t = 0 has no previous step; a compressed step 0 starts a phase.
    previous = jnp.where(t > 0, compressed_at(t - 1), False)
    starts = compressed & ~previous

    def start_phase(operand):
      _, inner_state, dense = operand
      masks = magnitude_masks(
          compress, params, jnp.zeros((), jnp.int32), owner=owner
      )
      if keep:
        dense = params
      return masks, mask_state(inner_state, params, masks), dense

    masks, inner_state, dense = jax.lax.cond(
        starts,
        start_phase,
        lambda operand: operand,
        (state.masks, state.inner_state, state.dense_params),
    )
    if reset:
      # At a phase change, either way, momentum starts again from zero.
      inner_state = jax.lax.cond(
          compressed != previous,
          lambda s: mask_state(
              s, params, jax.tree.map(lambda _: jnp.zeros((), bool), params)
          ),
          lambda s: s,
          inner_state,
      )
    # Dense phases apply no mask: all-True masks there.
    active = jax.tree.map(
        lambda m: None if m is None else m | ~compressed,
        masks,
        is_leaf=lambda x: x is None,
    )
    new_updates, inner_state = inner.update(
        base.apply_masks(active, updates, owner=owner),
        inner_state,
        params,
        **extra_args,
    )
    return hold_pruned(new_updates, params, active), ACDCState(
        count=optax.safe_increment(t),
        masks=masks,
        inner_state=inner_state,
        dense_params=dense,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def acdc_dense_params(opt_state: Any) -> Any:
  """The dense model an :func:`acdc` state keeps (``keep_dense=True``).

  The params at the end of the most recent dense phase (before they were
  masked for the next compressed phase). Raises ValueError if the state was
  built without ``keep_dense``.
  """
  state = find_state(opt_state, (ACDCState,), "acdc_dense_params")
  if state.dense_params is None:
    raise ValueError(
        "acdc_dense_params: this state keeps no dense copy; build the "
        "optimizer with acdc(..., keep_dense=True)"
    )
  return state.dense_params

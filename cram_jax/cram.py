"""CrAM, the Compression-Aware Minimizer, as an optax transformation.

One step (Peste et al., ICLR 2023; ``docs/method.md`` section 2), given the clean
gradient ``g`` at ``x`` and a ``grad_fn`` on the same minibatch:

1. ``x_t = x + rho * g`` (``rho * g / (||g|| + 1e-12)`` with ``normalize=True``);
2. ``c, M = compressor(x_t)``: mask from the magnitudes of the perturbed point,
   recomputed every step (one compression level sampled per step);
3. ``g2 = grad_fn(c, 0)``, masked to ``M * g2`` when ``sparse_grad``;
4. ``G = g2 + g`` (CrAM+, a sum) or ``G = g2``;
5. the wrapped optimizer's update for ``G`` at the original ``x``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import tree as optax_tree

from cram_jax.compress import base, validate

ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]


class CrAMState(NamedTuple):
  """State of :func:`cram`.

  Attributes:
    count: number of updates taken (int32), the argument of a ``rho`` schedule.
    key: raw uint32 PRNG key data, split every step to sample the compression
      level (kept raw so checkpoints and ``optax.tree`` utilities see plain arrays).
    inner_state: state of the wrapped optimizer.
  """

  count: jax.Array
  key: jax.Array
  inner_state: optax.OptState


def _pmean(tree: Any, axis_name: str | None) -> Any:
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def _check_grad_fn_arity(grad_fn: Callable[..., Any], params: Any) -> None:
  """Raises a TypeError if ``grad_fn`` cannot be called as ``(params, 0)``.

  Callables without an inspectable signature are let through (a wrong one then
  fails where it is called).
  """
  try:
    signature = inspect.signature(grad_fn)
  except (TypeError, ValueError):
    return
  try:
    signature.bind(params, 0)
  except TypeError:
    name = getattr(grad_fn, "__name__", type(grad_fn).__name__)
    raise TypeError(
        f"cram: grad_fn is called as grad_fn(params, i) like "
        f"optax.contrib.sam(opaque_mode=True) (i = 0, the one ascent step), "
        f"but {name}{signature} cannot take two arguments; write "
        "`lambda p, _: ...` or `def grad_fn(params, i): ...`"
    ) from None


def cram(
    optimizer: optax.GradientTransformation,
    compressor: base.Compressor,
    *,
    rho: ScalarOrSchedule,
    plus: bool = True,
    sparse_grad: bool = True,
    normalize: bool = False,
    key: int | jax.Array = 0,
    batch_axis_name: str | None = None,
    local_perturbation: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Compression-Aware Minimization around any optax optimizer.

  The update follows the contract of ``optax.contrib.sam(...,
  opaque_mode=True)``, so a train step written for SAM runs CrAM unchanged:
  ``update(grads, state, params, *, grad_fn, **extra_args)`` takes the clean
  gradient ``grads`` at ``params`` and ``grad_fn(params, i) -> grads``, the
  gradient of the loss on the same minibatch (CrAM makes one ascent step and
  calls it once, with ``i = 0``, as SAM with ``sync_period=2`` does). It returns
  the wrapped optimizer's updates for the CrAM gradient ``G`` (applied at
  ``params``: the perturbation is undone).

  Under ``pmap``/``shard_map`` the caller averages ``grads`` over the replicas
  before calling ``update`` (as for SAM), and ``batch_axis_name`` makes CrAM
  average ``grad_fn``'s result; every replica then perturbs with the global
  gradient, computes the same mask and the same ``G``.

  Args:
    optimizer: the base optimizer; the reference uses
      ``optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=0.9))``
      (weight decay enters ``G`` at ``x``, never the perturbation).
    compressor: ``compress(params, key) -> (compressed, masks)``, e.g.
      ``global_magnitude([0.5, 0.7, 0.9])``; ``global_magnitude(0.0)`` is the identity.
    rho: perturbation size, a finite float >= 0 or a schedule of the step
      count; a schedule value below 0 or NaN makes that step's update NaN.
    plus: CrAM+: add the clean gradient, ``G = g2 + g`` (a sum, not an average).
    sparse_grad: mask the compressed-point gradient with the compressor's masks
      (the exact derivative of ``w -> M * w``); False is straight-through.
    normalize: SAM's rule ``rho * g / ||g||`` instead of CrAM's ``rho * g``.
    key: int seed or PRNG key for sampling compression levels.
    batch_axis_name: under ``pmap``/``shard_map``, the data-parallel axis:
      ``grad_fn``'s result is ``pmean``-ed over it (``grads`` is taken as
      already averaged by the caller, as in optax's SAM). Not needed under
      plain ``jit``.
    local_perturbation: "m-sharpness", with ``batch_axis_name``: the caller
      passes each replica's LOCAL (not averaged) clean gradient; each replica
      perturbs with its own, so masks differ between replicas; CrAM averages
      each replica's masked second gradient and (for the CrAM+ sum) the clean
      gradient, so ``G`` (hence the params) stays the same on every replica.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; unknown extra arguments are
    passed on to the wrapped optimizer.

  Raises:
    TypeError, ValueError: at once for a bad option (an optimizer factory
      passed uncalled, a compressor factory passed uncalled, a ``rho`` that is
      not a finite non-negative number or a callable, ...). In ``update``, at
      trace time under ``jit`` (static shapes only, nothing per step): a
      ``TypeError`` when ``grad_fn`` cannot be called as ``grad_fn(params, i)``
      (a one-argument function); a ``ValueError`` when ``grads``, ``grad_fn``'s output, the compressed params or the masks do
      not match ``params`` leaf for leaf (the error names the first leaf and
      both shapes), or when ``params`` has a non-float leaf.

  References:
    Peste et al., `CrAM: A Compression-Aware Minimizer
    <https://arxiv.org/abs/2207.14200>`_, ICLR 2023.

  Example::

    tx = cram(optax.sgd(0.1, momentum=0.9), global_magnitude([0.5, 0.7, 0.9]), rho=0.05)
    grad_fn = lambda p, _: jax.grad(loss)(p, batch)
    grads = jax.grad(loss)(params, batch)  # pmean it over replicas under pmap
    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    params = optax.apply_updates(params, updates)
  """
  owner = "cram"
  validate.check_optimizer(optimizer, owner)
  validate.check_compressor(compressor, owner)
  if not callable(rho):
    rho = validate.check_real(rho, "rho", owner)
    if not validate.is_traced(rho) and not 0.0 <= rho < float("inf"):
      raise ValueError(
          f"{owner}: rho must be a finite non-negative number or a schedule, "
          f"got {rho!r}"
      )
  for name, flag in (
      ("plus", plus),
      ("sparse_grad", sparse_grad),
      ("normalize", normalize),
      ("local_perturbation", local_perturbation),
  ):
    validate.check_bool(flag, name, owner)
  if batch_axis_name is not None and not (
      isinstance(batch_axis_name, str)
      or (
          isinstance(batch_axis_name, tuple)
          and all(isinstance(a, str) for a in batch_axis_name)
      )
  ):
    raise TypeError(
        f"{owner}: batch_axis_name must be an axis name (str) or a tuple of "
        f"them, got {batch_axis_name!r}"
    )
  if local_perturbation and batch_axis_name is None:
    raise ValueError(
        "cram: local_perturbation=True needs batch_axis_name (the replica axis)"
    )
  inner = optax.with_extra_args_support(optimizer)
  seed_key = jax.random.key_data(base.as_key(key, owner))

  def init_fn(params: optax.Params) -> CrAMState:
    return CrAMState(
        count=jnp.zeros((), jnp.int32),
        key=jnp.asarray(seed_key),
        inner_state=inner.init(params),
    )

  def update_fn(
      updates: optax.Updates,
      state: CrAMState,
      params: optax.Params | None = None,
      *,
      grad_fn: Callable[[optax.Params, int], optax.Updates] | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, CrAMState]:
    if params is None:
      raise ValueError(
          "cram: update needs params (the point the gradient was taken at)"
      )
    if grad_fn is None:
      raise ValueError(
          "cram: update needs grad_fn=, the loss gradient on the same minibatch: "
          "tx.update(grads, state, params, grad_fn=grad_fn)"
      )
    if not isinstance(state, CrAMState):
      raise TypeError(
          "cram: state must be the CrAMState returned by tx.init(params), got "
          f"{validate.short(state)}"
      )
    if not callable(grad_fn):
      raise TypeError(
          f"cram: grad_fn must be callable (params, i) -> grads, got "
          f"{validate.short(grad_fn)}"
      )
    _check_grad_fn_arity(grad_fn, params)
    # Static shape/dtype checks: trace time only under jit.
    validate.check_floating_tree(params, owner=owner)
    updates = validate.check_same_tree(
        params, updates, owner=owner, other_name="grads (updates)"
    )
    # The caller averaged `updates` over replicas, except with m-sharpness,
    # where it is local: the perturbation uses it as is, the CrAM+ sum its mean.
    direction = updates
    clean = _pmean(updates, batch_axis_name) if local_perturbation else updates
    if normalize:
      norm = optax_tree.norm(direction)
      direction = jax.tree.map(
          lambda g: g / (norm + 1e-12).astype(g.dtype), direction
      )
    step_rho = rho(state.count) if callable(rho) else rho
    if callable(rho):
      step_rho = validate.check_real(
          step_rho, "rho (the schedule's value)", owner
      )
    if validate.is_traced(step_rho):
      # A traced negative value cannot raise without a host sync per step:
      # it turns the update into NaN instead (one scalar select, no sync).
      step_rho = jnp.where(step_rho >= 0, step_rho, jnp.nan)
    elif not 0.0 <= step_rho < float("inf"):
      raise ValueError(
          f"{owner}: rho (the schedule's value) must be a finite "
          f"non-negative number, got {step_rho!r}"
      )
    perturbed = jax.tree.map(
        lambda x, g: (x + step_rho * g).astype(x.dtype), params, direction
    )

    key, level_key = jax.random.split(jax.random.wrap_key_data(state.key))
    compressed, masks = validate.check_compressor_output(
        compressor(perturbed, level_key), perturbed, owner=owner
    )
    compressed_grads = validate.check_same_tree(
        params,
        grad_fn(compressed, 0),
        owner=owner,
        other_name="grad_fn(compressed params)",
    )
    # Masked before the mean: with m-sharpness each replica has its own mask,
    # and G must still be the same on every replica.
    if sparse_grad:
      compressed_grads = base.apply_masks(masks, compressed_grads, owner=owner)
    compressed_grads = _pmean(compressed_grads, batch_axis_name)
    cram_grads = (
        jax.tree.map(jnp.add, compressed_grads, clean)
        if plus
        else compressed_grads
    )

    new_updates, inner_state = inner.update(
        cram_grads, state.inner_state, params, **extra_args
    )
    return new_updates, CrAMState(
        count=optax.safe_increment(state.count),
        key=jax.random.key_data(key),
        inner_state=inner_state,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

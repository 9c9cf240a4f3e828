"""Gradual magnitude pruning (GMP) as an optax transformation.

``gmp(optimizer, compressor_family, final_sparsity=..., begin_step=...,
end_step=..., frequency=...)`` wraps any optax optimizer. At the update steps
(``begin_step``, ``begin_step + frequency``, ..., and ``end_step``) it recomputes
the masks by magnitude at the scheduled sparsity; between them it holds the
pruned weights at exactly zero. Zhu & Gupta's cubic schedule is the default::

  s(t) = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3,   t0 <= t <= t1

The update steps are static, so the compressor is built once over the static
list of their sparsities and the level is picked by a traced index: one
compilation, exact kept counts at every update.

The helpers shared with :mod:`cram_jax.acdc` (building the compressor from its
family, zeroing optimizer state, holding pruned weights) live here too.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cram_jax.compress import base, validate

CompressorFamily = Callable[[Sequence[float]], base.Compressor]
Schedule = Callable[[int], float]


class GMPState(NamedTuple):
  """State of :func:`gmp`.

  Attributes:
    count: number of updates taken (int32); the schedule's step ``t``.
    masks: the current masks, in the params' structure: a bool array (True =
      kept) for every pruned leaf, None for leaves the compressor leaves alone.
      All True before ``begin_step``. Read them with :func:`gmp_masks`.
    inner_state: state of the wrapped optimizer.
  """

  count: jax.Array
  masks: Any
  inner_state: optax.OptState


# ------------------------------------------------------------ shared helpers


def _is_none(x: Any) -> bool:
  return x is None


def build_compressor(
    family: Any, levels: Sequence[float], owner: str
) -> base.Compressor:
  """``family(list(levels))``, checked to be a compressor that takes ``level=``.

  Raises TypeError for a family that is not callable, for a compressor passed
  instead of its family, or for a family whose result cannot pick a level.
  """
  if not callable(family):
    raise TypeError(
        f"{owner}: compressor must be a compressor family, a callable "
        "sparsities -> compressor such as cram_jax.global_magnitude or "
        "`lambda s: cram_jax.layerwise_magnitude(cram_jax.compress.erk(s))`, "
        f"got {validate.short(family)}"
    )
  if hasattr(family, "check_call") or hasattr(family, "levels"):
    raise TypeError(
        f"{owner}: compressor must be the compressor family (e.g. "
        "cram_jax.global_magnitude, not global_magnitude(0.9)): the "
        f"sparsities come from the schedule; got the compressor "
        f"{validate.short(family)}"
    )
  compressor = family(list(levels))
  if not callable(compressor):
    raise TypeError(
        f"{owner}: compressor(sparsities) must return a compressor, got "
        f"{validate.short(compressor)}"
    )
  try:
    takes_level = "level" in inspect.signature(compressor).parameters
  except (TypeError, ValueError):
    takes_level = False
  if not takes_level:
    raise TypeError(
        f"{owner}: compressor(sparsities) must return a magnitude compressor "
        "that takes level= (global_magnitude, layerwise_magnitude), got "
        f"{validate.short(compressor)}"
    )
  got = getattr(compressor, "levels", None)
  if got is not None and len(got) != len(levels):
    raise ValueError(
        f"{owner}: compressor({list(levels)}) has {len(got)} levels, not "
        f"{len(levels)}; the family must take the list of sparsities as its "
        "levels"
    )
  return compressor


def check_update_args(
    owner: str, state: Any, state_type: type, params: Any, updates: Any
) -> Any:
  """The checks of a masking wrapper's ``update``; returns ``updates`` checked."""
  if params is None:
    raise ValueError(
        f"{owner}: update needs params, to prune them and hold pruned "
        "weights at zero"
    )
  if not isinstance(state, state_type):
    raise TypeError(
        f"{owner}: state must be the {state_type.__name__} returned by "
        f"tx.init(params), got {validate.short(state)}"
    )
  validate.check_floating_tree(params, owner=owner)
  return validate.check_same_tree(
      params, updates, owner=owner, other_name="grads (updates)"
  )


def initial_masks(compressor: base.Compressor, params: Any, owner: str) -> Any:
  """All-True masks on the leaves ``compressor`` prunes, None elsewhere."""
  _, masks = validate.check_compressor_output(
      jax.eval_shape(lambda p: compressor(p, level=0), params),
      params,
      owner=owner,
  )
  return jax.tree.map(
      lambda m: None if m is None else jnp.ones(m.shape, jnp.bool_),
      masks,
      is_leaf=_is_none,
  )


def magnitude_masks(
    compressor: base.Compressor,
    params: Any,
    level: jax.Array,
    *,
    keep_within: Any = None,
    owner: str,
) -> Any:
  """The compressor's masks at ``level`` for ``params``.

  With ``keep_within`` (the previous masks), entries outside it score 0 and
  kept entries that are exactly zero score the smallest normal float, so a
  pruned weight can only be chosen once every kept one is: with a kept count
  no larger than before, the new mask is a subset of the old one.
  """
  scores = params
  if keep_within is not None:

    def score(m, p):
      tiny = jnp.asarray(jnp.finfo(p.dtype).tiny, p.dtype)
      return jnp.where(m, jnp.where(p == 0, tiny, p), jnp.zeros((), p.dtype))

    scores = base.map_masked(score, keep_within, params)
  _, masks = validate.check_compressor_output(
      compressor(scores, level=level), params, owner=owner
  )
  return masks


def _structure_and_shapes(tree: Any) -> tuple[Any, list[Any]]:
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, [jnp.shape(x) for x in leaves]


def mask_state(inner_state: Any, params: Any, masks: Any) -> Any:
  """Zeroes masked-out entries in every state subtree shaped like ``params``.

  Momentum, Adam's moments and the like share the params' tree structure and
  leaf shapes; other leaves (step counts, schedules' states) are left alone.
  """
  target = _structure_and_shapes(params)

  def matches(node: Any) -> bool:
    if node is None:
      return False
    try:
      return _structure_and_shapes(node) == target
    except (TypeError, ValueError):
      return False

  def zero(node: Any) -> Any:
    if not matches(node):
      return node
    return base.map_masked(
        lambda m, x: jnp.where(m, x, jnp.zeros((), x.dtype)), masks, node
    )

  return jax.tree.map(zero, inner_state, is_leaf=matches)


def hold_pruned(updates: Any, params: Any, masks: Any) -> Any:
  """Updates that leave pruned weights exactly zero: ``-params`` where masked."""
  return jax.tree.map(
      lambda m, u, p: u if m is None else jnp.where(m, u, -p).astype(u.dtype),
      masks,
      updates,
      params,
      is_leaf=_is_none,
  )


def check_step(value: Any, name: str, owner: str, minimum: int = 0) -> int:
  return validate.check_int(value, name, owner, minimum=minimum)


def check_target(value: Any, name: str, owner: str) -> float:
  """A sparsity in [0, 1) (1 would prune every weight)."""
  value = validate.check_real(value, name, owner)
  if validate.is_traced(value) or not 0.0 <= value < 1.0:
    raise ValueError(
        f"{owner}: {name} must be a number in [0, 1), got {value!r}"
    )
  return value


def find_state(opt_state: Any, kinds: tuple[type, ...], owner: str) -> Any:
  """The first state of one of ``kinds`` inside ``opt_state`` (a chain, ...)."""
  found = [
      s
      for s in jax.tree.leaves(
          opt_state, is_leaf=lambda x: isinstance(x, kinds)
      )
      if isinstance(s, kinds)
  ]
  if not found:
    names = " or ".join(k.__name__ for k in kinds)
    raise ValueError(
        f"{owner}: opt_state holds no {names}; pass the state of an "
        f"optimizer built with cram_jax.gmp or cram_jax.acdc, got "
        f"{validate.short(opt_state)}"
    )
  return found[0]


# ------------------------------------------------------------ GMP


def gmp_schedule(
    *,
    initial_sparsity: float,
    final_sparsity: float,
    begin_step: int,
    end_step: int,
    power: float = 3.0,
) -> Schedule:
  """``s(t) = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** power``.

  0 before ``begin_step`` (dense), ``s_f`` after ``end_step``. ``power=3`` is
  Zhu & Gupta's cubic schedule; a larger power prunes more in the first
  updates (the steps concentrated early), ``power=1`` is linear. Computed in
  float64 from Python numbers, so it can serve as a test oracle's input.
  """
  return _cubic(
      initial_sparsity,
      final_sparsity,
      begin_step,
      end_step,
      power,
      owner="gmp_schedule",
  )


def _cubic(
    initial_sparsity: Any,
    final_sparsity: Any,
    begin_step: Any,
    end_step: Any,
    power: Any,
    *,
    owner: str,
) -> Schedule:
  """:func:`gmp_schedule`, its errors named after ``owner``."""
  s_i = check_target(initial_sparsity, "initial_sparsity", owner)
  s_f = check_target(final_sparsity, "final_sparsity", owner)
  t0 = check_step(begin_step, "begin_step", owner)
  t1 = check_step(end_step, "end_step", owner)
  p = validate.check_real(power, "power", owner)
  if not (math.isfinite(p) and p > 0):
    raise ValueError(f"{owner}: power must be a finite number > 0, got {p!r}")
  if t1 <= t0:
    raise ValueError(
        f"{owner}: end_step must be > begin_step, got begin_step={t0}, "
        f"end_step={t1}"
    )
  if s_i > s_f:
    raise ValueError(
        f"{owner}: initial_sparsity must be <= final_sparsity (pruned weights "
        f"never come back), got {s_i!r} > {s_f!r}"
    )

  def schedule(step: int) -> float:
    if step < t0:
      return 0.0
    if step >= t1:
      return s_f
    return s_f + (s_i - s_f) * (1.0 - (step - t0) / (t1 - t0)) ** p

  return schedule


def gmp_update_steps(
    begin_step: int, end_step: int, frequency: int
) -> list[int]:
  """The steps at which :func:`gmp` recomputes masks.

  ``begin_step + k * frequency`` for every k >= 0 below ``end_step``, then
  ``end_step`` itself (always an update step, so the final sparsity is reached
  there even when ``frequency`` does not divide ``end_step - begin_step``).
  """
  return list(range(begin_step, end_step, frequency)) + [end_step]


def gmp(
    optimizer: optax.GradientTransformation,
    compressor: CompressorFamily,
    *,
    final_sparsity: float | None = None,
    begin_step: int,
    end_step: int,
    frequency: int,
    initial_sparsity: float = 0.0,
    power: float = 3.0,
    schedule: Schedule | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Gradual magnitude pruning around any optax optimizer.

  Step ``t`` (the state's count, from 0) is an update step when it is one of
  :func:`gmp_update_steps` ``(begin_step, end_step, frequency)``. At an update
  step, before the optimizer step, the masks become the compressor's masks at
  sparsity ``s(t)`` for the current weights (pruned weights rank below every
  kept one, so a mask only loses entries), and the wrapped optimizer's state
  is zeroed on the newly pruned entries (every state subtree shaped like the
  params: momentum, Adam's moments). At every step, gradients of pruned
  weights are zeroed before the optimizer sees them and the returned update
  of a pruned weight is ``-params``: after ``optax.apply_updates`` it is
  exactly 0. Before ``begin_step`` training is dense; after ``end_step`` the
  masks are fixed (fine-tuning at the final sparsity).

  The update takes the same call as :func:`cram_jax.cram`
  (``tx.update(grads, state, params, grad_fn=...)``); extra arguments such as
  ``grad_fn`` are passed on to the wrapped optimizer, which may ignore them.

  Args:
    optimizer: the base optimizer, e.g. ``optax.sgd(0.1, momentum=0.9)``.
    compressor: a compressor FAMILY: a callable taking the list of sparsities
      of the update steps and returning a magnitude compressor with those
      levels, e.g. ``cram_jax.global_magnitude`` or
      ``lambda s: cram_jax.layerwise_magnitude(cram_jax.compress.erk(s))``.
      Called once, here.
    final_sparsity: ``s_f`` in [0, 1), reached at ``end_step``.
    begin_step: ``t0 >= 0``, the first update step.
    end_step: ``t1 > t0``, the last update step.
    frequency: steps between updates, >= 1.
    initial_sparsity: ``s_i`` in [0, s_f], the sparsity of the first update (a
      jump at ``t0`` when > 0).
    power: the schedule's exponent (3: cubic; larger: pruning concentrated in
      the early updates). See :func:`gmp_schedule`.
    schedule: instead of the cubic one, any ``step -> sparsity`` callable; it
      is evaluated here, at the update steps only, in Python. Its values must
      lie in [0, 1) and never decrease. Then ``initial_sparsity`` and
      ``power`` must be left at their defaults, and ``final_sparsity``, if
      given, must equal ``schedule(end_step)``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`GMPState` (masks: :func:`gmp_masks`). ``tx.update_steps`` and
    ``tx.sparsities`` are the static update steps and their sparsities.

  Raises:
    TypeError, ValueError: here, for a bad option (naming it and its value).
    ValueError: in ``update``, for grads that do not match params.

  Example::

    tx = cram_jax.gmp(optax.sgd(0.1, momentum=0.9), cram_jax.global_magnitude,
                      final_sparsity=0.9, begin_step=1000, end_step=20000,
                      frequency=500)
  """
  owner = "gmp"
  validate.check_optimizer(optimizer, owner)
  t0 = check_step(begin_step, "begin_step", owner)
  t1 = check_step(end_step, "end_step", owner)
  if t1 <= t0:
    raise ValueError(
        f"{owner}: begin_step must be < end_step, got begin_step={t0}, "
        f"end_step={t1}"
    )
  freq = check_step(frequency, "frequency", owner, minimum=1)
  steps = gmp_update_steps(t0, t1, freq)
  if schedule is None:
    if final_sparsity is None:
      raise TypeError(f"{owner}: final_sparsity= is required (or schedule=)")
    sparsity_at = _cubic(
        initial_sparsity, final_sparsity, t0, t1, power, owner=owner
    )
  else:
    if not callable(schedule):
      raise TypeError(
          f"{owner}: schedule must be a callable step -> sparsity, got "
          f"{validate.short(schedule)}"
      )
    if initial_sparsity != 0.0 or power != 3.0:
      raise ValueError(
          f"{owner}: initial_sparsity and power shape the default cubic "
          "schedule; with schedule= put them into the schedule, got "
          f"initial_sparsity={initial_sparsity!r}, power={power!r}"
      )
    sparsity_at = schedule
  sparsities = []
  for t in steps:
    s = check_target(sparsity_at(t), f"schedule({t}) (the sparsity)", owner)
    if sparsities and s < sparsities[-1]:
      raise ValueError(
          f"{owner}: the schedule must never decrease (pruned weights do not "
          f"come back), got schedule({t})={s!r} after {sparsities[-1]!r}"
      )
    sparsities.append(s)
  if schedule is not None and final_sparsity is not None:
    s_f = check_target(final_sparsity, "final_sparsity", owner)
    if s_f != sparsities[-1]:
      raise ValueError(
          f"{owner}: final_sparsity={s_f!r} but schedule({t1})="
          f"{sparsities[-1]!r}; give one or make them agree"
      )
  # One compressor level per distinct sparsity; each update step indexes one.
  levels = sorted(set(sparsities))
  level_of = np.asarray([levels.index(s) for s in sparsities], np.int32)
  compress = build_compressor(compressor, levels, owner)
  steps_array = np.asarray(steps, np.int32)
  inner = optax.with_extra_args_support(optimizer)

  def init_fn(params: optax.Params) -> GMPState:
    validate.check_floating_tree(params, owner=owner)
    return GMPState(
        count=jnp.zeros((), jnp.int32),
        masks=initial_masks(compress, params, owner),
        inner_state=inner.init(params),
    )

  def update_fn(
      updates: optax.Updates,
      state: GMPState,
      params: optax.Params | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, GMPState]:
    updates = check_update_args(owner, state, GMPState, params, updates)
    t = state.count
    index = jnp.searchsorted(jnp.asarray(steps_array), t)
    index = jnp.minimum(index, len(steps) - 1)
    is_update = jnp.asarray(steps_array)[index] == t

    def prune(operand):
      masks, inner_state = operand
      new = magnitude_masks(
          compress,
          params,
          jnp.asarray(level_of)[index],
          keep_within=masks,
          owner=owner,
      )
      return new, mask_state(inner_state, params, new)

    masks, inner_state = jax.lax.cond(
        is_update,
        prune,
        lambda operand: operand,
        (state.masks, state.inner_state),
    )
    new_updates, inner_state = inner.update(
        base.apply_masks(masks, updates, owner=owner),
        inner_state,
        params,
        **extra_args,
    )
    return hold_pruned(new_updates, params, masks), GMPState(
        count=optax.safe_increment(t),
        masks=masks,
        inner_state=inner_state,
    )

  tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)
  # A NamedTuple cannot take attributes: expose the plan through a subclass.
  return _Planned(tx.init, tx.update, tuple(steps), tuple(sparsities))


class _Planned(optax.GradientTransformationExtraArgs):
  """A GradientTransformationExtraArgs that also tells its static plan."""

  def __new__(cls, init, update, update_steps, sparsities):
    self = super().__new__(cls, init, update)
    self._plan = (update_steps, sparsities)
    return self

  @property
  def update_steps(self) -> tuple[int, ...]:
    return self._plan[0]

  @property
  def sparsities(self) -> tuple[float, ...]:
    return self._plan[1]


def gmp_masks(opt_state: Any) -> Any:
  """The current masks of a :func:`gmp` or :func:`~cram_jax.acdc` state.

  ``opt_state`` may be the wrapper's own state or any state that holds it
  (e.g. inside ``optax.chain``). Returns the mask tree (params' structure;
  bool arrays, True = kept; None for leaves that are not pruned). For AC/DC,
  the masks of the current or most recent compressed phase (all True before
  the first).
  """
  # pylint: disable-next=import-outside-toplevel
  from cram_jax.acdc import ACDCState  # acdc imports this module

  return find_state(opt_state, (GMPState, ACDCState), "gmp_masks").masks

"""One-shot pruning, sparsity reports, and fine-tuning with fixed masks."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cram_jax.compress import base, validate
from cram_jax.compress import select as select_lib


def prune(
    params: Any, compressor: base.Compressor, *, key: Any = None, **kwargs: Any
) -> tuple[Any, Any]:
  """Compresses ``params`` once; returns ``(pruned_params, masks)``.

  The compressor is jit-compiled (and cached by JAX per compressor object), so a
  sweep that reuses one compressor, e.g. ``level=i`` of
  ``global_magnitude([0.5, 0.7, 0.9])``, compiles once.

  Args:
    params: the trained (dense) parameters.
    compressor: e.g. ``global_magnitude(0.9)`` or ``n_of_m(2, 4)``.
    key: needed only when the compressor samples a level per call.
    **kwargs: passed to the compressor (e.g. ``level=``).

  Raises:
    TypeError, ValueError: before compiling, for a non-compressor, a key of the
      wrong type, keyword arguments the compressor does not take, or a level
      out of range (for the magnitude compressors, whose ``check_call`` sees
      the concrete arguments; under ``jit`` a level would only be traced); after
      the call, when the compressor's output does not fit ``params``.
  """
  owner = "prune"
  validate.check_compressor(compressor, owner)
  if key is not None:
    base.as_key(key, owner)
  try:
    inspect.signature(compressor).bind(params, key, **kwargs)
  except TypeError as e:
    raise TypeError(
        f"{owner}: the compressor cannot be called as compressor(params, key"
        + "".join(f", {k}=..." for k in sorted(kwargs))
        + f"): {e}"
    ) from None
  except ValueError:  # no signature to inspect (a builtin): let the call tell
    pass
  check_call = getattr(compressor, "check_call", None)
  if callable(check_call):
    check_call(key, **kwargs)
  out = jax.jit(compressor)(params, key, **kwargs)
  return validate.check_compressor_output(out, params, owner=owner)


@dataclasses.dataclass(frozen=True)
class LeafSparsity:
  path: str
  shape: tuple[int, ...]
  size: int
  zeros: int
  prunable: bool

  @property
  def sparsity(self) -> float:
    return self.zeros / self.size if self.size else 0.0


@dataclasses.dataclass(frozen=True)
class SparsityReport:
  """Per-leaf zero counts, with totals over prunable leaves and over all parameters.

  The reference code divides by all parameters; papers often quote the prunable
  fraction only. Both are here, named.
  """

  rows: tuple[LeafSparsity, ...]

  @property
  def prunable_size(self) -> int:
    return sum(r.size for r in self.rows if r.prunable)

  @property
  def prunable_zeros(self) -> int:
    return sum(r.zeros for r in self.rows if r.prunable)

  @property
  def total_size(self) -> int:
    return sum(r.size for r in self.rows)

  @property
  def total_zeros(self) -> int:
    return sum(r.zeros for r in self.rows)

  @property
  def prunable_sparsity(self) -> float:
    return self.prunable_zeros / max(self.prunable_size, 1)

  @property
  def total_sparsity(self) -> float:
    return self.total_zeros / max(self.total_size, 1)

  def summary(self, per_leaf: bool = False) -> dict[str, float | int]:
    """A flat dict of scalars for a metrics logger.

    Always ``'sparsity/prunable'`` and ``'sparsity/overall'`` (fractions of
    exact zeros over prunable leaves and over all parameters) and
    ``'nonzero/prunable'``, ``'nonzero/overall'`` (int counts). With
    ``per_leaf=True``, also ``'sparsity/<leaf path>'`` for each prunable leaf
    (never for BatchNorm statistics, biases or other leaves that are not
    prunable). A prunable leaf whose path is itself ``'prunable'`` or
    ``'overall'`` would collide with a total: that is a ValueError.
    """
    per_leaf = validate.check_bool(
        per_leaf, "per_leaf", "SparsityReport.summary"
    )
    out: dict[str, float | int] = {
        "sparsity/prunable": self.prunable_sparsity,
        "sparsity/overall": self.total_sparsity,
        "nonzero/prunable": self.prunable_size - self.prunable_zeros,
        "nonzero/overall": self.total_size - self.total_zeros,
    }
    if per_leaf:
      for r in self.rows:
        if not r.prunable:
          continue
        name = f"sparsity/{r.path}"
        if name in out:
          raise ValueError(
              f"SparsityReport.summary: leaf '{r.path}' would overwrite the "
              f"total '{name}'; rename the leaf or use per_leaf=False"
          )
        out[name] = r.sparsity
    return out

  def __str__(self) -> str:
    lines = [
        "| leaf | shape | size | zeros | sparsity | prunable |",
        "|---|---|---:|---:|---:|:---:|",
    ]
    for r in self.rows:
      lines.append(
          f"| {r.path} | {r.shape} | {r.size} | {r.zeros} | {r.sparsity:.4f} | "
          f"{'yes' if r.prunable else ''} |"
      )
    lines.append(
        f"| **prunable** | | {self.prunable_size} | {self.prunable_zeros} | "
        f"{self.prunable_sparsity:.4f} | |"
    )
    lines.append(
        f"| **all parameters** | | {self.total_size} | {self.total_zeros} | "
        f"{self.total_sparsity:.4f} | |"
    )
    return "\n".join(lines)


def sparsity_report(
    params: Any,
    masks: Any = None,
    select: select_lib.Selector | None = None,
) -> SparsityReport:
  """Counts exact zeros in every leaf of ``params``.

  Args:
    params: the (pruned) parameters.
    masks: optional mask tree from a compressor; its non-None entries define
      which leaves are prunable. Without it, ``select`` does (default: float
      leaves with ``ndim >= 2``).
    select: the prunable rule when ``masks`` is None: a
      :class:`~cram_jax.compress.select.Selection` (e.g.
      ``Selection(include='kernel')``) or a callable ``(path, leaf) -> bool``.
      Giving both ``masks`` and ``select`` is an error (they could disagree).
  """
  owner = "sparsity_report"
  if masks is not None and select is not None:
    raise ValueError(
        f"{owner}: pass masks= or select=, not both (the masks already say "
        "which leaves are prunable)"
    )
  if masks is not None:
    masks = base.check_masks(params, masks, owner=owner)
    prunable = jax.tree.map(
        lambda m, _: m is not None, masks, params, is_leaf=lambda x: x is None
    )
  else:
    select = select_lib.DEFAULT if select is None else select
    select_lib.check_selector(select, owner)
    prunable = select_lib.selection_tree(params, select, owner=owner)
  zero_counts = jax.device_get(jax.tree.map(lambda x: jnp.sum(x == 0), params))
  rows = []
  for (path, x), zeros, is_prunable in zip(
      jax.tree_util.tree_flatten_with_path(params)[0],
      jax.tree.leaves(zero_counts),
      jax.tree.leaves(prunable),
  ):
    shape = tuple(jnp.shape(x))
    rows.append(
        LeafSparsity(
            path=select_lib.path_str(path),
            shape=shape,
            size=int(np.prod(shape)),
            zeros=int(zeros),
            prunable=bool(is_prunable),
        )
    )
  return SparsityReport(rows=tuple(rows))


def sparsity_summary(
    params: Any,
    masks: Any = None,
    select: select_lib.Selector | None = None,
    *,
    per_leaf: bool = False,
) -> dict[str, float | int]:
  """``sparsity_report(params, masks, select).summary(per_leaf)``: a flat dict.

  For a metrics logger, e.g. ``writer.write_scalars(step,
  sparsity_summary(pruned, masks))``; keys ``'sparsity/prunable'``,
  ``'sparsity/overall'``, ``'nonzero/prunable'``, ``'nonzero/overall'``, and
  ``'sparsity/<leaf path>'`` per prunable leaf with ``per_leaf=True``. See
  :meth:`SparsityReport.summary`.
  """
  per_leaf = validate.check_bool(per_leaf, "per_leaf", "sparsity_summary")
  return sparsity_report(params, masks, select).summary(per_leaf=per_leaf)


def keep_pruned(
    optimizer: optax.GradientTransformation, masks: Any
) -> optax.GradientTransformationExtraArgs:
  """Fine-tunes with ``optimizer`` while pruned weights stay exactly zero.

  Gradients of pruned weights are zeroed before the wrapped optimizer sees them
  (no momentum builds up there), and its updates at pruned positions are replaced
  by ``-params``, so a pruned weight is exactly 0 after every step, whatever the
  optimizer does (weight decay, Adam's epsilon, ...).

  Args:
    optimizer: any optax optimizer.
    masks: the mask tree returned by :func:`prune` (None = leaf not pruned).
  """
  owner = "keep_pruned"
  validate.check_optimizer(optimizer, owner)
  if masks is None:
    raise ValueError(
        f"{owner}: masks is None; pass the mask tree returned by prune()"
    )
  for path, m in jax.tree_util.tree_flatten_with_path(
      masks, is_leaf=lambda x: x is None
  )[0]:
    if m is not None and validate.dtype_of(m) != jnp.bool_:
      raise TypeError(
          f"{owner}: mask for leaf '{select_lib.path_str(path)}' must be a "
          f"bool array or None, got {validate.short(m)}"
      )
  inner = optax.with_extra_args_support(optimizer)

  def init_fn(params):
    base.check_masks(params, masks, owner=owner)
    return inner.init(params)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
          "keep_pruned: update needs params, to hold pruned weights at zero"
      )
    # Static checks: trace time only under jit.
    fitted = base.check_masks(params, masks, owner=owner)
    updates = validate.check_same_tree(
        params, updates, owner=owner, other_name="grads (updates)"
    )
    updates, state = inner.update(
        base.apply_masks(fitted, updates, owner=owner),
        state,
        params,
        **extra_args,
    )
    held = jax.tree.map(
        lambda m, u, p: u if m is None else jnp.where(m, u, -p).astype(u.dtype),
        fitted,
        updates,
        params,
        is_leaf=lambda x: x is None,
    )
    return held, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

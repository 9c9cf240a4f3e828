"""One-shot pruning, sparsity reports, and fine-tuning with fixed masks."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cram_jax.compress import base
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
  """
  if not callable(compressor):
    raise TypeError(f"prune: compressor must be callable, got {compressor!r}")
  return jax.jit(compressor)(params, key, **kwargs)


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
    select: select_lib.Selector = select_lib.DEFAULT,
) -> SparsityReport:
  """Counts exact zeros in every leaf of ``params``.

  Args:
    params: the (pruned) parameters.
    masks: optional mask tree from a compressor; its non-None entries define
      which leaves are prunable. Without it, ``select`` does (default: float
      leaves with ``ndim >= 2``).
    select: the prunable rule when ``masks`` is None.
  """
  if masks is not None:
    base.check_masks(params, masks, owner="sparsity_report")
    prunable = jax.tree.map(
        lambda m, _: m is not None, masks, params, is_leaf=lambda x: x is None
    )
  else:
    prunable = select_lib.selection_tree(params, select)
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
  inner = optax.with_extra_args_support(optimizer)

  def init_fn(params):
    base.check_masks(params, masks, owner="keep_pruned")
    return inner.init(params)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
          "keep_pruned: update needs params, to hold pruned weights at zero"
      )
    updates, state = inner.update(
        base.apply_masks(masks, updates), state, params, **extra_args
    )
    held = jax.tree.map(
        lambda m, u, p: u if m is None else jnp.where(m, u, -p).astype(u.dtype),
        masks,
        updates,
        params,
        is_leaf=lambda x: x is None,
    )
    return held, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

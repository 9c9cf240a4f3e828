"""One-shot Optimal Brain Surgeon pruning with a block-diagonal empirical Fisher.

The oBERT (Kurtic et al. 2022) / M-FAC (Frantar et al. 2021) recipe:

1. :func:`fisher_gradients` collects m gradients (one per batch, or one per
   example) of a loss.
2. :func:`obs_prune` approximates the loss around the current weights by the
   quadratic ``0.5 dw^T F dw`` with the damped empirical Fisher
   ``F = lam I + (1/m) sum_i g_i g_i^T``, block-diagonal over consecutive blocks
   of ``block_size`` weights of every selected leaf (never a dense d x d
   matrix), picks the weights to remove by their OBS saliency
   ``w_q^2 / (2 [F^-1]_qq)`` and moves the surviving weights of each block by the
   exact OBS update for the set it removes.

Design decisions (docs/obs.md has the full account):

- ``damp`` is relative: ``lam = damp * mean(diag((1/m) sum g g^T))`` over all
  selected weights of the model, one value for every block. Multiplying the
  loss by c leaves the masks unchanged, and one lam keeps saliencies of
  different leaves comparable under global pruning.
- Several weights removed from one block at once (every step of global or
  layer-wise pruning, every N:M block) are chosen by the sum of their
  single-weight saliencies (oBERT's approximation), then removed by the joint
  update ``dw = -F^-1 E_Q (E_Q^T F^-1 E_Q)^-1 E_Q^T w``, the exact minimiser
  of the quadratic model with ``w_Q = 0``. For N:M the choice inside each group
  of m is exact instead: every subset of the group is scored by its joint cost
  ``0.5 w_Q^T ([F^-1]_QQ)^-1 w_Q`` (when there are at most 128 subsets).
- ``steps = k`` prunes gradually (sparsity ``s t / k`` at step t). Each step
  scores the survivors against the Fisher conditioned on the weights removed
  so far, and re-solves the update with every removed weight in Q: with one
  Fisher the result is the exact constrained minimiser for the final mask. A
  callable ``grads(params) -> grads`` recomputes the Fisher at each step.
- Blocks run along the input axis by default (``block_order="input"``: the
  leaf flattened with axis -2 moved last), so one block holds inputs of one
  output unit; ``block_order="row_major"`` cuts the leaf as it is stored.
- Memory: blocks are processed in chunks of ``chunk_bytes`` worth of
  ``(blocks, B, B)`` float32 inverses, leaf by leaf; the inverses are computed
  again for the update pass rather than kept (two inverse passes per step for
  global and layer-wise pruning, one for N:M).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cram_jax.compress import base, validate
from cram_jax.compress import select as select_lib

METHODS = ("cholesky", "sherman_morrison")
_PATTERNS = ("global", "layerwise")
_ORDERS = ("input", "row_major")
_MAX_SUBSETS = 128  # N:M groups with more subsets fall back to saliency sums


# ----------------------------------------------------------------------------
# Gradients.


def fisher_gradients(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batches: Iterable[Any],
    *,
    per_sample: bool = False,
) -> Any:
  """Stacks gradients of ``loss_fn`` for the empirical Fisher.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    params: the point at which the gradients are taken.
    batches: an iterable of batches (pytrees of arrays).
    per_sample: False: one gradient per batch. True: one per example, by
      ``vmap`` over the leading axis of every batch leaf; ``loss_fn`` then sees
      each example as a batch of one (leading axis of size 1 kept).

  Returns:
    A pytree like ``params`` whose leaves have a leading axis m (number of
    batches, or of examples), in batch order. The gradient function is
    jit-compiled once for batches of one shape.

  Raises:
    TypeError: ``loss_fn`` not callable, ``per_sample`` not a bool, a loss that
      is not a real scalar.
    ValueError: no batches (m = 0); per-sample batch leaves whose leading axes
      differ.
  """
  owner = "fisher_gradients"
  if not callable(loss_fn):
    raise TypeError(
        f"{owner}: loss_fn must be callable (params, batch) -> scalar, got "
        f"{validate.short(loss_fn)}"
    )
  per_sample = validate.check_bool(per_sample, "per_sample", owner)
  if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
    raise TypeError(
        f"{owner}: batches must be an iterable of batches, got "
        f"{validate.short(batches)}"
    )
  grad_fn = jax.grad(loss_fn)

  def expand(tree):
    return jax.tree.map(lambda x: jnp.expand_dims(x, 0), tree)

  if per_sample:
    fn = jax.vmap(lambda p, ex: grad_fn(p, expand(ex)), in_axes=(None, 0))
  else:
    fn = lambda p, b: expand(grad_fn(p, b))  # noqa: E731
  compiled = jax.jit(fn)
  out = []
  for i, batch in enumerate(batches):
    if per_sample:
      _check_batch_axis(batch, i, owner)
    if i == 0:
      one = expand(jax.tree.map(lambda x: x[0], batch)) if per_sample else batch
      loss = jax.eval_shape(loss_fn, params, one)
      if (
          not hasattr(loss, "shape")
          or loss.shape != ()
          or not jnp.issubdtype(loss.dtype, jnp.floating)
      ):
        raise TypeError(
            f"{owner}: loss_fn must return a real scalar, got "
            f"{validate.short(loss)}"
        )
    out.append(compiled(params, batch))
  if not out:
    raise ValueError(
        f"{owner}: batches is empty, m = 0 gradients; the Fisher needs at "
        "least one batch"
    )
  if len(out) == 1:
    return out[0]
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *out)


def _check_batch_axis(batch: Any, index: int, owner: str) -> None:
  sizes = {}
  for path, x in jax.tree_util.tree_flatten_with_path(batch)[0]:
    shape = np.shape(x)
    if not shape:
      raise ValueError(
          f"{owner}: per_sample=True needs a leading example axis, but batch "
          f"{index} leaf '{select_lib.path_str(path)}' is a scalar"
      )
    sizes[select_lib.path_str(path)] = shape[0]
  if len(set(sizes.values())) > 1:
    raise ValueError(
        f"{owner}: per_sample=True needs one leading example axis, but batch "
        f"{index} has leaves of leading sizes {sizes}"
    )
  if sizes and not next(iter(sizes.values())):
    raise ValueError(f"{owner}: batch {index} has no examples (m = 0)")


# ----------------------------------------------------------------------------
# Block inverses.


def _sherman_morrison(
    g: jax.Array, lam: jax.Array, pad: jax.Array
) -> jax.Array:
  m, _, b = g.shape
  g = g / jnp.sqrt(jnp.float32(m))
  start = jnp.eye(b, dtype=jnp.float32) / (lam + pad)[:, :, None]

  def body(finv, gi):
    u = jnp.einsum("nij,nj->ni", finv, gi)  # finv is symmetric
    denom = 1.0 + jnp.einsum("ni,ni->n", gi, u)
    return finv - u[:, :, None] * (u / denom[:, None])[:, None, :], None

  return lax.scan(body, start, g)[0]


def _cholesky_inverse(
    g: jax.Array, lam: jax.Array, pad: jax.Array
) -> jax.Array:
  m, _, b = g.shape
  eye = jnp.eye(b, dtype=jnp.float32)
  fisher = jnp.einsum("mni,mnj->nij", g, g) / m + eye * (lam + pad)[:, :, None]
  chol = jnp.linalg.cholesky(fisher)
  # F^-1 = L^-T L^-1, with L^-1 from one triangular solve.
  linv = lax.linalg.triangular_solve(
      chol, jnp.broadcast_to(eye, fisher.shape), left_side=True, lower=True
  )
  return jnp.einsum("nki,nkj->nij", linv, linv)


@functools.partial(jax.jit, static_argnames=("method",))
def _inverse(
    g: jax.Array, lam: jax.Array, pad: jax.Array, method: str
) -> jax.Array:
  """Block inverses; ``pad`` (1 on padding, 0 on weights) is added to the
  diagonal so that padding is decoupled and invertible even at lam = 0."""
  g = g.astype(jnp.float32)
  lam = jnp.asarray(lam, jnp.float32)
  if method == "cholesky":
    return _cholesky_inverse(g, lam, pad)
  return _sherman_morrison(g, lam, pad)


def fisher_inverse(
    grads: Any, lam: float, *, method: str = "sherman_morrison"
) -> jax.Array:
  """``(lam I + (1/m) sum_i g_i g_i^T)^-1`` for a batch of blocks.

  Args:
    grads: ``(m, num_blocks, B)`` gradients, one ``(num_blocks, B)`` slice per
      sample.
    lam: the absolute damping, ``> 0`` unless every block's Fisher is
      invertible without it.
    method: ``"cholesky"`` (batched Cholesky factorisation and a triangular
      inverse) or ``"sherman_morrison"`` (m rank-1 updates of ``I / lam``).

  Returns:
    ``(num_blocks, B, B)`` float32 inverses.
  """
  owner = "fisher_inverse"
  if method not in METHODS:
    raise ValueError(
        f"{owner}: method must be one of {METHODS}, got {method!r}"
    )
  if np.ndim(grads) != 3 or not np.shape(grads)[0]:
    raise ValueError(
        f"{owner}: grads must have shape (m, num_blocks, B) with m >= 1, got "
        f"shape {np.shape(grads)}"
    )
  lam = validate.check_real(lam, "lam", owner)
  if not lam >= 0 or (lam == 0 and method == "sherman_morrison"):
    raise ValueError(
        f"{owner}: lam must be > 0 (>= 0 for cholesky), got {lam!r}"
    )
  pad = jnp.zeros(np.shape(grads)[1:], jnp.float32)
  return _inverse(jnp.asarray(grads), lam, pad, method)


# ----------------------------------------------------------------------------
# Per-chunk kernels. ``q`` marks the weights of a block that are (to be) zero.


def _eliminate(
    finv: jax.Array, w: jax.Array, q: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Removes the weights marked in ``q`` one at a time, exactly.

  For each position j in Q in turn: ``w -= w_j / [F^-1]_jj F^-1 e_j`` (the
  single-weight OBS update) and ``F^-1 -= F^-1 e_j e_j^T F^-1 / [F^-1]_jj``
  (the inverse of the Fisher restricted to the remaining weights). This is
  Gaussian elimination of ``[F^-1]_QQ``: the final w is the joint update
  ``w - F^-1 E_Q (E_Q^T F^-1 E_Q)^-1 E_Q^T w`` and the final inverse is
  ``F^-1 - F^-1_{:Q} (F^-1_QQ)^-1 F^-1_{Q:}``, in any order of Q. A scan of B
  batched rank-1 updates with one static shape whatever |Q| is; it replaced
  a batched Cholesky solve, the slow kind of kernel on CPU (see the inverse
  timings of benchmarks/obs_pruning.py).
  """

  def body(carry, j):
    finv, w = carry
    col = lax.dynamic_index_in_dim(finv, j, axis=2, keepdims=False)
    pivot = lax.dynamic_index_in_dim(col, j, axis=1, keepdims=False)
    active = lax.dynamic_index_in_dim(q, j, axis=1, keepdims=False)
    scale = jnp.where(active, 1.0 / jnp.where(active, pivot, 1.0), 0.0)
    wj = lax.dynamic_index_in_dim(w, j, axis=1, keepdims=False)
    w = w - (wj * scale)[:, None] * col
    finv = finv - (col * scale[:, None])[:, :, None] * col[:, None, :]
    return (finv, w), None

  b = finv.shape[-1]
  finv, w = lax.scan(body, (finv, w), jnp.arange(b))[0]
  return finv, jnp.where(q, 0.0, w)


def _small_spd_solve(a: jax.Array, rhs: jax.Array) -> jax.Array:
  """``a^-1 rhs`` for a batch of small SPD ``(r, r)`` matrices, ``rhs (..., r)``.

  Unrolled elementwise Cholesky over the batch, instead of one LAPACK call
  per tiny matrix.
  """
  r = a.shape[-1]
  low = [[None] * r for _ in range(r)]
  for i in range(r):
    for j in range(i + 1):
      acc = a[..., i, j] - sum(
          (low[i][k] * low[j][k] for k in range(j)), jnp.zeros(())
      )
      low[i][j] = jnp.sqrt(acc) if i == j else acc / low[j][j]
  y = []
  for i in range(r):
    acc = rhs[..., i] - sum((low[i][k] * y[k] for k in range(i)), jnp.zeros(()))
    y.append(acc / low[i][i])
  x = [None] * r
  for i in reversed(range(r)):
    acc = y[i] - sum((low[k][i] * x[k] for k in range(i + 1, r)), jnp.zeros(()))
    x[i] = acc / low[i][i]
  return jnp.stack(x, axis=-1)


@jax.jit
def _saliency(finv: jax.Array, w: jax.Array) -> jax.Array:
  diag = jnp.diagonal(finv, axis1=-2, axis2=-1)
  return jnp.square(w) / (2.0 * diag)


@jax.jit
def _conditioned_saliency(
    finv: jax.Array, w: jax.Array, pruned: jax.Array
) -> jax.Array:
  """Saliencies given that ``pruned`` is already zero.

  From the diagonal of ``F^-1 - F^-1_{:P} (F^-1_PP)^-1 F^-1_{P:}``, the inverse
  of the Fisher restricted to the survivors.
  """
  finv, _ = _eliminate(finv, w, pruned)
  sal = _saliency(finv, w)
  return jnp.where(pruned, -jnp.inf, sal)


@jax.jit
def _obs_update(finv: jax.Array, w: jax.Array, q: jax.Array) -> jax.Array:
  """``w - F^-1 E_Q (E_Q^T F^-1 E_Q)^-1 E_Q^T w``, exactly zero on Q."""
  return _eliminate(finv, w, q)[1]


@functools.partial(jax.jit, static_argnames=("m", "r", "exact"))
def _nm_choice(
    finv: jax.Array,
    w: jax.Array,
    pruned: jax.Array,
    m: int,
    r: int,
    exact: bool,
) -> jax.Array:
  """Per group of m consecutive weights, the r to zero (previous ones kept in)."""
  if r == 0:
    return pruned
  nb, b = w.shape
  groups = b // m
  wg = w.reshape(nb, groups, m)
  pg = pruned.reshape(nb, groups, m)
  if not exact:
    diag = jnp.diagonal(finv, axis1=-2, axis2=-1).reshape(nb, groups, m)
    sal = jnp.where(pg, -jnp.inf, jnp.square(wg) / (2.0 * diag))
    # rank = number of weights with smaller saliency (ties: lower index first)
    less = (sal[..., None, :] < sal[..., :, None]) | (
        (sal[..., None, :] == sal[..., :, None])
        & jnp.tril(jnp.ones((m, m), bool), k=-1)
    )
    return (jnp.sum(less, axis=-1) < r).reshape(nb, b)
  subsets = np.array(list(itertools.combinations(range(m), r)), np.int32)
  # The m x m diagonal blocks of each group: (nb, groups, m, m).
  blocks = jnp.diagonal(
      finv.reshape(nb, groups, m, groups, m), axis1=1, axis2=3
  ).transpose(0, 3, 1, 2)
  sub = blocks[:, :, subsets[:, :, None], subsets[:, None, :]]
  ws = wg[:, :, subsets]  # (nb, groups, S, r)
  z = _small_spd_solve(sub, ws)
  cost = 0.5 * jnp.sum(ws * z, axis=-1)
  members = np.zeros((len(subsets), m), bool)
  for s, idx in enumerate(subsets):
    members[s, idx] = True
  # A subset must contain every weight already removed from its group.
  missing = jnp.any(pg[:, :, None, :] & ~members, axis=-1)
  cost = jnp.where(missing, jnp.inf, cost)
  best = jnp.argmin(cost, axis=-1)  # ties: first subset in lexicographic order
  return jnp.asarray(members)[best].reshape(nb, b)


# ----------------------------------------------------------------------------
# Layout: selected leaves as (num_blocks, B) rows.


class _Leaf:
  """One selected leaf cut into blocks (host-side bookkeeping)."""

  def __init__(self, name, value, block_size, input_last):
    self.name = name
    self.shape = tuple(np.shape(value))
    self.dtype = jnp.result_type(value)
    self.input_last = input_last and len(self.shape) >= 2
    self.size = int(np.prod(self.shape))
    self.num_blocks = -(-self.size // block_size)
    self.block_size = block_size

  def blocks(self, x: Any, lead: tuple[int, ...] = ()) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    if self.input_last:
      x = jnp.moveaxis(x, -2, -1)
    flat = x.reshape(lead + (self.size,))
    pad = self.num_blocks * self.block_size - self.size
    if pad:
      flat = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, pad)])
    return flat.reshape(lead + (self.num_blocks, self.block_size))

  def block_order(self, flat: Any) -> jax.Array:
    """A vector already in block order (as saliencies are) -> blocks."""
    pad = self.num_blocks * self.block_size - self.size
    return jnp.pad(jnp.asarray(flat), (0, pad)).reshape(
        self.num_blocks, self.block_size
    )

  def unblock(self, blocks: Any) -> Any:
    flat = jnp.reshape(blocks, (-1,))[: self.size]
    shape = self.shape
    if self.input_last:
      shape = shape[:-2] + (shape[-1], shape[-2])
      return jnp.moveaxis(flat.reshape(shape), -1, -2)
    return flat.reshape(shape)


def _chunks(num_blocks: int, chunk: int):
  for start in range(0, num_blocks, chunk):
    yield start, min(start + chunk, num_blocks)


def _pad_rows(x: jax.Array, rows: int, axis: int = 0) -> jax.Array:
  """Pads ``axis`` to ``rows`` so every chunk of a leaf has one shape."""
  missing = rows - x.shape[axis]
  if missing <= 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, missing)
  return jnp.pad(x, widths)


# ----------------------------------------------------------------------------
# The pruner.


def _check_pattern(pattern: Any, owner: str):
  if isinstance(pattern, str):
    if pattern not in _PATTERNS:
      raise ValueError(
          f"{owner}: pattern must be 'global', 'layerwise' or (n, m), got "
          f"{pattern!r}"
      )
    return pattern
  if isinstance(pattern, (tuple, list)) and len(pattern) == 2:
    n = validate.check_int(pattern[0], "pattern n", owner)
    m = validate.check_int(pattern[1], "pattern m", owner)
    if not 1 <= n <= m:
      raise ValueError(
          f"{owner}: pattern (n, m) needs 1 <= n <= m, got {tuple(pattern)!r}"
      )
    return (n, m)
  raise TypeError(
      f"{owner}: pattern must be 'global', 'layerwise' or a pair (n, m), got "
      f"{validate.short(pattern)}"
  )


def _check_grads(
    grads: Any, params: Any, leaves: list[_Leaf], owner: str
) -> tuple[dict[str, Any], int]:
  """The selected leaves' gradients ``{name: (m, *shape)}`` and m."""
  p_paths = [
      select_lib.path_str(p)
      for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
  ]
  flat = jax.tree_util.tree_flatten_with_path(
      grads, is_leaf=lambda x: x is None
  )[0]
  g_paths = [select_lib.path_str(p) for p, _ in flat]
  if g_paths != p_paths:
    missing = [p for p in p_paths if p not in set(g_paths)][:6]
    extra = [p for p in g_paths if p not in set(p_paths)][:6]
    raise ValueError(
        f"{owner}: grads does not match the params tree (leaves missing from "
        f"grads: {missing}; extra leaves in grads: {extra}; params has "
        f"{len(p_paths)} leaves, grads {len(g_paths)})"
    )
  by_name = dict(zip(g_paths, (g for _, g in flat)))
  out, m = {}, None
  for leaf in leaves:
    g = by_name[leaf.name]
    shape = np.shape(g) if g is not None else None
    dtype = validate.dtype_of(g)
    if g is None or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f"{owner}: grads leaf '{leaf.name}' must be a float array of shape "
          f"(m,) + {leaf.shape}, got {validate.short(g)}"
      )
    if len(shape) != len(leaf.shape) + 1 or tuple(shape[1:]) != leaf.shape:
      raise ValueError(
          f"{owner}: grads leaf '{leaf.name}' has shape {tuple(shape)}, "
          f"expected (m,) + {leaf.shape} (one gradient per row)"
      )
    if m is None:
      m = shape[0]
    elif shape[0] != m:
      raise ValueError(
          f"{owner}: grads leaf '{leaf.name}' has {shape[0]} gradients, "
          f"earlier leaves have m = {m}"
      )
    out[leaf.name] = g
  if not m:
    raise ValueError(
        f"{owner}: grads has m = 0 gradients; the Fisher needs m >= 1"
    )
  return out, m


def _damping(grads: dict[str, Any], damp: float, owner: str) -> float:
  """``damp`` times the mean Fisher diagonal of the selected weights."""
  total, count = 0.0, 0
  for name, g in grads.items():
    g = jnp.asarray(g, jnp.float32)
    if not bool(jnp.all(jnp.isfinite(g))):
      raise ValueError(
          f"{owner}: grads leaf '{name}' has non-finite entries (NaN or inf)"
      )
    total += float(jnp.sum(jnp.square(g))) / g.shape[0]
    count += g[0].size
  mean_diag = total / count
  if damp > 0 and mean_diag == 0:
    raise ValueError(
        f"{owner}: every gradient is zero, so the Fisher is zero and damp="
        f"{damp!r} (relative to its mean diagonal) is too; check loss_fn"
    )
  return damp * mean_diag


def obs_prune(
    params: Any,
    grads: Any | Callable[[Any], Any],
    sparsity: float,
    *,
    pattern: str | tuple[int, int] = "global",
    block_size: int = 128,
    damp: float = 1e-2,
    steps: int = 1,
    select: select_lib.Selector | None = None,
    include: select_lib.Patterns = None,
    exclude: select_lib.Patterns = None,
    method: str = "sherman_morrison",
    block_order: str = "input",
    chunk_bytes: int = 128 * 2**20,
) -> tuple[Any, Any]:
  """Prunes ``params`` by OBS with a block-diagonal empirical Fisher.

  Args:
    params: the pytree to prune (not modified).
    grads: ``m`` gradients per leaf, a pytree like ``params`` with leaves of
      shape ``(m, *leaf.shape)`` (see :func:`fisher_gradients`; unselected
      leaves may be anything, None included). Or a callable ``grads(params)``
      returning such a tree, called at every step with the current pruned
      params (oBERT's gradual recipe with fresh gradients).
    sparsity: the target fraction in [0, 1]: of all selected weights
      ("global"), of each selected leaf ("layerwise"); ignored for N:M, which
      fixes it at ``1 - n/m``.
    pattern: ``"global"``, ``"layerwise"`` or ``(n, m)``: keep n of every m
      consecutive weights along axis -2 (the input axis of Flax kernels, as
      :func:`~cram_jax.compress.n_of_m`); ``block_size`` must then be a
      multiple of m, so that no group straddles two blocks.
    block_size: B, the size of the Fisher's diagonal blocks.
    damp: relative damping >= 0: ``lam = damp * mean Fisher diagonal``.
    steps: k >= 1 gradual steps, sparsity ``sparsity * t / k`` at step t (for
      N:M, ``round((m - n) t / k)`` weights removed per group).
    select, include, exclude: leaf selection, as
      :func:`~cram_jax.compress.global_magnitude` (default every float leaf
      with ``ndim >= 2``).
    method: block inverse, ``"sherman_morrison"`` (default: on CPU about 60x
      faster than ``"cholesky"`` and as accurate at damp 1e-2, see
      benchmarks/obs_pruning.py) or ``"cholesky"`` (the one that allows
      ``damp=0``).
    block_order: how a leaf is cut into blocks. ``"input"`` (default): flattened
      with axis -2 (the input axis of Flax kernels) moved last, so a block
      holds consecutive inputs of one output unit, the weights the
      Fisher couples most (on the digits MLP this pruned far better than
      row-major blocks, see docs/obs.md). ``"row_major"``: the leaf's own
      row-major order. Leaves with ``ndim < 2`` are always flat.
    chunk_bytes: bound on one chunk of ``(blocks, B, B)`` float32 inverses.

  Returns:
    ``(pruned_params, masks)``: masks in the compressor format (bool, True =
    kept, for selected leaves; None elsewhere). Pruned weights are exactly
    zero; every other selected weight carries its OBS update. Computed in
    float32, returned in each leaf's dtype.
  """
  owner = "obs_prune"
  block_size = validate.check_int(block_size, "block_size", owner, minimum=1)
  steps = validate.check_int(steps, "steps", owner, minimum=1)
  chunk_bytes = validate.check_int(chunk_bytes, "chunk_bytes", owner, minimum=1)
  pattern = _check_pattern(pattern, owner)
  if validate.is_traced(sparsity):
    raise TypeError(f"{owner}: sparsity must be a concrete number, not traced")
  base.check_sparsity(sparsity, owner)
  sparsity = float(sparsity)
  damp = validate.check_real(damp, "damp", owner)
  if not (damp >= 0 and math.isfinite(damp)):
    raise ValueError(
        f"{owner}: damp must be a finite number >= 0, got {damp!r}"
    )
  if method not in METHODS:
    raise ValueError(
        f"{owner}: method must be one of {METHODS}, got {method!r}"
    )
  if block_order not in _ORDERS:
    raise ValueError(
        f"{owner}: block_order must be one of {_ORDERS}, got {block_order!r}"
    )
  if method == "sherman_morrison" and damp == 0:
    raise ValueError(
        f"{owner}: method='sherman_morrison' starts from I / lam and needs "
        "damp > 0, got damp=0"
    )
  grads_fn = grads if callable(grads) else None
  rule = select_lib.resolve(select, include, exclude, owner=owner)
  chosen = select_lib.selected(params, rule, owner=owner)
  nm = pattern if isinstance(pattern, tuple) else None
  if nm is not None:
    n, m_group = nm
    if block_order != "input":
      raise ValueError(
          f"{owner}: pattern {nm} groups weights along the input axis and "
          f"needs block_order='input', got block_order={block_order!r}"
      )
    if block_size % m_group:
      raise ValueError(
          f"{owner}: pattern {nm} needs block_size a multiple of {m_group}, "
          f"got block_size={block_size}"
      )
    for name, x in chosen:
      shape = np.shape(x)
      if shape[-2] % m_group:
        raise ValueError(
            f"{owner}: pattern {nm}: leaf '{name}' has {shape[-2]} inputs "
            f"along axis {len(shape) - 2}, not a multiple of {m_group}"
        )
  input_last = block_order == "input"
  leaves = [_Leaf(name, x, block_size, input_last) for name, x in chosen]
  if grads_fn is None:
    leaf_grads, _ = _check_grads(grads, params, leaves, owner)
    lam = _damping(leaf_grads, damp, owner)
  chunk = max(1, chunk_bytes // (4 * block_size * block_size))

  current = {name: leaf.blocks(x) for leaf, (name, x) in zip(leaves, chosen)}
  pruned = {
      leaf.name: jnp.zeros((leaf.num_blocks, block_size), bool)
      for leaf in leaves
  }

  def leaf_chunks(leaf, g):
    rows = min(chunk, leaf.num_blocks)
    gb = leaf.blocks(g, (np.shape(g)[0],))
    for start, stop in _chunks(leaf.num_blocks, chunk):
      index = np.arange(start * block_size, (start + rows) * block_size)
      pad = (index >= leaf.size).astype(np.float32).reshape(rows, block_size)
      g_chunk = _pad_rows(gb[:, start:stop], rows, 1)
      finv = _inverse(g_chunk, lam, pad, method)
      yield start, stop, rows, finv

  def check_finite(values, leaf):
    if not bool(jnp.all(jnp.isfinite(values))):
      raise ValueError(
          f"{owner}: leaf '{leaf.name}': the damped Fisher of a block is not "
          f"positive definite (non-finite inverse) with damp={damp!r}; use "
          "a larger damp"
      )

  for t in range(1, steps + 1):
    if grads_fn is not None:
      now = _to_params(params, leaves, current)
      leaf_grads, _ = _check_grads(grads_fn(now), params, leaves, owner)
      lam = _damping(leaf_grads, damp, owner)
    if nm is None:
      # Pass 1: saliencies of the survivors.
      first = t == 1
      sal = {}
      for leaf in leaves:
        parts = []
        for start, stop, rows, finv in leaf_chunks(leaf, leaf_grads[leaf.name]):
          w = _pad_rows(current[leaf.name][start:stop], rows)
          if first:
            s = _saliency(finv, w)
          else:
            p = _pad_rows(pruned[leaf.name][start:stop], rows)
            s = _conditioned_saliency(finv, w, p)
          parts.append(np.asarray(s[: stop - start]))
        s = np.concatenate(parts).reshape(-1)[: leaf.size]
        if np.isnan(s).any() or (s[np.isfinite(s)] < 0).any():
          check_finite(jnp.asarray(np.nan), leaf)
        sal[leaf.name] = s
      target = sparsity if t == steps else sparsity * t / steps
      new_pruned = _select(sal, leaves, target, pattern)
      for leaf in leaves:
        pruned[leaf.name] = leaf.block_order(new_pruned[leaf.name])
    # Pass 2: (N:M: the choice and) the joint update of every block.
    for leaf in leaves:
      w_all = current[leaf.name]
      out_w, out_q = [], []
      for start, stop, rows, finv in leaf_chunks(leaf, leaf_grads[leaf.name]):
        w = _pad_rows(w_all[start:stop], rows)
        q = _pad_rows(pruned[leaf.name][start:stop], rows)
        if nm is not None:
          n, m_group = nm
          r = round((m_group - n) * t / steps)
          exact = math.comb(m_group, r) <= _MAX_SUBSETS
          q = _nm_choice(finv, w, q, m_group, r, exact)
        new_w = _obs_update(finv, w, q)
        check_finite(new_w, leaf)
        out_w.append(new_w[: stop - start])
        out_q.append(q[: stop - start])
      current[leaf.name] = jnp.concatenate(out_w)
      pruned[leaf.name] = jnp.concatenate(out_q)

  leaf_masks = {leaf.name: ~leaf.unblock(pruned[leaf.name]) for leaf in leaves}
  return _to_params(params, leaves, current), base.masks_for(params, leaf_masks)


def _to_params(params: Any, leaves: list[_Leaf], current: dict) -> Any:
  by_name = {leaf.name: leaf for leaf in leaves}

  def put(path, x):
    leaf = by_name.get(select_lib.path_str(path))
    if leaf is None:
      return x
    return leaf.unblock(current[leaf.name]).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(put, params)


def _select(
    sal: dict[str, np.ndarray],
    leaves: list[_Leaf],
    sparsity: float,
    pattern: str,
) -> dict[str, np.ndarray]:
  """Pruned (True) entries: exactly the kept count of largest saliency is kept.

  Already pruned weights have saliency -inf and stay pruned. Ties: the lower
  flat index (leaves in flatten order) is kept, as in global_magnitude.
  """

  def keep_top(s: np.ndarray, size: int) -> np.ndarray:
    kept = base.kept_count(sparsity, size)
    order = np.argsort(-s, kind="stable")
    out = np.ones(size, bool)
    out[order[:kept]] = False
    return out

  if pattern == "layerwise":
    return {leaf.name: keep_top(sal[leaf.name], leaf.size) for leaf in leaves}
  flat = np.concatenate([sal[leaf.name] for leaf in leaves])
  out = keep_top(flat, flat.size)
  result, offset = {}, 0
  for leaf in leaves:
    result[leaf.name] = out[offset : offset + leaf.size]
    offset += leaf.size
  return result

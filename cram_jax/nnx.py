"""Flax NNX support: the compressed-point gradient as a pure function.

:func:`cram` needs ``grad_fn(params, i=0) -> grads``, a function of pure
parameter arrays. An NNX model is a stateful object, and calling it inside
``jax.grad`` on a new tracer level cannot update its BatchNorm statistics
(``TraceContextError``). :func:`grad_fn` builds the pure function: each call
merges a throw-away copy of the model with the given parameters and the model's
other state (BatchNorm statistics, RNG counts), so the compressed pass runs like
the clean one (train mode, batch statistics) and its statistics updates are
discarded, as docs/method.md section 5 asks::

  @nnx.jit
  def train_step(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    optimizer.update(model, grads, grad_fn=cram_jax.nnx.grad_fn(loss_fn, model, batch))
    return loss

with ``optimizer = nnx.Optimizer(model, cram_jax.cram(...), wrt=nnx.Param)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from cram_jax.compress import validate


def grad_fn(
    loss_fn: Callable[..., Any],
    model: nnx.Module,
    *args: Any,
    wrt: Any = nnx.Param,
    has_aux: bool = False,
    **kwargs: Any,
) -> Callable[..., Any]:
  """``grad_fn(params, i=0)`` for :func:`cram`, from an NNX loss function.

  Call it after the clean pass, inside the same (``nnx.jit``-ed) step. It takes
  a snapshot of ``model``'s non-``wrt`` state (BatchNorm statistics, RNG
  state) and of its static attributes (train/eval mode: the compressed pass
  runs in the same mode as the clean one). The returned function computes
  ``jax.grad`` of ``loss_fn(copy, *args, **kwargs)`` where ``copy`` is a fresh
  model holding ``params`` and that snapshot; whatever the copy mutates
  (running statistics, RNG counts) is thrown away, and ``model`` is never
  touched.

  Args:
    loss_fn: ``loss_fn(model, *args, **kwargs) -> loss`` (a scalar), or
      ``-> (loss, aux)`` with ``has_aux=True`` (aux is dropped); the function
      given to ``nnx.value_and_grad`` for the clean pass.
    model: the NNX model being trained.
    *args: the minibatch and any other positional arguments of ``loss_fn``.
    wrt: the variables differentiated, the ``wrt`` of ``nnx.Optimizer``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    **kwargs: keyword arguments of ``loss_fn``.

  Returns:
    ``grad_fn(params, i=0) -> grads``: ``params`` a pure ``State`` of ``wrt``
    arrays (as ``nnx.Optimizer`` passes them to the optax transformation),
    ``grads`` the same structure. ``i`` (the adversarial step index of
    optax.contrib.sam's contract) is ignored.

  Raises:
    TypeError: for a non-callable ``loss_fn``, a ``model`` that is not an
      ``nnx.Module`` or a non-bool ``has_aux``, at once.
  """
  owner = "cram_jax.nnx.grad_fn"
  if not callable(loss_fn):
    raise TypeError(
        f"{owner}: loss_fn must be callable (model, *args) -> loss, got "
        f"{validate.short(loss_fn)}"
    )
  if not isinstance(model, nnx.Module):
    raise TypeError(
        f"{owner}: model must be an nnx.Module (the model being trained), got "
        f"{validate.short(model)}"
    )
  validate.check_bool(has_aux, "has_aux", owner)
  graphdef, _, rest = nnx.split(model, wrt, ...)
  # Pure arrays: merging Variables would share them with `model`, and the copy
  # would then try to write the model's statistics from inside jax.grad.
  rest = nnx.as_pure(rest)

  def loss_at(p):
    copy = nnx.merge(graphdef, p, rest)
    out = loss_fn(copy, *args, **kwargs)
    return out[0] if has_aux else out

  def compressed_grad_fn(p: Any, i: Any = 0) -> Any:
    del i  # One adversarial step: CrAM always passes 0.
    return jax.grad(loss_at)(nnx.as_pure(p))

  return compressed_grad_fn

"""Every zoo model as a Flax NNX module, via ``flax.nnx.bridge.ToNNX``.

``as_nnx(ResNet8(num_classes=10), x)`` initialises the Linen model exactly as
``model.init(jax.random.key(0), x, train=False)`` does (same parameters), or
wraps given ``variables`` (e.g. an imported checkpoint), and returns an NNX
module called like the Linen model without variables::

  model = as_nnx(ResNet8(num_classes=10), jnp.zeros((1, 32, 32, 3)))
  logits = model(images, train=True)  # updates its BatchStat variables in place
  logits = model(images, train=False)

Key paths of ``nnx.state(model, nnx.Param)`` are the Linen ``params`` paths
(``'stage1_block1/conv1/kernel'``), so ``RESNET_PRUNABLE``, ``RESNET_UNIFORM``
and ``BERT_PRUNABLE`` select the same leaves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
from flax import nnx
from flax.nnx import bridge
from flax.nnx.bridge import variables as bridge_variables

from cram_jax.compress import base, validate


class LinenModule(bridge.ToNNX):
  """A Linen module as an NNX module (``bridge.ToNNX``) for the zoo's calls.

  Called as the Linen module is applied, without variables:
  ``model(x, train=True)`` normalises with batch statistics and updates the
  ``BatchStat`` variables in place (``mutable=['batch_stats']`` is implied by
  ``train=True``); dropout draws from the module's ``'dropout'`` RNG stream.
  Build one with :func:`as_nnx`.
  """

  def __call__(self, *args: Any, mutable: Any = None, **kwargs: Any) -> Any:
    if mutable is None and kwargs.get("train") is True:
      mutable = ["batch_stats"]
    return super().__call__(*args, mutable=mutable, **kwargs)


def as_nnx(
    module: nn.Module,
    *sample_args: Any,
    key: int | jax.Array = 0,
    variables: Mapping[str, Any] | None = None,
    **sample_kwargs: Any,
) -> LinenModule:
  """A zoo (or any Linen) model as an NNX module with the same numbers.

  Args:
    module: the Linen module, e.g. ``ResNet8(num_classes=10)`` or
      ``BertForSequenceClassification(config, num_labels=2)``.
    *sample_args: sample inputs for ``module.init`` (only shapes matter).
    key: int seed or PRNG key: the parameters are those of
      ``module.init(key, *sample_args, **sample_kwargs)`` (an int ``s`` means
      ``jax.random.key(s)``); ``jax.random.fold_in(key, 1)`` seeds the
      ``'dropout'`` stream used in train mode.
    variables: Linen variables to wrap instead of initialising (e.g. from
      ``import_torchvision_resnet`` or ``load_bert``); then no sample input is
      needed.
    **sample_kwargs: keyword inputs for ``module.init``; ``train=False`` when
      not given.

  Returns:
    A :class:`LinenModule`; train it with ``nnx.Optimizer(model, tx,
    wrt=nnx.Param)``. Its Linen variables are
    ``nnx.bridge.variables.nnx_attrs_to_linen_vars`` of its state, or simply
    ``nnx.state(model, nnx.Param)`` (paths as in ``variables['params']``).

  Raises:
    TypeError: for a ``module`` that is not a Linen module, a bad ``key`` or
      ``variables`` that are not a mapping; ValueError when neither sample
      inputs nor ``variables`` are given.
  """
  owner = "as_nnx"
  if not isinstance(module, nn.Module):
    raise TypeError(
        f"{owner}: module must be a flax.linen Module (a zoo model such as "
        f"ResNet8(num_classes=10)), got {validate.short(module)}"
    )
  rng = base.as_key(key, owner)
  if variables is None:
    if not sample_args and not sample_kwargs:
      raise ValueError(
          f"{owner}: give a sample input, as_nnx(model, x), or the variables "
          "to wrap, as_nnx(model, variables=...)"
      )
    sample_kwargs.setdefault("train", False)
    variables = module.init(rng, *sample_args, **sample_kwargs)
  elif not isinstance(variables, Mapping):
    raise TypeError(
        f"{owner}: variables must be a Linen variables mapping "
        f"{{'params': ..., 'batch_stats': ...}}, got {validate.short(variables)}"
    )
  elif "params" not in variables:
    raise ValueError(
        f"{owner}: variables have no 'params' collection (collections: "
        f"{sorted(variables)}); pass the whole variables dict, not "
        "variables['params']"
    )
  model = LinenModule(module, rngs=nnx.Rngs(dropout=jax.random.fold_in(rng, 1)))
  # What ToNNX does with the collections a Linen init returns.
  attrs = bridge_variables.linen_vars_to_nnx_attrs(dict(variables))
  for name, value in attrs.items():
    setattr(model, name, nnx.data(value))
  return model

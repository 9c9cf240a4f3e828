"""Optimisers from config fields, method presets, and the paper's learning-rate schedule."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cram_jax
from experiments import optimizers
from experiments.configs import common, resnet20_cifar10


def test_schedule_warms_up_then_follows_a_cosine_stepped_per_epoch():
  config = resnet20_cifar10.get_config("sgd")  # lr 0.1, 200 epochs, 5 warm-up
  spe = 391
  lr = optimizers.learning_rate_schedule(config, spe)
  # Warm-up: epoch e (0-based) trains at 0.1 * (e + 1) / 5, constant inside the epoch.
  for epoch in range(5):
    for step in (epoch * spe, epoch * spe + spe - 1):
      assert float(lr(step)) == pytest.approx(0.1 * (epoch + 1) / 5, rel=1e-6)
  # Then a cosine over the remaining 195 epochs, from 0.1 down, one value per epoch.
  for epoch in (5, 6, 100, 199):
    expected = 0.5 * 0.1 * (1 + math.cos(math.pi * (epoch - 5) / 195))
    assert float(lr(epoch * spe)) == pytest.approx(expected, rel=1e-5, abs=1e-8)
    assert float(lr(epoch * spe + 200)) == pytest.approx(
        expected, rel=1e-5, abs=1e-8
    )


def test_schedule_per_step_without_warmup():
  config = common.base_config()
  config.optimizer.learning_rate = 1.0
  config.num_epochs, config.warmup_epochs = 2, 0
  config.schedule_per_epoch = False
  lr = optimizers.learning_rate_schedule(config, 10)
  assert float(lr(0)) == pytest.approx(1.0)
  assert float(lr(5)) == pytest.approx(
      0.5 * (1 + math.cos(math.pi * 5 / 20)), rel=1e-6
  )
  assert float(lr(20)) == pytest.approx(0.0, abs=1e-7)


METHODS = (
    "sgd",
    "adamw",
    "sam",
    "cram+-multi",
    "cram+-multi-high",
    "cram+-nm",
    "cram+-k95",
    "cram-k50",
)


def quadratic_problem():
  params = {
      "conv": {"kernel": jnp.ones((3, 3, 8, 8)) * jnp.arange(8.0)},
      "bias": jnp.zeros(8),
  }

  def loss(p):
    return jnp.sum(p["conv"]["kernel"] ** 2) + jnp.sum(p["bias"] ** 2)

  return params, loss


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_every_method_builds_and_steps_with_one_update_call(method, base):
  config = common.base_config()
  config.optimizer.base = base
  common.set_method(config, method)
  config.num_epochs = 1
  tx = optimizers.make_optimizer(config, steps_per_epoch=10)
  params, loss = quadratic_problem()
  grads = jax.grad(loss)(params)
  grad_fn = lambda p, _: jax.grad(loss)(p)  # noqa: E731
  updates, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))(
      grads, tx.init(params), params
  )
  assert np.all(np.isfinite(np.asarray(updates["conv"]["kernel"])))
  assert float(jnp.abs(updates["conv"]["kernel"]).sum()) > 0


@pytest.mark.parametrize("compressor", optimizers.COMPRESSORS)
def test_every_compressor_kind_builds_a_cram_step(compressor):
  config = common.set_method(common.base_config(), "cram+-multi")
  config.cram.compressor = compressor
  config.cram.nm_patterns = ((2, 4),)
  config.cram.bits = (4, 8)
  tx = optimizers.make_optimizer(config, 10)
  params, loss = quadratic_problem()
  state = tx.init(params)
  assert isinstance(state, cram_jax.CrAMState)
  tx.update(
      jax.grad(loss)(params),
      state,
      params,
      grad_fn=lambda p, _: jax.grad(loss)(p),
  )


def test_fields_choose_the_optimizer():
  config = common.base_config()
  config.optimizer.wrapper = "cram"
  state = optimizers.make_optimizer(config, 10).init({"w": jnp.ones((4, 4))})
  assert isinstance(state, cram_jax.CrAMState)
  config.optimizer.wrapper = "sam"
  state = optimizers.make_optimizer(config, 10).init({"w": jnp.ones((4, 4))})
  assert isinstance(state, optax.contrib.SAMState)
  with pytest.raises(
      ValueError, match=r"config.optimizer.wrapper='lookahead' is not one of"
  ):
    config.optimizer.wrapper = "lookahead"
    optimizers.make_optimizer(config, 10)
  config.optimizer.wrapper = "none"
  with pytest.raises(ValueError, match=r"config.optimizer.base='adam' is not"):
    config.optimizer.base = "adam"
    optimizers.make_optimizer(config, 10)


def test_presets_set_fields():
  c = common.set_method(common.base_config(), "cram+-k95")
  assert (c.name, c.optimizer.wrapper, c.cram.plus, c.cram.compressor) == (
      "cram+-k95",
      "cram",
      True,
      "global",
  )
  assert c.cram.sparsities == (0.95,)
  c = common.set_method(common.base_config(), "cram-k5")
  assert (c.cram.plus, c.cram.sparsities) == (False, (0.05,))
  c = common.set_method(common.base_config(), "cram+-nm")
  assert (c.optimizer.wrapper, c.cram.compressor) == ("cram", "nm")
  c = common.base_config()
  c.optimizer.base = "adamw"
  common.set_method(c, "sam")  # keeps the config file's base optimiser
  assert (c.optimizer.base, c.optimizer.wrapper) == ("adamw", "sam")
  common.set_method(c, "sgd")
  assert (c.optimizer.base, c.optimizer.wrapper) == ("sgd", "none")
  for bad in ("adam", "cram+-k", "cram+-k950", "cram+-multi ", "CrAM+-k95"):
    with pytest.raises(ValueError, match=re.escape(f"method {bad!r} is not")):
      common.set_method(common.base_config(), bad)


def test_a_misspelt_field_is_an_error_naming_it():
  config = common.base_config()
  with pytest.raises(AttributeError, match="rhoo"):
    _ = config.cram.rhoo
  config.lock()
  with pytest.raises(AttributeError, match="rhoo"):
    config.cram.rhoo = 0.1

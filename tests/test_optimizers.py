"""Optimisers by name and the paper's learning-rate schedule."""

import math

import jax
import jax.numpy as jnp
import numpy as np
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
  config.learning_rate, config.num_epochs, config.warmup_epochs = 1.0, 2, 0
  config.schedule_per_epoch = False
  lr = optimizers.learning_rate_schedule(config, 10)
  assert float(lr(0)) == pytest.approx(1.0)
  assert float(lr(5)) == pytest.approx(
      0.5 * (1 + math.cos(math.pi * 5 / 20)), rel=1e-6
  )
  assert float(lr(20)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("name", optimizers.NAMES)
def test_every_optimizer_name_builds_and_steps(name):
  config = common.base_config()
  config.optimizer, config.rho, config.sparsity = name, 0.05, 0.5
  config.num_epochs = 1
  tx = optimizers.make_optimizer(config, steps_per_epoch=10)
  params = {
      "conv": {"kernel": jnp.ones((3, 3, 8, 8)) * jnp.arange(8.0)},
      "bias": jnp.zeros(8),
  }

  def loss(p):
    return jnp.sum(p["conv"]["kernel"] ** 2) + jnp.sum(p["bias"] ** 2)

  grads = jax.grad(loss)(params)
  grad_fn = lambda p, _: jax.grad(loss)(p)  # noqa: E731
  updates, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))(
      grads, tx.init(params), params
  )
  assert np.all(np.isfinite(np.asarray(updates["conv"]["kernel"])))
  assert float(jnp.abs(updates["conv"]["kernel"]).sum()) > 0


def test_cram_names_map_to_the_paper_variants():
  config = common.base_config()
  config.rho = 0.1
  config.optimizer = "cram"
  state = optimizers.make_optimizer(config, 10).init({"w": jnp.ones((4, 4))})
  assert isinstance(state, cram_jax.CrAMState)
  with pytest.raises(ValueError, match="config.optimizer='adam'"):
    config.optimizer = "adam"
    optimizers.make_optimizer(config, 10)


def test_method_names_in_configs():
  c = common.set_method(common.base_config(), "cram+-k95", rho=0.2)
  assert (c.optimizer, c.sparsity, c.rho) == ("cram+", 0.95, 0.2)
  c = common.set_method(common.base_config(), "sgd", rho=0.2)
  assert (c.optimizer, c.rho) == ("sgd", 0.0)

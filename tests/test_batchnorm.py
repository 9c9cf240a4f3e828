"""BatchNorm re-estimation against a NumPy EMA of batch moments."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cram_jax import (
    calibration_batches,
    recalibrate_batch_stats,
    reset_batch_stats,
)
from cram_jax.models import ResNet8, as_nnx


class Net(nn.Module):

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(6, name="dense")(x)
    x = nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn"
    )(x)
    return nn.Dense(2, name="head")(x)


def test_recalibration_is_an_ema_of_batch_moments_and_leaves_params_alone():
  model = Net()
  rng = np.random.default_rng(0)
  data = [
      rng.normal(loc=2.0, scale=3.0, size=(16, 5)).astype(np.float32)
      for _ in range(30)
  ]
  variables = model.init(jax.random.key(0), data[0], train=False)
  stale = jax.tree.map(
      lambda x: x + 7.0, variables["batch_stats"]
  )  # pretend stale stats
  variables = {"params": variables["params"], "batch_stats": stale}

  new = recalibrate_batch_stats(model, variables, data)

  kernel = np.asarray(variables["params"]["dense"]["kernel"], np.float64)
  bias = np.asarray(variables["params"]["dense"]["bias"], np.float64)
  mean, var = np.zeros(6), np.ones(6)  # reset first
  for x in data:
    h = x.astype(np.float64) @ kernel + bias
    mean = 0.9 * mean + 0.1 * h.mean(0)
    var = 0.9 * var + 0.1 * h.var(0)  # biased batch variance, as Flax
  np.testing.assert_allclose(
      new["batch_stats"]["bn"]["mean"], mean, rtol=1e-4, atol=1e-5
  )
  np.testing.assert_allclose(
      new["batch_stats"]["bn"]["var"], var, rtol=1e-4, atol=1e-5
  )
  jax.tree.map(
      np.testing.assert_array_equal, new["params"], variables["params"]
  )


def test_reset_and_errors():
  stats = {"bn": {"mean": jnp.full(3, 5.0), "var": jnp.full(3, 9.0)}}
  reset = reset_batch_stats(stats)
  np.testing.assert_array_equal(reset["bn"]["mean"], 0.0)
  np.testing.assert_array_equal(reset["bn"]["var"], 1.0)
  with pytest.raises(ValueError, match=r"no 'mean'/'var'.*\['x'\]"):
    reset_batch_stats({"x": jnp.ones(3)})
  with pytest.raises(ValueError, match=r"pass variables\['batch_stats'\]"):
    reset_batch_stats({"params": {}, "batch_stats": stats})
  model = Net()
  x = np.ones((4, 5), np.float32)
  variables = model.init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match="no 'batch_stats'"):
    recalibrate_batch_stats(model, {"params": variables["params"]}, [x])
  with pytest.raises(ValueError, match="batches is empty"):
    recalibrate_batch_stats(model, variables, [])
  with pytest.raises(TypeError, match="got a mapping"):
    recalibrate_batch_stats(model, variables, [{"image": x}])


def test_calibration_batches_follow_the_recipe():
  images = np.arange(5000)[:, None]
  out = list(calibration_batches(images, seed=1))
  assert len(out) == 100 and all(b.shape == (128, 1) for b in out)
  used = np.unique(np.concatenate(out))
  assert len(used) == 1000  # 1000 random images, each seen ~12.8 times
  first_pass = np.concatenate(out)[:1000, 0]
  assert (
      len(np.unique(first_pass)) == 1000
  )  # shuffled passes, no repeats within one
  again = list(calibration_batches(images, seed=1))
  assert all(np.array_equal(a, b) for a, b in zip(out, again))
  flipped = next(calibration_batches(images, augment=lambda b, rng: -b))
  assert (flipped <= 0).all()


class Wide(nn.Module):
  """Net with 7 BatchNorm features and an extra BatchNorm layer."""

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(7, name="dense")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    return nn.BatchNorm(use_running_average=not train, name="bn2")(x)


@pytest.mark.parametrize(
    "stats,error,match",
    [
        (
            lambda own, wide: {"bn": wide["bn"]},  # another model's widths
            ValueError,
            r"variables\['batch_stats'\] leaf 'bn/mean' has shape \(7,\), the "
            r"model's batch_stats leaf has shape \(6,\)",
        ),
        (
            lambda own, wide: wide,  # another model's tree
            ValueError,
            r"extra leaves in variables\['batch_stats'\]: \['bn2/mean'",
        ),
        (
            lambda own, wide: {**own, "bn2": wide["bn2"]},  # used to be kept
            ValueError,
            r"extra leaves in variables\['batch_stats'\]: \['bn2/mean', "
            r"'bn2/var'\]",
        ),
        (
            lambda own, wide: {"bn": {"mean": own["bn"]["mean"]}},
            ValueError,
            r"missing from variables\['batch_stats'\]: \['bn/var'\]",
        ),
        (
            lambda own, wide: {
                "bn": {"mean": own["bn"]["mean"][:1], "var": own["bn"]["var"]}
            },
            ValueError,
            r"leaf 'bn/mean' has shape \(1,\)",
        ),
    ],
)
def test_recalibrate_rejects_batch_stats_that_are_not_the_models(
    stats, error, match
):
  x = np.ones((4, 5), np.float32)
  variables = Net().init(jax.random.key(0), x, train=False)
  wide = Wide().init(jax.random.key(0), x, train=False)["batch_stats"]
  bad = {**variables, "batch_stats": stats(variables["batch_stats"], wide)}
  for reset in (True, False):
    with pytest.raises(error, match=match):
      recalibrate_batch_stats(Net(), bad, [x], reset=reset)


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        (
            ("model", "variables", "batches"),
            {},
            TypeError,
            "model must be a flax.linen Module, got 'model'",
        ),
        (("net", [], "batches"), {}, TypeError, "variables must be a mapping"),
        (
            ("net", "variables", np.ones((4, 5), np.float32)),
            {},
            TypeError,
            r"got a single array of shape \(4, 5\); wrap it",
        ),
        (("net", "variables", 3), {}, TypeError, "iterable of batches, got 3"),
        (
            ("net", "variables", "batches"),
            dict(apply_kwargs="train"),
            TypeError,
            "apply_kwargs must be a mapping",
        ),
        (
            ("net", "variables", "batches"),
            dict(apply_kwargs={"train": [True]}),
            TypeError,
            "apply_kwargs values must be hashable",
        ),
        (
            ("net", "variables", "batches"),
            dict(reset="yes"),
            TypeError,
            "reset must be True or False",
        ),
    ],
)
def test_recalibrate_bad_arguments(args, kwargs, error, match):
  x = np.ones((4, 5), np.float32)
  fill = {
      "net": Net(),
      "variables": Net().init(jax.random.key(0), x, train=False),
      "batches": [x],
  }
  args = [fill.get(a, a) if isinstance(a, str) else a for a in args]
  with pytest.raises(error, match=match):
    recalibrate_batch_stats(*args, **kwargs)


@pytest.mark.parametrize(
    "images,kwargs,error,match",
    [
        # An empty array used to hang the first next().
        (np.zeros((0, 3)), {}, ValueError, r"at least one image.*\(0, 3\)"),
        (np.float32(1), {}, ValueError, "at least one image"),
        (
            None,
            dict(num_batches=0),
            ValueError,
            "num_batches must be >= 1, got 0",
        ),
        (
            None,
            dict(num_batches=-1),
            ValueError,
            "num_batches must be >= 1, got -1",
        ),
        (None, dict(num_batches=2.5), TypeError, "num_batches must be an int"),
        (
            None,
            dict(batch_size=True),
            TypeError,
            "batch_size must be an int, got True",
        ),
        (None, dict(num_images=0), ValueError, "num_images must be >= 1"),
        (None, dict(seed=-1), ValueError, "seed must be >= 0"),
        (None, dict(seed="s"), TypeError, "seed must be an int"),
        (None, dict(augment=3), TypeError, "augment must be a callable"),
    ],
)
def test_calibration_batches_bad_arguments(images, kwargs, error, match):
  images = np.ones((10, 3), np.float32) if images is None else images
  # Raised by the call itself, not lazily by the first next().
  with pytest.raises(error, match=match):
    calibration_batches(images, **kwargs)


class NNXInputBN(nnx.Module):
  """BatchNorm straight on the input: the re-estimated statistics have a
  closed form."""

  def __init__(self, rngs):
    self.bn = nnx.BatchNorm(3, momentum=0.9, rngs=rngs)

  def __call__(self, x):
    return self.bn(x)


def test_recalibrate_nnx_module_closed_form_in_place():
  model = NNXInputBN(nnx.Rngs(0))
  model.eval()  # recalibration switches BatchNorm to train mode itself
  rng = np.random.default_rng(0)
  batches = [
      rng.normal(i, 1 + i, size=(16, 3)).astype(np.float32) for i in range(3)
  ]
  mean, var = np.zeros(3), np.ones(3)
  for b in batches:  # EMA, momentum 0.9, from the reset values
    mean = 0.9 * mean + 0.1 * b.mean(0)
    var = 0.9 * var + 0.1 * b.var(0)
  model.bn.mean[...] = jnp.full((3,), 5.0)
  assert recalibrate_batch_stats(model, batches) is model
  np.testing.assert_allclose(model.bn.mean[...], mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.bn.var[...], var, rtol=1e-5, atol=1e-6)
  assert model.bn.use_running_average, "the model's own mode is left as it was"


def test_recalibrate_zoo_nnx_matches_linen_path():
  linen = ResNet8(num_classes=3)
  rng = np.random.default_rng(1)
  batches = [rng.normal(size=(4, 8, 8, 3)).astype(np.float32) for _ in range(3)]
  variables = linen.init(jax.random.key(0), batches[0], train=False)
  model = as_nnx(linen, batches[0])
  expected = recalibrate_batch_stats(linen, variables, batches)
  recalibrate_batch_stats(model, batches)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      nnx.to_pure_dict(nnx.as_pure(nnx.state(model, nnx.BatchStat))),
      expected["batch_stats"],
  )


def test_reset_batch_stats_nnx_state_and_module():
  model = NNXInputBN(nnx.Rngs(0))
  model.bn.mean[...] = jnp.full((3,), 2.0)
  model.bn.var[...] = jnp.full((3,), 3.0)
  for state in (
      nnx.state(model, nnx.BatchStat),
      nnx.as_pure(nnx.state(model, nnx.BatchStat)),
  ):
    out = nnx.to_pure_dict(nnx.as_pure(reset_batch_stats(state)))
    np.testing.assert_array_equal(out["bn"]["mean"], np.zeros(3))
    np.testing.assert_array_equal(out["bn"]["var"], np.ones(3))
  np.testing.assert_array_equal(model.bn.mean[...], np.full(3, 2.0))
  assert reset_batch_stats(model) is model
  np.testing.assert_array_equal(model.bn.mean[...], np.zeros(3))
  np.testing.assert_array_equal(model.bn.var[...], np.ones(3))


def test_recalibrate_nnx_bad_inputs():
  model = NNXInputBN(nnx.Rngs(0))
  x = np.ones((4, 3), np.float32)
  with pytest.raises(TypeError, match=r"holds its own variables"):
    recalibrate_batch_stats(model, {"params": {}}, [x])
  with pytest.raises(TypeError, match=r"holds its own variables.*mapping"):
    recalibrate_batch_stats(model, {"params": {}})
  with pytest.raises(TypeError, match=r"batches is missing"):
    recalibrate_batch_stats(model)
  with pytest.raises(TypeError, match=r"single array of shape \(4, 3\)"):
    recalibrate_batch_stats(model, x)
  with pytest.raises(ValueError, match=r"batches is empty"):
    recalibrate_batch_stats(model, [])
  with pytest.raises(TypeError, match=r"got a mapping with keys \['image'\]"):
    recalibrate_batch_stats(model, [{"image": x}])
  with pytest.raises(ValueError, match=r"has no nnx.BatchStat"):
    recalibrate_batch_stats(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), [x])
  with pytest.raises(TypeError, match=r"reset"):
    recalibrate_batch_stats(model, [x], reset="yes")

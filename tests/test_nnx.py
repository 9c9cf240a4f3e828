"""Flax NNX: the CrAM train step, the zoo via as_nnx, pruning and fine-tuning."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from readme_snippets import run_readme_block

import cram_jax
from cram_jax import compress
from cram_jax.models import (
    BERT_PRUNABLE,
    RESNET_PRUNABLE,
    RESNET_UNIFORM,
    BasicBlock,
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
    Bottleneck,
    ResNet,
    ResNet8,
    as_nnx,
)


class NNXNet(nnx.Module):
  """Dense -> BatchNorm -> relu -> Dense, in NNX."""

  def __init__(self, rngs):
    self.lin = nnx.Linear(3, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.out = nnx.Linear(8, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.bn(self.lin(x))))


class LinenNet(nn.Module):
  """The same network in Linen, with the same submodule names and defaults."""

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(8, name="lin")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    return nn.Dense(1, name="out")(jax.nn.relu(x))


def mse(model, batch):
  x, y = batch
  return jnp.mean((model(x) - y) ** 2)


def regression_batch(seed=1, n=32):
  x = jax.random.normal(jax.random.key(seed), (n, 3))
  return x, jnp.sin(x).sum(1, keepdims=True)


def pure_dict(state):
  return nnx.to_pure_dict(nnx.as_pure(state))


def make_tx():
  return cram_jax.cram(
      optax.sgd(0.05, momentum=0.9), compress.global_magnitude(0.5), rho=0.1
  )


@nnx.jit
def cram_step(model, optimizer, batch):
  loss, grads = nnx.value_and_grad(mse)(model, batch)
  optimizer.update(
      model, grads, grad_fn=cram_jax.nnx.grad_fn(mse, model, batch)
  )
  return loss


def test_nnx_cram_step_trains():
  model = NNXNet(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
  batch = regression_batch()
  losses = [float(cram_step(model, optimizer, batch)) for _ in range(30)]
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0], losses


def test_nnx_cram_step_matches_linen_step_and_keeps_clean_batch_stats():
  """Oracle: the README's Linen step on the equivalent Linen model."""
  model = NNXNet(nnx.Rngs(0))
  start_params = pure_dict(nnx.state(model, nnx.Param))
  start_stats = pure_dict(nnx.state(model, nnx.BatchStat))
  batch = regression_batch()
  optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
  cram_step(model, optimizer, batch)

  linen = LinenNet()

  def loss_fn(params, batch_stats, batch):
    x, y = batch
    out, updates = linen.apply(
        {"params": params, "batch_stats": batch_stats},
        x,
        train=True,
        mutable=["batch_stats"],
    )
    return jnp.mean((out - y) ** 2), updates["batch_stats"]

  tx = make_tx()
  (_, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      start_params, start_stats, batch
  )

  def grad_fn(p, i=0):
    del i
    return jax.grad(loss_fn, has_aux=True)(p, start_stats, batch)[0]

  updates, _ = tx.update(
      grads, tx.init(start_params), start_params, grad_fn=grad_fn
  )
  expected = optax.apply_updates(start_params, updates)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      pure_dict(nnx.state(model, nnx.Param)),
      expected,
  )
  # The statistics kept are those of the clean pass alone (momentum 0.99):
  # not the start values, not the compressed pass's.
  clean_only = NNXNet(nnx.Rngs(0))
  clean_only(batch[0])
  jax.tree.map(
      lambda a, b, c: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
      pure_dict(nnx.state(model, nnx.BatchStat)),
      pure_dict(nnx.state(clean_only, nnx.BatchStat)),
      new_stats,
  )
  assert not np.allclose(
      model.bn.mean[...], start_stats["bn"]["mean"]
  ), "the clean pass did not update the running mean"


def test_nnx_cram_step_under_plain_jax_jit():
  model = NNXNet(nnx.Rngs(0))
  twin = NNXNet(nnx.Rngs(0))
  batch = regression_batch()
  optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
  graphdef, state = nnx.split(
      (twin, nnx.Optimizer(twin, make_tx(), wrt=nnx.Param))
  )

  @jax.jit
  def step(state, batch):
    m, opt = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(mse)(m, batch)
    opt.update(m, grads, grad_fn=cram_jax.nnx.grad_fn(mse, m, batch))
    return loss, nnx.state((m, opt))

  for _ in range(3):
    cram_step(model, optimizer, batch)
    _, state = step(state, batch)
  twin, _ = nnx.merge(graphdef, state)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      pure_dict(nnx.state(model)),
      pure_dict(nnx.state(twin)),
  )


def test_grad_fn_is_pure_and_matches_contracts():
  model = NNXNet(nnx.Rngs(0))
  batch = regression_batch()
  before = pure_dict(nnx.state(model))
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  g = cram_jax.nnx.grad_fn(mse, model, batch)
  g0 = g(params)
  g1 = g(params, 0)  # optax.contrib.sam's grad_fn(params, i)
  # Oracle: nnx.grad on a copy of the model (train mode, same batch).
  expected = nnx.grad(mse)(nnx.clone(model), batch)
  jax.tree.map(
      np.testing.assert_allclose, nnx.to_pure_dict(g0), pure_dict(expected)
  )
  jax.tree.map(np.testing.assert_array_equal, g0, g1)
  assert jax.tree.structure(g0) == jax.tree.structure(params)
  # The model itself (statistics included) is untouched.
  jax.tree.map(
      np.testing.assert_array_equal, pure_dict(nnx.state(model)), before
  )

  aux = cram_jax.nnx.grad_fn(
      lambda m, b: (mse(m, b), {"n": 1}), model, batch, has_aux=True
  )
  jax.tree.map(np.testing.assert_allclose, aux(params), g0)


def test_grad_fn_bad_inputs():
  model = NNXNet(nnx.Rngs(0))
  with pytest.raises(TypeError, match=r"cram_jax.nnx.grad_fn: loss_fn"):
    cram_jax.nnx.grad_fn(0.5, model)
  with pytest.raises(TypeError, match=r"cram_jax.nnx.grad_fn: model must"):
    cram_jax.nnx.grad_fn(mse, {"params": 1})
  with pytest.raises(TypeError, match=r"has_aux"):
    cram_jax.nnx.grad_fn(mse, model, has_aux="yes")


TINY_BERT = BertConfig(
    vocab_size=50,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=16,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)

ZOO = {
    "ResNet8": (ResNet8(num_classes=10), "image8"),
    "ResNet-basic-cifar": (
        ResNet((1, 1), (4, 8), BasicBlock, num_classes=5, stem="cifar"),
        "image8",
    ),
    "ResNet-bottleneck-imagenet": (
        ResNet((1, 1), (4, 8), Bottleneck, num_classes=5, stem="imagenet"),
        "image16",
    ),
    "BertModel": (BertModel(TINY_BERT), "text"),
    "BertForSequenceClassification": (
        BertForSequenceClassification(TINY_BERT, num_labels=3),
        "text",
    ),
    "BertForQuestionAnswering": (BertForQuestionAnswering(TINY_BERT), "text"),
}


def zoo_inputs(kind):
  key = jax.random.key(7)
  if kind == "text":
    ids = jax.random.randint(key, (2, 8), 0, TINY_BERT.vocab_size)
    return (ids,), {"attention_mask": jnp.ones((2, 8), jnp.int32)}
  size = 8 if kind == "image8" else 16
  return (jax.random.normal(key, (4, size, size, 3)),), {}


def assert_trees_close(a, b):
  jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), a, b
  )


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_as_nnx_matches_linen(name):
  linen, kind = ZOO[name]
  args, kwargs = zoo_inputs(kind)
  variables = linen.init(jax.random.key(0), *args, train=False, **kwargs)
  model = as_nnx(linen, *args, **kwargs)
  # Same parameters from the same init, key for key.
  jax.tree.map(
      np.testing.assert_array_equal,
      pure_dict(nnx.state(model, nnx.Param)),
      variables["params"],
  )
  forward = nnx.jit(lambda m, *a, **k: m(*a, **k), static_argnames="train")
  assert_trees_close(
      forward(model, *args, train=False, **kwargs),
      linen.apply(variables, *args, train=False, **kwargs),
  )
  out, updates = linen.apply(
      variables, *args, train=True, mutable=["batch_stats"], **kwargs
  )
  assert_trees_close(forward(model, *args, train=True, **kwargs), out)
  if "batch_stats" in variables:
    # Train mode updated the BatchStat variables in place, as Linen does.
    assert_trees_close(
        pure_dict(nnx.state(model, nnx.BatchStat)), updates["batch_stats"]
    )
    assert_trees_close(
        forward(model, *args, train=False, **kwargs),
        linen.apply(
            {**variables, "batch_stats": updates["batch_stats"]},
            *args,
            train=False,
            **kwargs,
        ),
    )
  # The prunable selections pick the same leaves, on the State with and
  # without its Variable wrappers.
  selections = (
      [BERT_PRUNABLE] if kind == "text" else [RESNET_PRUNABLE, RESNET_UNIFORM]
  )
  for selection in selections:
    want = [p for p, _ in compress.selected(variables["params"], selection)]
    for state in (
        nnx.state(model, nnx.Param),
        nnx.as_pure(nnx.state(model, nnx.Param)),
    ):
      got = [p for p, _ in compress.selected(state, selection)]
      assert got == want


def test_as_nnx_wraps_given_variables_and_dropout_runs():
  config = BertConfig(**{**TINY_BERT.__dict__, "hidden_dropout_prob": 0.5})
  linen = BertForSequenceClassification(config, num_labels=2)
  args, kwargs = zoo_inputs("text")
  variables = linen.init(jax.random.key(3), *args, train=False, **kwargs)
  model = as_nnx(linen, variables=variables)
  assert_trees_close(
      model(*args, train=False, **kwargs),
      linen.apply(variables, *args, train=False, **kwargs),
  )
  a = model(*args, train=True, **kwargs)
  b = model(*args, train=True, **kwargs)
  assert not np.allclose(a, b), "dropout masks should differ between calls"


def test_as_nnx_bad_inputs():
  with pytest.raises(TypeError, match=r"as_nnx: module must be a flax.linen"):
    as_nnx(NNXNet(nnx.Rngs(0)), jnp.zeros((1, 3)))
  with pytest.raises(ValueError, match=r"as_nnx: give a sample input"):
    as_nnx(ResNet8())
  with pytest.raises(TypeError, match=r"as_nnx: variables must be"):
    as_nnx(ResNet8(), variables=[1, 2])
  variables = ResNet8().init(
      jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False
  )
  with pytest.raises(ValueError, match=r"no 'params' collection"):
    as_nnx(ResNet8(), variables=variables["params"])


def images_and_labels(n=16, size=8, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(n, size, size, 3)).astype(np.float32)
  return images, (images.mean(axis=(1, 2, 3)) > 0).astype(np.int32)


def test_nnx_prune_recalibrate_keep_pruned():
  model = NNXNet(nnx.Rngs(0))
  pruned, masks = cram_jax.prune(
      nnx.state(model, nnx.Param), compress.global_magnitude(0.9)
  )
  nnx.update(model, pruned)
  n_prunable = 3 * 8 + 8 * 1  # the two kernels
  kept = sum(int(m.sum()) for m in jax.tree.leaves(masks))
  assert kept == round(0.1 * n_prunable)
  batch = regression_batch()
  assert cram_jax.recalibrate_batch_stats(model, [batch[0]] * 3) is model
  optimizer = nnx.Optimizer(
      model, cram_jax.keep_pruned(optax.sgd(0.1), masks), wrt=nnx.Param
  )

  @nnx.jit
  def step(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(mse)(model, batch)
    optimizer.update(model, grads)
    return loss

  for _ in range(3):
    step(model, optimizer, batch)
  nonzero = 0
  for leaf, mask in zip(
      jax.tree.leaves(pure_dict(nnx.state(model, nnx.Param))),
      jax.tree.leaves(pure_dict(masks), is_leaf=lambda x: x is None),
  ):
    if mask is not None:
      assert np.all(np.asarray(leaf)[~np.asarray(mask)] == 0)
      nonzero += np.count_nonzero(np.asarray(leaf))
  assert 0 < nonzero <= kept


def test_resnet8_nnx_end_to_end():
  """CrAM under nnx.jit, one-shot pruning, BN re-estimation, fine-tuning."""
  images, labels = images_and_labels()
  model = as_nnx(ResNet8(num_classes=2), images[:1])

  def loss_fn(model, batch):
    logits = model(batch["image"], train=True)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["label"]
    ).mean()

  tx = cram_jax.cram(
      optax.sgd(0.05, momentum=0.9),
      compress.global_magnitude([0.5, 0.7]),
      rho=0.05,
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    optimizer.update(
        model, grads, grad_fn=cram_jax.nnx.grad_fn(loss_fn, model, batch)
    )
    return loss

  batch = {"image": images, "label": labels}
  losses = [float(train_step(model, optimizer, batch)) for _ in range(8)]
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses

  pruned, masks = cram_jax.prune(
      nnx.state(model, nnx.Param), compress.global_magnitude(0.9)
  )
  nnx.update(model, pruned)
  report = cram_jax.sparsity_report(pruned, masks)
  assert abs(report.prunable_sparsity - 0.9) < 1e-3
  stats_before = pure_dict(nnx.state(model, nnx.BatchStat))
  cram_jax.recalibrate_batch_stats(
      model,
      cram_jax.calibration_batches(images, num_batches=5, batch_size=8),
  )
  assert not np.allclose(
      stats_before["bn_init"]["mean"],
      model.bn_init["mean"][...],
  )
  finetune = nnx.Optimizer(
      model, cram_jax.keep_pruned(optax.sgd(0.01), masks), wrt=nnx.Param
  )

  @nnx.jit
  def finetune_step(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    optimizer.update(model, grads)
    return loss

  for _ in range(2):
    assert np.isfinite(float(finetune_step(model, finetune, batch)))
  params = pure_dict(nnx.state(model, nnx.Param))
  flat_masks = dict(
      (compress.path_str(p), m)
      for p, m in jax.tree_util.tree_flatten_with_path(
          pure_dict(masks), is_leaf=lambda x: x is None
      )[0]
  )
  zeros = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    mask = flat_masks[compress.path_str(path)]
    if mask is not None:
      assert np.all(np.asarray(leaf)[~np.asarray(mask)] == 0), path
      zeros += int((~np.asarray(mask)).sum())
  assert zeros == report.prunable_zeros


class ReadmeNet(nnx.Module):

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.bn(self.conv(x)))
    return self.head(x.mean(axis=(1, 2)))


def test_readme_nnx_quick_start_runs():
  images, labels = images_and_labels(n=32)
  namespace = {
      "model": ReadmeNet(nnx.Rngs(0)),
      "batches": [
          {"image": images[i : i + 8], "label": labels[i : i + 8]}
          for i in range(0, 32, 8)
      ],
      "images": images,
  }
  run_readme_block("Quick start: Flax NNX", namespace)
  model = namespace["model"]
  assert isinstance(namespace["optimizer"].tx, optax.GradientTransformation)
  kernel = np.asarray(model.conv.kernel[...])
  assert np.count_nonzero(kernel) > 0
  masks = pure_dict(namespace["masks"])
  assert np.all(kernel[~np.asarray(masks["conv"]["kernel"])] == 0)

"""The README's Linen and pmap quick starts, run verbatim (NNX: test_nnx.py).

Each test gives a block only the names the README says it assumes, runs it, and
checks what it computed against an independent computation, so the snippets can
neither go stale nor silently stop doing what the text says.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from parallel_checks import assert_close_relative_to_change
from readme_snippets import run_readme_block

LINEN = "Quick start: a Flax Linen train step with CrAM"
PMAP = "Quick start: data parallel with `pmap`"


class TinyNet(nn.Module):
  """Conv -> BatchNorm -> relu -> mean -> Dense: a zoo-shaped model, tiny."""

  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(8, (3, 3), use_bias=False, name="conv_init")(x)  # as the zoo
    x = nn.BatchNorm(
        use_running_average=not train, momentum=0.9, axis_name=self.bn_axis_name
    )(x)
    return nn.Dense(10, name="head")(nn.relu(x).mean(axis=(1, 2)))


def data(n=64):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(n, 8, 8, 3)).astype(np.float32)
  labels = rng.integers(0, 10, size=n).astype(np.int32)
  return images, labels


def linen_start(model):
  images, _ = data()
  variables = model.init(jax.random.key(0), images[:2], train=False)
  return variables["params"], variables["batch_stats"]


def clean_pass_stats(model, params, batch_stats, batch):
  """Oracle for the kept statistics: the clean forward pass alone."""
  _, updates = model.apply(
      {"params": params, "batch_stats": batch_stats},
      batch["image"],
      train=True,
      mutable=["batch_stats"],
  )
  return updates["batch_stats"]


def test_linen_quick_start_trains_and_keeps_clean_pass_statistics():
  model = TinyNet()
  params, batch_stats = linen_start(model)
  images, labels = data()
  batch = {"image": images[:32], "label": labels[:32]}
  ns = run_readme_block(LINEN, {"model": model, "params": params}, index=0)
  assert isinstance(ns["tx"], optax.GradientTransformationExtraArgs)

  p, stats, opt_state = params, batch_stats, ns["opt_state"]
  losses = []
  for _ in range(6):
    want_stats = clean_pass_stats(model, p, stats, batch)
    p, stats, opt_state, loss = ns["train_step"](p, stats, opt_state, batch)
    # Same forward pass, compiled differently: equal up to float32 rounding
    # (the compressed pass's statistics would differ at the first digit).
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        stats,
        want_stats,
    )
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  assert int(opt_state.count) == 6  # CrAM's state: six CrAM steps were taken


def test_linen_quick_start_prunes_recalibrates_and_fine_tunes():
  model = TinyNet()
  params, batch_stats = linen_start(model)
  images, _ = data()
  # The second block continues the first (its imports), as in one script.
  ns = run_readme_block(LINEN, {"model": model, "params": params}, index=0)
  ns = run_readme_block(
      LINEN,
      {
          **ns,
          "model": model,
          "params": params,
          "batch_stats": batch_stats,
          "train_images": images,
          "my_augment": lambda batch, rng: batch,
          "print": lambda *args: None,  # the report's table, not needed here
      },
      index=1,
  )
  pruned, masks = ns["pruned"], ns["masks"]
  prunable = [m for m in jax.tree.leaves(masks) if m is not None]
  total = sum(m.size for m in prunable)
  assert sum(int(m.sum()) for m in prunable) == round(0.1 * total)
  kernel = np.asarray(pruned["head"]["kernel"])
  assert np.all(kernel[~np.asarray(masks["head"]["kernel"])] == 0)
  # Re-estimated statistics: reset, then the EMA over the calibration batches.
  new_stats = ns["variables"]["batch_stats"]
  assert not np.allclose(
      new_stats["BatchNorm_0"]["mean"], batch_stats["BatchNorm_0"]["mean"]
  )
  # The fine-tuning transformation keeps pruned weights at exactly zero.
  tx = ns["tx"]
  grads = jax.tree.map(jnp.ones_like, pruned)
  updates, _ = tx.update(grads, tx.init(pruned), pruned)
  tuned = optax.apply_updates(pruned, updates)
  kernel = np.asarray(tuned["head"]["kernel"])
  assert np.all(kernel[~np.asarray(masks["head"]["kernel"])] == 0)


def test_pmap_quick_start_equals_the_linen_step_on_the_whole_batch():
  n = jax.local_device_count()
  assert n == 8, "conftest sets 8 simulated CPU devices"
  images, labels = data()
  batch = {"image": images[:32], "label": labels[:32]}

  # The reference: the Linen quick start under jit, one device, whole batch.
  single = TinyNet()
  params, batch_stats = linen_start(single)
  ns = run_readme_block(LINEN, {"model": single, "params": params}, index=0)
  want = ns["train_step"](params, batch_stats, ns["opt_state"], batch)

  # As in one script: the Linen block's loss_fn and base, then the pmap block;
  # loss_fn reads the global `model`, here the one with bn_axis_name.
  split = jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), batch)
  ns = run_readme_block(
      LINEN, {"model": TinyNet(bn_axis_name="batch"), "params": params}, index=0
  )
  ns.update(batch_stats=batch_stats, batch=split)
  run_readme_block(PMAP, ns)
  got = (ns["params"], ns["batch_stats"], ns["opt_state"], ns["loss"])
  for leaf in jax.tree.leaves(got):  # every replica holds the same state
    assert all(np.array_equal(leaf[0], leaf[i]) for i in range(n))
  got = jax.tree.map(lambda x: x[0], got)
  # Two programs, one step: compared relative to how far each leaf moved.
  assert_close_relative_to_change(got[0], want[0], params, "params")
  assert_close_relative_to_change(got[1], want[1], batch_stats, "batch_stats")
  np.testing.assert_allclose(got[3], want[3], rtol=1e-5)

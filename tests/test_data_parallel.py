"""Data parallelism gives the single-device answer (docs/method.md section 6).

With 8 simulated CPU devices (tests/conftest.py): the runner's CrAM step on 1 device,
on an 8-device mesh under `jit`, and under `pmap` computes, step after step, the same
mask on every replica and the same update (relative to the update's size: the
three are different programs, see tests/parallel_checks.py), and under `pmap` every
replica computes the same mask at every step.
"""

import compile_cache
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from parallel_checks import (
    LOSS_RTOL,
    assert_close_relative_to_change,
    assert_same_masks,
    masks_by_step,
    spy_on_masks,
)

import cram_jax
from cram_jax import compress
from cram_jax.data import make_pipeline, prepare_digits
from experiments import train
from experiments.configs import digits

STEPS = (
    3  # well-conditioned: rounding is not amplified yet (parallel_checks.py)
)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache_for_this_module(tmp_path_factory):
  """A persistent compilation cache, for this module only.

  Every mode builds its initial state with the same program (checked below):
  compiled once instead of six times. The steps, which hold the mask spy's
  host callback, are never cached. Config and cache state are restored
  afterwards.
  """
  with compile_cache.cache_in(tmp_path_factory.mktemp("jax_cache")):
    yield


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  prepare_digits(str(path))
  return str(path)


def run_config(digits_dir, method, parallel, num_devices):
  """The demo's recipe (lr 0.05, rho 0.05, batch 64), on 1 or 8 devices."""
  config = digits.get_config(method)
  config.data_dir = digits_dir
  config.parallel, config.num_devices = parallel, num_devices
  config.batch_size, config.eval_batch_size = 64, 120
  config.progress = False
  return config


def train_steps(config):
  """The runner's compiled step, `STEPS` times on the runner's data.

  Returns the initial host state and, per step, the host state (pmap: replica
  0's), the masks every replica computed, and the mean loss.
  """
  with pytest.MonkeyPatch.context() as patch:  # the optimiser is built here
    mask_log = spy_on_masks(patch)
    run = train.build(config)
  kwargs = train.train_data_kwargs(config, run.process_batch_size)
  pipeline = make_pipeline(config.dataset, config.train_split, **kwargs)
  batches = [train.device_keys(run.task, next(pipeline)) for _ in range(STEPS)]
  initial = jax.device_get(train.init_state(run, batches[0]))
  state = run.parallel.place_state(initial)
  step = run.parallel.compile_step(train.make_train_step(run))
  states, losses = [], []
  for batch in batches:
    state, metrics = step(state, run.parallel.place_batch(batch))
    jax.block_until_ready(state)  # every replica's step, its callback included
    states.append(jax.device_get(run.parallel.host_state(state)))
    losses.append(float(np.mean(jax.device_get(metrics)["loss"])))
  jax.effects_barrier()
  masks = masks_by_step(mask_log, run.parallel)
  if config.optimizer.wrapper != "cram":
    assert not masks  # no compressor
    masks = [[] for _ in range(STEPS)]
  assert len(masks) == STEPS
  return initial, states, masks, losses


# Both rely on the runner's step to average the clean gradient; CrAM also
# averages its compressed-point gradient (batch_axis_name) under pmap.
@pytest.mark.parametrize("method", ["cram+-multi", "sgd"])
def test_one_device_mesh_and_pmap_take_the_same_steps(digits_dir, method):
  assert jax.device_count() == 8
  runs = {
      name: train_steps(run_config(digits_dir, method, parallel, devices))
      for name, parallel, devices in (
          ("single", "jit", 1),
          ("mesh", "jit", 8),
          ("pmap", "pmap", 8),
      )
  }
  initial, want_states, want_masks, want_losses = runs["single"]
  for name in ("mesh", "pmap"):
    start, states, masks, losses = runs[name]
    # The same program builds the initial state in every mode.
    jax.tree.map(np.testing.assert_array_equal, start, initial)
    for t in range(STEPS):
      where = f"{name}, step {t + 1}"
      got, want = states[t], want_states[t]
      assert int(got["step"]) == int(want["step"]) == t + 1, where
      if method.startswith("cram"):
        assert_same_masks(
            masks[t], want_masks[t], 8 if name == "pmap" else 1, where
        )
        # Discrete state: CrAM's counter and the key that samples the sparsity.
        assert int(got["opt_state"].count) == t + 1, where
        np.testing.assert_array_equal(
            got["opt_state"].key, want["opt_state"].key, err_msg=where
        )
      else:
        assert not masks[t], where
      # Params, BatchNorm statistics, and the momentum (which starts at zero, so
      # its tolerance is relative to its own size).
      for part in ("params", "batch_stats", "opt_state"):
        assert_close_relative_to_change(
            got[part], want[part], initial[part], f"{where}: {part}"
        )
      assert losses[t] == pytest.approx(want_losses[t], rel=LOSS_RTOL), where


def test_every_replica_computes_the_same_mask_under_pmap():
  n = jax.local_device_count()
  seen = (
      []
  )  # (step, replica, mask digest), filled by a host callback per replica

  base = compress.global_magnitude([0.5, 0.7, 0.9])

  def spying_compressor(params, key):
    out, masks = base(params, key)
    flat = jnp.concatenate([m.ravel() for m in jax.tree.leaves(masks)])
    jax.debug.callback(
        lambda i, f: seen.append((int(i), np.packbits(f).tobytes())),
        jax.lax.axis_index("batch"),
        flat,
    )
    return out, masks

  tx = cram_jax.cram(
      optax.sgd(0.1), spying_compressor, rho=0.5, batch_axis_name="batch"
  )
  rng = np.random.default_rng(0)
  params = {
      "w1": rng.normal(size=(6, 16)).astype(np.float32),
      "w2": rng.normal(size=(16, 3)).astype(np.float32),
  }

  def loss(p, x, y):
    return jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2)

  def step(p, s, x, y):
    # Each replica: its own shard's gradient. As for optax's SAM, the caller
    # averages the clean one and cram (batch_axis_name) the second.
    grad_fn = jax.grad(lambda q, _: loss(q, x, y))
    grads = jax.lax.pmean(grad_fn(p, 0), "batch")
    updates, s = tx.update(grads, s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, updates), s

  pstep = jax.pmap(step, axis_name="batch")
  replicated = jax.tree.map(lambda w: np.stack([w] * n), params)
  state = jax.pmap(tx.init)(replicated)
  for t in range(3):
    x = rng.normal(size=(n, 4, 6)).astype(
        np.float32
    )  # different data on every replica
    y = rng.normal(size=(n, 4, 3)).astype(np.float32)
    replicated, state = pstep(replicated, state, x, y)
    jax.block_until_ready(replicated)
    masks_this_step = {digest for _, digest in seen[t * n : (t + 1) * n]}
    assert len(seen) == (t + 1) * n
    assert (
        len(masks_this_step) == 1
    ), f"step {t}: replicas computed different masks"


def test_local_perturbation_gives_each_replica_its_own_mask():
  """m-sharpness is opt-in: with it, replicas with different data perturb differently."""
  n = jax.local_device_count()
  seen = []
  base = compress.global_magnitude(0.5)

  def spying_compressor(params, key):
    out, masks = base(params, key)
    flat = jnp.concatenate([m.ravel() for m in jax.tree.leaves(masks)])
    jax.debug.callback(lambda f: seen.append(np.packbits(f).tobytes()), flat)
    return out, masks

  tx = cram_jax.cram(
      optax.sgd(0.1),
      spying_compressor,
      rho=5.0,
      batch_axis_name="batch",
      local_perturbation=True,
  )
  rng = np.random.default_rng(1)
  w = rng.normal(size=(8, 8)).astype(np.float32) * 0.1

  def step(p, s, x):
    grad_fn = jax.grad(lambda q, _: jnp.mean((x @ q["w"]) ** 2))
    # m-sharpness: the caller passes its LOCAL clean gradient (no pmean).
    updates, s = tx.update(grad_fn(p, 0), s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, updates), s

  replicated = {"w": np.stack([w] * n)}
  state = jax.pmap(tx.init)(replicated)
  x = rng.normal(size=(n, 4, 8)).astype(np.float32) * 10
  new, _ = jax.pmap(step, axis_name="batch")(replicated, state, x)
  jax.block_until_ready(new)
  assert len(set(seen)) > 1
  # The update G still averages over replicas: the params stay replicated.
  assert all(np.array_equal(new["w"][0], new["w"][i]) for i in range(n))
  assert not np.array_equal(new["w"][0], w)

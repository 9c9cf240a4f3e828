"""Data parallelism gives the single-device answer (docs/method.md section 6).

With 8 simulated CPU devices (tests/conftest.py): a few CrAM steps of the runner on
1 device, on an 8-device mesh under `jit`, and under `pmap` end at the same params,
and under `pmap` every replica computes the same mask at every step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cram_jax
from cram_jax import compress
from cram_jax.data import prepare_digits
from experiments import train
from experiments.configs import digits


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  prepare_digits(str(path))
  return str(path)


def run_config(digits_dir, parallel, num_devices):
  config = digits.get_config("cram+-multi")
  config.data_dir = digits_dir
  config.parallel, config.num_devices = parallel, num_devices
  config.batch_size, config.eval_batch_size = 64, 120
  config.num_train_steps, config.checkpoint_every_steps = 4, 4
  config.log_every_steps, config.progress = 2, False
  return config


def test_one_device_mesh_and_pmap_reach_the_same_params(digits_dir, tmp_path):
  assert jax.device_count() == 8
  finals = {}
  for name, parallel, devices in (
      ("single", "jit", 1),
      ("mesh", "jit", 8),
      ("pmap", "pmap", 8),
  ):
    config = run_config(digits_dir, parallel, devices)
    summary = train.train_and_evaluate(config, str(tmp_path / name))
    assert summary["status"] == "completed" and summary["step"] == 4
    finals[name] = train.load_final(str(tmp_path / name), config)[1]
  for name in ("mesh", "pmap"):
    for part in ("params", "batch_stats"):
      jax.tree.map(
          lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
          finals[name][part],
          finals["single"][part],
      )
  # The runs trained: the CrAM step count moved.
  assert int(finals["pmap"]["opt_state"].count) == 4


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

"""`config.parallel='fsdp'`: params and optimizer state sharded (docs/scaling.md).

On 8 simulated CPU devices (tests/conftest.py): the placement rule on hand-made
shapes; the runner's SGD and CrAM+-Multi steps on digits ResNet-8 take the steps
`jit` on one device takes (relative to the change, masks exactly; see
tests/parallel_checks.py), with about 1/8 of the state per device, and so does
SAM's on an MLP, whose CrAM+ step needs at most one parameter copy more
temporary memory than SAM's; a sharded
state saves and restores with orbax without a gather, its per-shard digests
catch a corrupted shard, and it restores into other modes' placements; and the
runner trains digits and tiny BERT under `fsdp` and resumes bitwise after
SIGKILL.
"""

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import types

import compile_cache
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_experiments_e2e
from jax.sharding import PartitionSpec as P
from parallel_checks import (
    LOSS_RTOL,
    assert_close_relative_to_change,
    assert_same_masks,
    masks_by_step,
    spy_on_masks,
)
from test_resume import last_logged_step

from cram_jax.data import make_pipeline, prepare_digits
from experiments import checkpointing, cli, optimizers, train
from experiments import parallel as parallel_lib
from experiments.checkpointing import Checkpointer
from experiments.configs import digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2  # well-conditioned (parallel_checks.py)
N = 8


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  prepare_digits(str(path))
  return str(path)


# ------------------------------------------------------------------ the rule


@pytest.mark.parametrize(
    "shape, spec",
    [
        ((), P()),  # scalar
        ((2,), P()),  # a PRNG key's data
        ((1000,), P()),  # below 1024 elements
        ((1024,), P("batch")),
        ((3, 3, 16, 32), P(None, None, None, "batch")),  # largest: 32
        ((3, 3, 64, 64), P(None, None, None, "batch")),  # tie: the last axis
        ((512, 30), P("batch")),  # 30 does not divide by 8
        ((30, 512), P(None, "batch")),
        ((128, 1024), P(None, "batch")),
        ((1024, 128), P("batch")),
        ((100, 100), P()),  # no axis divides by 8
    ],
)
def test_fsdp_spec(shape, spec):
  assert parallel_lib.fsdp_spec(shape, N) == spec
  assert parallel_lib.fsdp_spec(shape, 1) == P()


def test_validate_config_takes_fsdp_and_refuses_what_cannot_work():
  config = digits.get_config("cram+-multi")
  config.parallel = "fsdp"
  train.validate_config(config)
  config.cram.local_perturbation = True  # m-sharpness needs pmap's replicas
  with pytest.raises(cli.ConfigError, match="local_perturbation.*fsdp"):
    train.validate_config(config)
  config.cram.local_perturbation = False
  config.parallel = "zero3"
  with pytest.raises(cli.ConfigError, match="'jit', 'pmap', 'fsdp'.*zero3"):
    train.validate_config(config)


def test_num_devices_is_honoured():
  config = digits.get_config("sgd")
  config.parallel, config.num_devices = "fsdp", 4
  parallel = parallel_lib.make_parallel(config)
  assert isinstance(parallel, parallel_lib.FsdpParallel)
  assert parallel.devices == jax.devices()[:4]
  state = {
      "step": jnp.zeros((), jnp.int32),
      "params": {"w": jax.ShapeDtypeStruct((12, 1024), jnp.float32)},
      "batch_stats": {"mean": jax.ShapeDtypeStruct((1024,), jnp.float32)},
      "opt_state": (jax.ShapeDtypeStruct((12, 1024), jnp.float32),),
      "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
  }
  abstract = parallel.abstract_state(state)
  # Both axes divide by 4: the larger one is split.
  assert abstract["params"]["w"].sharding.spec == P(None, "batch")
  assert abstract["params"]["w"].sharding.mesh.devices.size == 4
  assert abstract["opt_state"][0].sharding == abstract["params"]["w"].sharding
  assert abstract["batch_stats"]["mean"].sharding.spec == P()  # replicated
  config.num_devices = 9
  with pytest.raises(cli.ConfigError, match="num_devices=9"):
    parallel_lib.make_parallel(config)


# ------------------------------------------------------------------ steps


def run_config(digits_dir, method, parallel, num_devices):
  config = digits.get_config(method)
  config.data_dir = digits_dir
  config.parallel, config.num_devices = parallel, num_devices
  config.batch_size, config.eval_batch_size = 64, 120
  config.optimizer.learning_rate = 0.02
  config.progress = False
  return config


def train_steps(config):
  """`STEPS` of the runner's step: initial host state, host states and masks
  per step, losses, and the first placed state and compiled step."""
  with pytest.MonkeyPatch.context() as patch:
    mask_log = spy_on_masks(patch)
    run = train.build(config)
  kwargs = train.train_data_kwargs(config, run.process_batch_size)
  pipeline = make_pipeline(config.dataset, config.train_split, **kwargs)
  batches = [train.device_keys(run.task, next(pipeline)) for _ in range(STEPS)]
  state = train.init_state(run, batches[0])
  initial = run.parallel.host_state(state)
  state = run.parallel.place_state(state)
  placed = [run.parallel.place_batch(b) for b in batches]
  compiled = (
      run.parallel.compile_step(train.make_train_step(run))
      .lower(state, placed[0])
      .compile()
  )
  first = jax.tree.map(lambda x: x.sharding, state)
  states, losses = [], []
  for batch in placed:
    state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    # The shardings are fixed: every step hands back the placement it took.
    assert jax.tree.map(lambda x: x.sharding, state) == first
    states.append(run.parallel.host_state(state))
    losses.append(float(np.mean(jax.device_get(metrics)["loss"])))
  jax.effects_barrier()
  masks = masks_by_step(mask_log, run.parallel)
  return dict(
      run=run,
      initial=initial,
      states=states,
      masks=masks,
      losses=losses,
      compiled=compiled,
      placed=state,
      batch=placed[-1],
  )


@pytest.fixture(scope="module", params=["sgd", "cram+-multi"])
def both_modes(request, digits_dir):
  return request.param, {
      mode: train_steps(run_config(digits_dir, request.param, mode, devices))
      for mode, devices in (("jit", 1), ("fsdp", N))
  }


def test_fsdp_takes_the_steps_jit_takes(both_modes):
  method, runs = both_modes
  want, got = runs["jit"], runs["fsdp"]
  # One program builds the initial state, sharded or not.
  jax.tree.map(np.testing.assert_array_equal, got["initial"], want["initial"])
  for t in range(STEPS):
    where = f"fsdp, step {t + 1}"
    g, w = got["states"][t], want["states"][t]
    assert int(g["step"]) == int(w["step"]) == t + 1, where
    if method.startswith("cram"):
      assert len(got["masks"]) == len(want["masks"]) == STEPS
      assert_same_masks(got["masks"][t], want["masks"][t], 1, where)
      assert int(g["opt_state"].count) == t + 1, where
      np.testing.assert_array_equal(
          g["opt_state"].key, w["opt_state"].key, err_msg=where
      )
    else:
      assert not got["masks"] and not want["masks"]
    for part in ("params", "batch_stats", "opt_state"):
      assert_close_relative_to_change(
          g[part], w[part], want["initial"][part], f"{where}: {part}"
      )
    assert got["losses"][t] == pytest.approx(
        want["losses"][t], rel=LOSS_RTOL
    ), where


def state_bytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def device_bytes(tree, device):
  return sum(
      s.data.size * s.data.dtype.itemsize
      for x in jax.tree.leaves(tree)
      for s in x.addressable_shards
      if s.device == device
  )


# Replicated small leaves (BatchNorm vectors, the 64x10 head, the stem, CrAM's
# key) of ResNet-8's params and momentum: 15.8 KB on every device.
SLACK = 16 * 1024


def test_fsdp_holds_about_one_eighth_of_the_state_per_device(both_modes):
  _, runs = both_modes
  fsdp = runs["fsdp"]
  state = fsdp["placed"]
  sharded = {k: state[k] for k in ("params", "opt_state")}
  total = state_bytes(sharded)
  bound = total / N * 1.3 + SLACK
  assert total > 8 * SLACK  # the bound could not hold if it were replicated
  for device in jax.devices():
    assert device_bytes(sharded, device) <= bound, device
  # The compiled step takes and returns the same per-device share (plus the
  # replicated step/rng/BatchNorm statistics and this device's batch rows).
  memory = fsdp["compiled"].memory_analysis()
  rest = state_bytes({k: state[k] for k in ("step", "rng", "batch_stats")})
  batch = 64 * 8 * 8 * 4 // N + 64 * 4 // N
  assert memory.argument_size_in_bytes <= bound + rest + batch
  assert memory.output_size_in_bytes <= bound + rest + 1024
  # Under jit on one device the same state is all there.
  jit_memory = runs["jit"]["compiled"].memory_analysis()
  assert jit_memory.argument_size_in_bytes >= total


WIDTH, LAYERS = 256, 4  # params (1 MiB) dominate a batch of 16 rows


def mlp_loss(params, batch_stats, batch, rng):
  del rng
  h = batch["x"]
  for i in range(LAYERS):
    h = jnp.tanh(h @ params[f"l{i}"]["kernel"])
  loss = jnp.mean((h - batch["y"]) ** 2)
  return loss, (batch_stats, {"loss": loss})


def mlp_step(method, parallel, num_devices):
  """The runner's step of `method` on an MLP: (compiled step, placed state,
  placed batch, host state) under `parallel` on `num_devices` devices."""
  config = digits.get_config(method)
  config.parallel, config.num_devices = parallel, num_devices
  config.optimizer.learning_rate = 0.02
  parallel = parallel_lib.make_parallel(config)
  tx = optimizers.make_optimizer(config, 10)
  task = types.SimpleNamespace(loss=mlp_loss)
  run = train.Run(config, parallel, task, 10, 10, 16, tx)
  rng = np.random.default_rng(0)
  params = {
      f"l{i}": {
          "kernel": rng.normal(size=(WIDTH, WIDTH)).astype(np.float32) / 16
      }
      for i in range(LAYERS)
  }
  host = {
      "step": np.int32(0),
      "params": params,
      "batch_stats": {},
      "opt_state": jax.device_get(tx.init(params)),
      "rng": np.zeros(2, np.uint32),
  }
  batch = {
      k: rng.normal(size=(16, WIDTH)).astype(np.float32) for k in ("x", "y")
  }
  state = parallel.place_state(host)
  batch = parallel.place_batch(batch)
  step = parallel.compile_step(train.make_train_step(run))
  return step.lower(state, batch).compile(), state, batch, host


def test_sam_under_fsdp_takes_the_steps_jit_takes():
  fsdp, state, batch, initial = mlp_step("sam", "fsdp", N)
  jit, reference, jit_batch, _ = mlp_step("sam", "jit", 1)
  assert "batch" in state["params"]["l0"]["kernel"].sharding.spec
  for t in range(STEPS):  # SAM's sync period is 2: both of its phases
    state, _ = fsdp(state, batch)
    reference, _ = jit(reference, jit_batch)
    where = f"sam, step {t + 1}"
    assert_close_relative_to_change(
        jax.device_get(state["params"]),
        jax.device_get(reference["params"]),
        initial["params"],
        where,
    )
    # SAM's counters exactly; its base optimizer's momentum like the params.
    for g, w, x0 in zip(
        *(
            jax.tree.leaves(jax.device_get(tree["opt_state"]))
            for tree in (state, reference, initial)
        )
    ):
      if np.issubdtype(np.asarray(w).dtype, np.integer):
        np.testing.assert_array_equal(g, w, err_msg=where)
      else:
        assert_close_relative_to_change(g, w, x0, f"{where}: momentum")


def test_cram_plus_peak_is_within_one_param_copy_of_sams():
  # Measured at 4x256^2 and 4x1024^2: CrAM+ - SAM = 0.32 of the unsharded
  # params (docs/scaling.md); keeping any more full copies breaks the bound.
  param_bytes = LAYERS * WIDTH * WIDTH * 4
  sam, cram_plus = (
      mlp_step(method, "fsdp", N)[0].memory_analysis().temp_size_in_bytes
      for method in ("sam", "cram+-multi")
  )
  assert cram_plus <= sam + param_bytes, (sam, cram_plus, param_bytes)


# ------------------------------------------------------------------ checkpoints


def manifest_path(directory, step):
  """Where orbax's JsonSave puts the Checkpointer's manifest item."""
  return os.path.join(directory, str(step), "manifest", "metadata")


def sharded_state():
  """A small runner-like state placed by `fsdp` on 8 devices."""
  parallel = parallel_lib.FsdpParallel(jax.devices()[:N])
  rng = np.random.default_rng(0)
  host = {
      "step": np.int32(7),
      "params": {
          "w": rng.normal(size=(32, 64)).astype(np.float32),
          "b": rng.normal(size=(64,)).astype(np.float32),
      },
      "batch_stats": {"mean": rng.normal(size=(64,)).astype(np.float32)},
      "opt_state": {"m": rng.normal(size=(32, 64)).astype(np.float32)},
      "rng": np.array([1, 2], np.uint32),
  }
  return parallel, host, parallel.place_state(host)


@pytest.mark.parametrize("chunk", [None, 1000])
def test_sharded_checkpoint_saves_shards_and_restores_into_any_placement(
    tmp_path, monkeypatch, chunk
):
  if chunk:  # hashed a shard or two at a time
    monkeypatch.setattr(checkpointing, "_HASH_CHUNK_BYTES", chunk)
  parallel, host, state = sharded_state()
  assert state["params"]["w"].sharding.spec == P(None, "batch")
  assert state["params"]["b"].sharding.spec == P()  # 64 elements: replicated
  with Checkpointer(tmp_path, every_steps=1, handle_sigterm=False) as ckpt:
    assert ckpt.maybe_save(7, parallel.checkpoint_state(state), {"i": 3})
  manifest_file = manifest_path(tmp_path, 7)
  with open(manifest_file) as f:
    leaves = {
        leaf["path"]: leaf for leaf in json.load(f)["checkpoint"]["leaves"]
    }
  w = leaves["['params']['w']"]
  # One digest per shard, each the sha256 of that block of the host value.
  assert w["sha256"] is None and len(w["shards"]) == N
  for i in range(N):
    block = np.ascontiguousarray(host["params"]["w"][:, 8 * i : 8 * i + 8])
    assert (
        w["shards"][f"0:32,{8 * i}:{8 * i + 8}"]
        == hashlib.sha256(block.tobytes()).hexdigest()
    )
  assert leaves["['params']['b']"]["sha256"] == (
      hashlib.sha256(host["params"]["b"].tobytes()).hexdigest()
  )

  structure = jax.eval_shape(lambda: host)
  with Checkpointer(tmp_path, every_steps=1, handle_sigterm=False) as ckpt:
    step, restored, extra = ckpt.restore_latest(
        parallel.abstract_state(structure)
    )
  assert (step, extra) == (7, {"i": 3})
  jax.tree.map(np.testing.assert_array_equal, restored, host)
  assert jax.tree.map(lambda x: x.sharding, restored) == jax.tree.map(
      lambda x: x.sharding, state
  )
  # To the host (how `jit` and `pmap` restore): every shard digest checked.
  with Checkpointer(tmp_path, every_steps=1, handle_sigterm=False) as ckpt:
    _, on_host, _ = ckpt.restore_latest(structure)
  jax.tree.map(np.testing.assert_array_equal, on_host, host)
  assert isinstance(on_host["params"]["w"], np.ndarray)


def test_a_state_in_other_shardings_is_refused_not_resharded():
  parallel, host, state = sharded_state()
  step = parallel.compile_step(lambda s, b: (s, {"loss": b["x"].mean()}))
  batch = parallel.place_batch({"x": np.ones((8, 2), np.float32)})
  replicated = jax.device_put(host, parallel.replicated)
  with pytest.raises(
      ValueError,
      match=r"fsdp step: leaf 'opt_state/m' is placed as P\(\) over 8 "
      r"devices, not as fsdp places it \(P\(None, 'batch'\) over 8 devices\)",
  ):
    step(replicated, batch)
  # Placed by `place_state`, it runs and hands back the same placement.
  out, _ = step(state, batch)
  assert jax.tree.map(lambda x: x.sharding, out) == jax.tree.map(
      lambda x: x.sharding, parallel.place_state(host)
  )


def test_a_jit_checkpoint_restores_sharded(tmp_path):
  parallel, host, state = sharded_state()
  with Checkpointer(tmp_path, every_steps=1, handle_sigterm=False) as ckpt:
    assert ckpt.maybe_save(1, host)  # what `jit` saves: the host copy
  with Checkpointer(tmp_path, every_steps=1, handle_sigterm=False) as ckpt:
    _, restored, _ = ckpt.restore_latest(
        parallel.abstract_state(jax.eval_shape(lambda: host))
    )
  jax.tree.map(np.testing.assert_array_equal, restored, host)
  assert restored["opt_state"]["m"].sharding == state["opt_state"]["m"].sharding


def test_a_corrupted_shard_is_caught_by_its_digest(tmp_path):
  parallel, host, state = sharded_state()
  with Checkpointer(tmp_path, every_steps=1, handle_sigterm=False) as ckpt:
    ckpt.maybe_save(1, parallel.checkpoint_state(state))
    changed = dict(state, step=state["step"] + 1)
    ckpt.maybe_save(2, parallel.checkpoint_state(changed))
  # A stand-in for bytes that rotted on disk but still decode: the saved
  # manifest's digest of one shard no longer matches.
  manifest_file = manifest_path(tmp_path, 2)
  with open(manifest_file) as f:
    payload = json.load(f)
  for leaf in payload["checkpoint"]["leaves"]:
    if leaf["path"] == "['opt_state']['m']":
      leaf["shards"]["0:32,16:24"] = "0" * 64
  with open(manifest_file, "w") as f:
    json.dump(payload, f)
  with Checkpointer(tmp_path, every_steps=1, handle_sigterm=False) as ckpt:
    with pytest.warns(RuntimeWarning, match=r"shard \[0:32,16:24\]"):
      step, _, _ = ckpt.restore_latest(
          parallel.abstract_state(jax.eval_shape(lambda: host))
      )
  assert step == 1


# ------------------------------------------------------------------ the runner

E2E = {  # steps, checkpoint cadence, the logged step after which to SIGKILL
    "digits": (30, 10, 12),
    "bert": (12, 4, 6),
}


def e2e_config(kind, data_dir):
  """The runner's config for `kind` under `fsdp` on 8 devices (no downloads)."""
  steps, every, _ = E2E[kind]
  if kind == "digits":
    # SGD here (its momentum is sharded state too); BERT resumes CrAM+-Multi.
    config = digits.get_config("sgd")
    config.data_dir = data_dir
  else:
    config = test_experiments_e2e.bert_config(
        data_dir, os.path.join(data_dir, "vocab.txt")
    )
  config.parallel, config.num_devices = "fsdp", N
  config.num_train_steps = steps
  config.checkpoint_every_steps = every
  config.log_every_steps = 1
  config.progress = False
  return config


def data_for(kind, data_dir):
  """A context with `kind`'s data readable under `data_dir`."""
  if kind == "digits":
    return contextlib.nullcontext()
  return test_experiments_e2e.mock_tfds(
      data_dir, examples=test_experiments_e2e.SQUAD_EXAMPLES
  )


def main(argv):
  """`python tests/test_fsdp.py KIND WORKDIR DATA_DIR`: one runner session."""
  kind, workdir, data_dir = argv
  with data_for(kind, data_dir):
    train.train_and_evaluate(e2e_config(kind, data_dir), workdir)


def command(kind, workdir, data_dir):
  return [sys.executable, os.path.abspath(__file__), kind, workdir, data_dir]


def environment(cache_dir):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={N}"
  env["PYTHONPATH"] = os.pathsep.join(
      [ROOT, os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")]
  )
  env["PYTHONUNBUFFERED"] = "1"
  # The three sessions of a test compile the same programs: once is enough.
  env.update(compile_cache.subprocess_env(cache_dir))
  return env


def run_to_completion(kind, workdir, data_dir, cache_dir):
  done = subprocess.run(
      command(kind, workdir, data_dir),
      env=environment(cache_dir),
      capture_output=True,
      text=True,
      timeout=500,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["status"] == "completed"
  assert summary["step"] == E2E[kind][0]


def sigkill(kind, workdir, data_dir, cache_dir):
  steps, _, after = E2E[kind]
  process = subprocess.Popen(
      command(kind, workdir, data_dir),
      env=environment(cache_dir),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
  )
  deadline = time.monotonic() + 400
  while last_logged_step(workdir) < after:
    assert process.poll() is None, process.stderr.read()[-3000:]
    assert time.monotonic() < deadline, "the run did not reach the step in time"
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  assert process.wait(timeout=60) == -signal.SIGKILL
  assert last_logged_step(workdir) < steps, "killed too late to be mid-run"


@pytest.mark.parametrize("kind", ["digits", "bert"])
def test_fsdp_trains_and_resumes_bitwise_after_sigkill(
    kind, digits_dir, tmp_path
):
  data_dir = digits_dir if kind == "digits" else str(tmp_path / "tfds")
  if kind == "bert":
    os.makedirs(data_dir)
    with open(os.path.join(data_dir, "vocab.txt"), "w") as f:
      f.write("\n".join(test_experiments_e2e.VOCAB) + "\n")
  cache = str(tmp_path / "jax_cache")
  reference, resumed = str(tmp_path / "reference"), str(tmp_path / "resumed")
  run_to_completion(kind, reference, data_dir, cache)
  sigkill(kind, resumed, data_dir, cache)
  run_to_completion(kind, resumed, data_dir, cache)

  with data_for(kind, data_dir):
    # On the mesh, as `fsdp` placed it: kernels split over the 8 devices.
    run, on_mesh = train.load_final(resumed, on_devices=True)
    assert run.config.parallel == "fsdp"
    specs = [x.sharding.spec for x in jax.tree.leaves(on_mesh["params"])]
    sharded = [s for s in specs if "batch" in s]
    assert len(sharded) >= 3, specs
    for x in jax.tree.leaves(on_mesh["params"]):
      shard = x.addressable_shards[0].data
      assert shard.size * N == x.size or x.sharding.spec == P()
    # To the host, as `jit` (or one-shot evaluation) restores it.
    got = train.load_final(resumed)[1]
    want = train.load_final(reference)[1]
  assert int(got["step"]) == int(want["step"]) == E2E[kind][0]
  jax.tree.map(np.testing.assert_array_equal, got, want)
  jax.tree.map(
      np.testing.assert_array_equal, run.parallel.host_state(on_mesh), want
  )


if __name__ == "__main__":
  main(sys.argv[1:])

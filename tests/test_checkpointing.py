"""Preemption-safe checkpoints: bitwise round trips, cadence, retention, fallback, SIGTERM."""

import os
import pathlib
import re
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import cram_jax
from experiments.checkpointing import Checkpointer, CorruptCheckpointError


def train_state(seed=0):
  """A state shaped like the trainer's: params, CrAM(SGD) and Adam states, BN stats."""
  rng = np.random.default_rng(seed)
  kernel = rng.normal(size=(64, 64)).astype(np.float32)
  kernel[0, :3] = [
      np.nan,
      -0.0,
      np.inf,
  ]  # bit patterns a float round trip could lose
  params = {
      "dense": {
          "kernel": jnp.asarray(kernel),
          "bias": jnp.asarray(rng.normal(size=(64,)), jnp.bfloat16),
      }
  }
  tx = cram_jax.cram(
      optax.chain(
          optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9)
      ),
      cram_jax.global_magnitude(0.5),
      rho=0.05,
      key=seed,
  )
  opt_state = tx.init(params)
  grads = jax.tree.map(
      lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params
  )
  _, opt_state = tx.update(
      grads, opt_state, params, grad_fn=lambda p, _: grads
  )  # nonzero trace
  return {
      "step": jnp.int32(1),
      "params": params,
      "opt_state": opt_state,  # CrAMState(count int32, key uint32[2], chain state)
      "adam": optax.adam(1e-3).init(params),  # ScaleByAdamState
      "batch_stats": {
          "bn": {
              "mean": jnp.asarray(rng.normal(size=(8,)), jnp.float32),
              "var": jnp.ones((8,), jnp.float32),
          }
      },
      "rng": jax.random.key_data(jax.random.key(seed)),  # raw uint32[2]
  }


def abstract(state):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      state,
  )


def assert_bitwise_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    a, e = np.asarray(a), np.asarray(e)
    assert (a.dtype, a.shape) == (e.dtype, e.shape)
    assert a.tobytes() == e.tobytes()


def step_dirs(directory):
  return sorted(
      int(p.name) for p in pathlib.Path(directory).iterdir() if p.name.isdigit()
  )


def save_steps(directory, steps, **kwargs):
  """Saves train_state(seed=step) at each step; returns the states by step."""
  states = {s: train_state(seed=s) for s in steps}
  with Checkpointer(
      directory, every_steps=1, handle_sigterm=False, **kwargs
  ) as ckpt:
    for s in steps:
      assert ckpt.maybe_save(s, states[s], {"next_index": 10 * s})
  return states


def test_round_trip_is_bitwise(tmp_path):
  state = train_state()
  assert isinstance(state["opt_state"], cram_jax.CrAMState)
  extra = {
      "next_index": 123,
      "config": {"lr": 0.1, "levels": [0.5, 0.7], "name": "cram"},
  }
  with Checkpointer(tmp_path, every_steps=5, handle_sigterm=False) as ckpt:
    assert ckpt.maybe_save(5, state, extra)
  with Checkpointer(tmp_path, every_steps=5, handle_sigterm=False) as ckpt:
    step, restored, restored_extra = ckpt.restore_latest(abstract(state))
  assert step == 5 and restored_extra == extra
  assert_bitwise_equal(restored, state)
  assert isinstance(restored["opt_state"], cram_jax.CrAMState)
  assert restored["opt_state"].count.dtype == jnp.int32
  assert restored["rng"].dtype == jnp.uint32 and isinstance(
      restored["rng"], jax.Array
  )


def test_restore_uses_the_requested_sharding(tmp_path):
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  state = {
      "w": jax.device_put(jnp.arange(32.0).reshape(8, 4), sharding),
      "count": jnp.int32(3),
  }
  with Checkpointer(tmp_path, every_steps=1, handle_sigterm=False) as ckpt:
    ckpt.maybe_save(1, state)
    _, restored, extra = ckpt.restore_latest(abstract(state))
  assert restored["w"].sharding == sharding and extra == {}
  assert_bitwise_equal(restored, state)


def test_cadence_and_keep_last_k(tmp_path):
  state = {"w": jnp.zeros((2,)), "count": jnp.int32(0)}
  with Checkpointer(
      tmp_path, every_steps=3, keep=2, handle_sigterm=False
  ) as ckpt:
    saved = [s for s in range(1, 11) if ckpt.maybe_save(s, state)]
    assert saved == [3, 6, 9]
    assert ckpt.all_steps() == [6, 9] and step_dirs(tmp_path) == [6, 9]
    assert ckpt.maybe_save(10, state, force=True)  # off cadence
    assert step_dirs(tmp_path) == [9, 10]


def test_saving_over_newer_steps_is_refused_but_the_restored_step_is_skipped(
    tmp_path,
):
  save_steps(tmp_path, [1, 2])
  state = train_state()
  with Checkpointer(tmp_path, every_steps=1, handle_sigterm=False) as ckpt:
    with pytest.raises(
        ValueError, match="step 1 is not newer than the latest checkpoint"
    ):
      ckpt.maybe_save(1, state)  # a fresh run pointed at an old directory
    step, _, _ = ckpt.restore_latest(abstract(state))
    assert step == 2 and not ckpt.maybe_save(
        2, state
    )  # resumed from it: already on disk
    assert ckpt.maybe_save(3, state)


def corrupt_array_bytes(step_dir):
  """Flips bytes inside the largest array data file: shapes and metadata stay valid."""
  files = [p for p in (step_dir / "state").glob("ocdbt.process_*/d/*")]
  data = max(files, key=lambda p: p.stat().st_size)
  raw = bytearray(data.read_bytes())
  middle = len(raw) // 2
  raw[middle : middle + 64] = bytes(b ^ 0xFF for b in raw[middle : middle + 64])
  data.write_bytes(bytes(raw))


def test_silently_corrupted_latest_falls_back_to_previous(tmp_path):
  states = save_steps(tmp_path, [1, 2])
  corrupt_array_bytes(tmp_path / "2")
  with Checkpointer(tmp_path, every_steps=1, handle_sigterm=False) as ckpt:
    with pytest.warns(RuntimeWarning, match=r"step 2 .*corrupted.*sha256"):
      step, restored, extra = ckpt.restore_latest(abstract(states[1]))
    assert (step, extra) == (1, {"next_index": 10})
    assert_bitwise_equal(restored, states[1])
    # The corrupted step is moved aside, so training can write step 2 again.
    assert step_dirs(tmp_path) == [1]
    assert [p.name[:2] for p in (tmp_path / "corrupt").iterdir()] == ["2-"]
    assert ckpt.maybe_save(2, states[2])
    assert ckpt.restore_latest(abstract(states[2]))[0] == 2


# When one tensorstore read fails, orbax closes its event loop while sibling reads are
# still in flight; their completion callbacks then hit the closed loop (harmless).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_partial_latest_falls_back_to_previous(tmp_path, caplog):
  states = save_steps(tmp_path, [1, 2, 3])
  for p in (tmp_path / "3" / "state").rglob("*"):
    if p.is_file() and p.parent.name == "d":
      p.unlink()  # array data gone, metadata left
  (tmp_path / "2" / "manifest" / "metadata").unlink()
  with Checkpointer(tmp_path, every_steps=1, handle_sigterm=False) as ckpt:
    with pytest.warns(RuntimeWarning) as record:
      step, restored, _ = ckpt.restore_latest(abstract(states[1]))
  messages = [str(w.message) for w in record]
  assert len(messages) == 2
  assert "step 3 " in messages[0] and "corrupted or incomplete" in messages[0]
  assert "step 2 " in messages[1] and "FileNotFoundError" in messages[1]
  assert (
      "step 3" in caplog.text and "step 2" in caplog.text
  )  # logged as well as warned
  assert step == 1
  assert_bitwise_equal(restored, states[1])


def test_all_corrupt_raises(tmp_path):
  states = save_steps(tmp_path, [1, 2])
  for s in (1, 2):
    corrupt_array_bytes(tmp_path / str(s))
  with Checkpointer(tmp_path, every_steps=1, handle_sigterm=False) as ckpt:
    with (
        pytest.warns(RuntimeWarning),
        pytest.raises(
            CorruptCheckpointError, match="no intact checkpoint.*step 2.*step 1"
        ),
    ):
      ckpt.restore_latest(abstract(states[1]))
  assert step_dirs(tmp_path) == [
      1,
      2,
  ]  # nothing moved when there is nothing to resume from


def test_mismatched_abstract_state_is_an_error_not_corruption(tmp_path):
  states = save_steps(tmp_path, [1])
  wrong = abstract(states[1])
  wrong["params"]["dense"]["bias"] = jax.ShapeDtypeStruct((64,), jnp.float32)
  with Checkpointer(tmp_path, every_steps=1, handle_sigterm=False) as ckpt:
    with pytest.raises(
        ValueError,
        match=re.escape(
            "['params']['dense']['bias']\" is bfloat16(64,) in the checkpoint but float32(64,)"
        ),
    ):
      ckpt.restore_latest(wrong)
  assert step_dirs(tmp_path) == [1]


def send_sigterm_to_self(ckpt):
  os.kill(os.getpid(), signal.SIGTERM)
  deadline = time.monotonic() + 5
  while not ckpt.preempted and time.monotonic() < deadline:
    time.sleep(
        0.01
    )  # Python runs handlers between bytecodes of the main thread
  assert ckpt.preempted


def test_sigterm_forces_a_save_and_close_restores_the_handler(tmp_path):
  def previous(signum, frame):
    del signum, frame

  original = signal.signal(signal.SIGTERM, previous)
  try:
    ckpt = Checkpointer(tmp_path, every_steps=100, handle_sigterm=True)
    state = {"w": jnp.ones((3,)), "count": jnp.int32(7)}
    assert not ckpt.maybe_save(7, state) and not ckpt.preempted
    send_sigterm_to_self(ckpt)
    assert ckpt.maybe_save(8, state, {"next_index": 8})  # off cadence
    assert step_dirs(tmp_path) == [8]
    ckpt.close()
    assert signal.getsignal(signal.SIGTERM) is previous
  finally:
    signal.signal(signal.SIGTERM, original)


def test_no_checkpoint_returns_none(tmp_path):
  with Checkpointer(
      tmp_path / "fresh", every_steps=1, handle_sigterm=False
  ) as ckpt:
    assert (
        ckpt.restore_latest({"w": jax.ShapeDtypeStruct((2,), jnp.float32)})
        is None
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"every_steps": 0}, "every_steps must be an integer >= 1, got 0"),
        ({"every_steps": 1, "keep": 0}, "keep must be an integer >= 1, got 0"),
        ({"every_steps": 2.5}, "every_steps must be an integer >= 1, got 2.5"),
    ],
)
def test_invalid_options(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    Checkpointer(tmp_path, handle_sigterm=False, **kwargs)


def test_extra_must_be_json(tmp_path):
  with Checkpointer(tmp_path, every_steps=1, handle_sigterm=False) as ckpt:
    with pytest.raises(TypeError, match="extra must be JSON-serialisable"):
      ckpt.maybe_save(1, {"w": jnp.zeros(2)}, {"bad": object()})
    assert step_dirs(tmp_path) == []


def test_a_save_killed_midway_is_invisible_and_cleaned_up(tmp_path):
  states = save_steps(tmp_path, [1, 2])
  # What a kill during the save of step 3 leaves: orbax writes into a temporary
  # directory and renames it to "3" only once every file is complete.
  partial = tmp_path / "3.orbax-checkpoint-tmp" / "state"
  partial.mkdir(parents=True)
  (partial / "manifest.ocdbt").write_bytes(b"\x00" * 10)
  with Checkpointer(tmp_path, every_steps=1, handle_sigterm=False) as ckpt:
    assert ckpt.all_steps() == [1, 2]
    assert ckpt.restore_latest(abstract(states[2]))[0] == 2
  assert step_dirs(tmp_path) == [1, 2] and not partial.parent.exists()


def test_preempted_run_resumes_to_the_same_result(tmp_path):
  """The trainer's loop: a run stopped by SIGTERM and resumed equals an uninterrupted one."""
  data = jnp.asarray(np.random.default_rng(0).normal(size=(20, 4)), jnp.float32)
  tx = optax.chain(
      optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9)
  )

  @jax.jit
  def train_step(state, batch):
    grads = jax.grad(lambda p: jnp.sum((p["w"] - batch) ** 2))(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {
        "params": optax.apply_updates(state["params"], updates),
        "opt_state": opt_state,
        "step": state["step"] + 1,
    }

  def run(directory, stop_at=None):
    params = {"w": jnp.zeros((4,))}
    init = {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.int32(0),
    }
    with Checkpointer(directory, every_steps=7) as ckpt:
      step, state, extra = ckpt.restore_latest(abstract(init)) or (
          0,
          init,
          {"next_index": 0},
      )
      index = extra["next_index"]
      while step < 20:
        state, index, step = train_step(state, data[index]), index + 1, step + 1
        if step == stop_at:
          send_sigterm_to_self(ckpt)
        if (
            ckpt.maybe_save(step, state, {"next_index": index})
            and ckpt.preempted
        ):
          return None
    return state

  assert run(tmp_path / "a", stop_at=10) is None
  assert step_dirs(tmp_path / "a") == [7, 10]
  assert_bitwise_equal(run(tmp_path / "a"), run(tmp_path / "b"))


def test_save_due_matches_maybe_save_cadence(tmp_path):
  state = {"w": np.arange(4, dtype=np.float32)}
  with Checkpointer(
      tmp_path / "ckpt", every_steps=3, keep=5, handle_sigterm=False
  ) as ckpt:
    for step in range(1, 8):
      due = ckpt.save_due(step)
      assert due == (step % 3 == 0)
      assert ckpt.maybe_save(step, state) == due
    assert ckpt.save_due(7, force=True)

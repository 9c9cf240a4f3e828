"""AC/DC: phase plan, sparsity per phase, restarts from zero, momentum reset."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cram_jax
from cram_jax import compress

WARMUP, LENGTH, FINAL = 2, 3, 14
STEPS = 18
SPARSITY = 0.75


def params_tree(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "conv": {
          "kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
          "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
      },
      "head": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)},
  }


PRUNABLE = ("conv/kernel", "head/kernel")
N = 3 * 3 * 2 * 4 + 6 * 5
KEPT = round((1 - SPARSITY) * N)


def leaf(tree, path):
  a, b = path.split("/")
  return np.asarray(tree[a][b])


def flat(tree):
  return np.concatenate([leaf(tree, p).ravel() for p in PRUNABLE])


def phase_plan(steps=STEPS, warmup=WARMUP, length=LENGTH, final=FINAL):
  """'D'/'C' per step, spelt out: warm-up, C, D, C, ... then C to the end."""
  plan = ["D"] * warmup
  while len(plan) < final:
    plan += ["C"] * length + ["D"] * length
  plan = plan[:final]
  return plan + ["C"] * (steps - len(plan))


def make(**overrides):
  kwargs = dict(
      sparsity=SPARSITY,
      dense_warmup=WARMUP,
      phase_length=LENGTH,
      final_phase_start=FINAL,
  )
  kwargs.update(overrides)
  optimizer = kwargs.pop("optimizer", optax.sgd(0.1, momentum=0.9))
  return cram_jax.acdc(optimizer, compress.global_magnitude, **kwargs)


def run(tx, params, steps=STEPS, seed=1):
  traces = []

  @jax.jit
  def step(params, state, key):
    traces.append(1)
    grads = jax.tree.map(
        lambda p: 0.3 * jax.random.normal(key, p.shape, p.dtype), params
    )
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, grads

  state = tx.init(params)
  history = [(params, state, None)]
  key = jax.random.key(seed)
  for _ in range(steps):
    key, sub = jax.random.split(key)
    params, state, grads = step(params, state, sub)
    history.append((params, state, grads))
  return history, len(traces)


def test_phase_plan():
  plan = phase_plan()
  assert "".join(plan) == "DDCCCDDDCCCDDDCCCC"
  got = cram_jax.acdc_compressed(
      np.arange(STEPS),
      dense_warmup=WARMUP,
      phase_length=LENGTH,
      final_phase_start=FINAL,
  )
  assert "".join("C" if c else "D" for c in got) == "".join(plan)


def test_phases_masks_and_restarts():
  params = params_tree()
  history, traces = run(make(), params)
  assert traces == 1
  plan = phase_plan()
  for t in range(STEPS):
    before, state_before, _ = history[t]
    after, state, grads = history[t + 1]
    masks = flat(cram_jax.gmp_masks(state))
    values = flat(after)
    if plan[t] == "D":
      assert np.all(values != 0), t  # dense: everything trains
      if t > 0 and plan[t - 1] == "C":
        # Weights pruned in the compressed phase restart from exactly zero:
        # zero before the step, and the step's momentum is the fresh gradient
        # there (zeroed state), so the new value is -lr * g.
        pruned = ~flat(cram_jax.gmp_masks(state_before))
        assert np.all(flat(before)[pruned] == 0)
        g = flat(grads)
        np.testing.assert_array_equal(
            values[pruned], g[pruned] * np.float32(-0.1)
        )
      continue
    assert masks.sum() == KEPT, t
    assert np.all(values[~masks] == 0) and np.all(values[masks] != 0), t
    trace = flat(state.inner_state[0].trace)
    assert np.all(trace[~masks] == 0), t
    starts = t == 0 or plan[t - 1] == "D"
    if starts:
      # New masks from the magnitudes of all current weights (NumPy top-k).
      order = np.argsort(-np.abs(flat(before)), kind="stable")
      oracle = np.zeros(N, bool)
      oracle[order[:KEPT]] = True
      np.testing.assert_array_equal(masks, oracle)
    else:
      np.testing.assert_array_equal(
          masks, flat(cram_jax.gmp_masks(state_before))
      )
  final = history[-1][0]
  assert np.sum(flat(final) == 0) == N - KEPT
  assert np.all(leaf(final, "conv/bias") != 0)


def test_weights_pruned_earlier_compete_again():
  # A large step size: weights move far in a dense phase, so some pruned in
  # the first compressed phase are among the largest at the second one.
  params = params_tree()
  history, _ = run(make(optimizer=optax.sgd(3.0)), params)
  second_start = WARMUP + 2 * LENGTH
  first = flat(cram_jax.gmp_masks(history[WARMUP + 1][1]))
  second = flat(cram_jax.gmp_masks(history[second_start + 1][1]))
  assert np.any(second & ~first)
  order = np.argsort(-np.abs(flat(history[second_start][0])), kind="stable")
  oracle = np.zeros(N, bool)
  oracle[order[:KEPT]] = True
  np.testing.assert_array_equal(second, oracle)


@pytest.mark.parametrize("reset", [False, True])
def test_momentum_reset(reset):
  params = params_tree()
  history, _ = run(make(reset_momentum=reset), params)
  plan = phase_plan()
  changes = [t for t in range(1, STEPS) if plan[t] != plan[t - 1]]
  assert changes == [2, 5, 8, 11, 14]
  for t in changes:
    _, state, grads = history[t + 1]
    masks = flat(cram_jax.gmp_masks(state))
    active = masks if plan[t] == "C" else np.ones(N, bool)
    trace = flat(state.inner_state[0].trace)
    fresh = np.where(active, flat(grads), 0)
    if reset:
      # Momentum restarts: the trace is this step's (masked) gradient.
      np.testing.assert_array_equal(trace, fresh)
    else:
      # Weights kept in both phases carry their momentum over (pruned ones
      # had theirs zeroed when they were pruned).
      assert np.all(trace[masks] != fresh[masks]), t


def test_keep_dense():
  params = params_tree()
  history, _ = run(make(keep_dense=True, optimizer=optax.sgd(0.1)), params)
  plan = phase_plan()
  last_dense = params
  for t in range(STEPS):
    if plan[t] == "C" and (t == 0 or plan[t - 1] == "D"):
      last_dense = history[t][0]  # the weights entering the compressed phase
    kept = cram_jax.acdc_dense_params(history[t + 1][1])
    for p in PRUNABLE:
      np.testing.assert_array_equal(leaf(kept, p), leaf(last_dense, p))
  with pytest.raises(ValueError, match="keep_dense=True"):
    cram_jax.acdc_dense_params(make().init(params))


def test_compressed_from_step_zero_and_adam():
  params = params_tree()
  tx = make(dense_warmup=0, final_phase_start=4, optimizer=optax.adam(0.05))
  history, _ = run(tx, params, steps=6)
  for t in (0, 4, 5):
    state = history[t + 1][1]
    masks = flat(cram_jax.gmp_masks(state))
    assert masks.sum() == KEPT
    adam = state.inner_state[0]
    assert np.all(flat(adam.mu)[~masks] == 0)
    assert np.all(flat(adam.nu)[~masks] == 0)


@pytest.mark.parametrize(
    "args,error,match",
    [
        (dict(sparsity=1.0), ValueError, "acdc: sparsity must be .* got 1.0"),
        (dict(sparsity=-0.5), ValueError, "got -0.5"),
        (dict(sparsity=None), TypeError, "sparsity must be a real number"),
        (dict(dense_warmup=-1), ValueError, "dense_warmup must be >= 0"),
        (dict(phase_length=0), ValueError, "phase_length must be >= 1, got 0"),
        (dict(phase_length=2.0), TypeError, "phase_length must be an int"),
        (dict(final_phase_start=1), ValueError, "final_phase_start=1"),
        (dict(reset_momentum=1), TypeError, "reset_momentum must be True"),
        (dict(keep_dense="yes"), TypeError, "keep_dense must be True"),
    ],
)
def test_bad_options_raise_at_construction(args, error, match):
  with pytest.raises(error, match=match):
    make(**args)


def test_bad_compressor():
  with pytest.raises(
      TypeError, match="acdc: compressor must be the compressor"
  ):
    cram_jax.acdc(
        optax.sgd(0.1),
        compress.global_magnitude(0.9),
        sparsity=0.9,
        dense_warmup=0,
        phase_length=1,
        final_phase_start=4,
    )
  with pytest.raises(TypeError, match="acdc: state must be the ACDCState"):
    params = params_tree()
    make().update(params, optax.sgd(0.1).init(params), params)

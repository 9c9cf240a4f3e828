"""Gradual magnitude pruning: schedule, exact counts, held zeros, state, errors.

The oracles are NumPy: the cubic schedule written out, kept counts as
``round((1 - s) * N)``, top-k by sorting magnitudes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cram_jax
from cram_jax import compress

T0, T1, FREQ = 2, 12, 3  # updates at 2, 5, 8, 11 and 12
STEPS = 16


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


def leaf(tree, path):
  a, b = path.split("/")
  return np.asarray(tree[a][b])


def cubic(t, s_i, s_f, t0=T0, t1=T1, power=3):
  """The schedule, written out independently of the library."""
  if t < t0:
    return 0.0
  if t >= t1:
    return s_f
  return s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** power


def run(tx, params, steps=STEPS, seed=1):
  """``steps`` jitted steps on random gradients; the state after each."""
  traces = []

  @jax.jit
  def step(params, state, key):
    traces.append(1)
    grads = jax.tree.map(
        lambda p: 0.3 * jax.random.normal(key, p.shape, p.dtype), params
    )
    updates, state = tx.update(grads, state, params, grad_fn=None)
    return optax.apply_updates(params, updates), state, grads

  state = tx.init(params)
  history = [(params, state, None)]
  key = jax.random.key(seed)
  for _ in range(steps):
    key, sub = jax.random.split(key)
    params, state, grads = step(params, state, sub)
    history.append((params, state, grads))
  return history, len(traces)


def kept_total(masks):
  return sum(int(np.sum(leaf(masks, p))) for p in PRUNABLE)


N = 3 * 3 * 2 * 4 + 6 * 5


def test_update_steps_rule():
  assert cram_jax.gmp_update_steps(2, 12, 3) == [2, 5, 8, 11, 12]
  assert cram_jax.gmp_update_steps(0, 9, 3) == [0, 3, 6, 9]
  tx = cram_jax.gmp(
      optax.sgd(0.1),
      compress.global_magnitude,
      final_sparsity=0.8,
      begin_step=T0,
      end_step=T1,
      frequency=FREQ,
  )
  assert tx.update_steps == (2, 5, 8, 11, 12)
  np.testing.assert_allclose(
      tx.sparsities, [cubic(t, 0.0, 0.8) for t in (2, 5, 8, 11, 12)]
  )


@pytest.mark.parametrize("s_i,s_f", [(0.0, 0.8), (0.3, 0.9)])
def test_global_gmp_follows_schedule_exactly(s_i, s_f):
  params = params_tree()
  tx = cram_jax.gmp(
      optax.sgd(0.1, momentum=0.9),
      compress.global_magnitude,
      final_sparsity=s_f,
      initial_sparsity=s_i,
      begin_step=T0,
      end_step=T1,
      frequency=FREQ,
  )
  history, traces = run(tx, params)
  assert traces == 1  # one compilation serves every step and every level
  updates = {2, 5, 8, 11, 12}
  for t in range(STEPS):
    before, state_before, _ = history[t]
    after, state, _ = history[t + 1]
    masks = cram_jax.gmp_masks(state)
    assert masks["conv"]["bias"] is None
    old = cram_jax.gmp_masks(state_before)
    expected = round((1 - cubic(max(t, T0), s_i, s_f)) * N) if t >= T0 else N
    # The kept count is the schedule's at the last update step <= t.
    last = max([u for u in updates if u <= t], default=None)
    expected = N if last is None else round((1 - cubic(last, s_i, s_f)) * N)
    assert kept_total(masks) == expected, t
    for p in PRUNABLE:
      m, m_old = leaf(masks, p), leaf(old, p)
      # Pruned weights never come back.
      assert not np.any(m & ~m_old), (t, p)
      # Pruned weights are exactly zero after the step; kept ones are not.
      assert np.all(leaf(after, p)[~m] == 0), (t, p)
      assert np.all(leaf(after, p)[m] != 0), (t, p)
      # Momentum is zero on pruned entries.
      trace = leaf(state.inner_state[0].trace, p)
      assert np.all(trace[~m] == 0), (t, p)
    if t in updates:
      # Top-k by magnitude among the previously kept weights (NumPy sort).
      mags = np.concatenate([np.abs(leaf(before, p)).ravel() for p in PRUNABLE])
      allowed = np.concatenate([leaf(old, p).ravel() for p in PRUNABLE])
      kept = np.concatenate([leaf(masks, p).ravel() for p in PRUNABLE])
      order = np.argsort(-np.where(allowed, mags, -1.0), kind="stable")
      oracle = np.zeros(N, bool)
      oracle[order[:expected]] = True
      np.testing.assert_array_equal(kept, oracle)
    else:
      for p in PRUNABLE:
        np.testing.assert_array_equal(leaf(masks, p), leaf(old, p))
  final = history[-1][0]
  zeros = sum(int(np.sum(leaf(final, p) == 0)) for p in PRUNABLE)
  assert zeros == N - round((1 - s_f) * N)
  assert np.all(leaf(final, "conv/bias") != 0)  # not pruned


def test_dense_before_begin_step():
  params = params_tree()
  tx = cram_jax.gmp(
      optax.sgd(0.1),
      compress.global_magnitude,
      final_sparsity=0.5,
      initial_sparsity=0.2,
      begin_step=4,
      end_step=8,
      frequency=2,
  )
  history, _ = run(tx, params, steps=5)
  for t in range(4):
    assert kept_total(cram_jax.gmp_masks(history[t + 1][1])) == N
    assert all(np.all(leaf(history[t + 1][0], p) != 0) for p in PRUNABLE)
  # The jump of initial_sparsity at t0.
  assert kept_total(cram_jax.gmp_masks(history[5][1])) == round(0.8 * N)


def test_layerwise_erk_family_and_adam_state():
  params = params_tree()
  family = lambda s: compress.layerwise_magnitude(compress.erk(s))  # noqa: E731
  tx = cram_jax.gmp(
      optax.adam(0.05),
      family,
      final_sparsity=0.7,
      begin_step=0,
      end_step=6,
      frequency=2,
  )
  history, traces = run(tx, params, steps=8)
  assert traces == 1
  for t in range(8):
    state = history[t + 1][1]
    masks = cram_jax.gmp_masks(state)
    adam = state.inner_state[0]
    for p in PRUNABLE:
      m = leaf(masks, p)
      assert np.all(leaf(adam.mu, p)[~m] == 0)
      assert np.all(leaf(adam.nu, p)[~m] == 0)
      assert np.all(leaf(history[t + 1][0], p)[~m] == 0)
  # Final per-leaf counts: ERK's split of 70%, the count written out here.
  # ERK density of a leaf is proportional to sum(shape) / prod(shape).
  shapes = {"conv/kernel": (3, 3, 2, 4), "head/kernel": (6, 5)}
  sizes = {p: int(np.prod(s)) for p, s in shapes.items()}
  raw = {p: sum(s) / np.prod(s) for p, s in shapes.items()}
  eps = round(0.3 * N) / sum(raw[p] * sizes[p] for p in shapes)
  dens = {p: min(1.0, eps * raw[p]) for p in shapes}
  assert all(d < 1 for d in dens.values())  # no leaf saturates here
  final_masks = cram_jax.gmp_masks(history[-1][1])
  counts = {p: int(np.sum(leaf(final_masks, p))) for p in PRUNABLE}
  assert sum(counts.values()) == round(0.3 * N)
  for p in PRUNABLE:
    assert abs(counts[p] - dens[p] * sizes[p]) <= 1, (p, counts, dens)


def test_kept_weights_that_are_exactly_zero_stay_ahead_of_pruned_ones():
  params = params_tree()
  # A kept weight at exactly 0 must not lose its place to a pruned weight
  # (both have magnitude 0): the mask still only shrinks, counts stay exact.
  kernel = np.array(params["head"]["kernel"])
  kernel[0, :] = 0.0
  params["head"]["kernel"] = jnp.asarray(kernel)
  tx = cram_jax.gmp(
      optax.sgd(0.0),  # no movement: the zeros stay zeros
      compress.global_magnitude,
      final_sparsity=0.95,
      begin_step=0,
      end_step=4,
      frequency=1,
      power=1.0,
  )
  history, _ = run(tx, params, steps=5)
  for t in range(5):
    old = cram_jax.gmp_masks(history[t][1])
    new = cram_jax.gmp_masks(history[t + 1][1])
    assert kept_total(new) == round((1 - cubic(t, 0, 0.95, 0, 4, 1)) * N)
    for p in PRUNABLE:
      assert not np.any(leaf(new, p) & ~leaf(old, p)), (t, p)


def test_custom_schedule_and_masks_in_a_chain():
  params = params_tree()
  values = {0: 0.5, 1: 0.5, 2: 0.6, 3: 0.9}
  tx = cram_jax.gmp(
      optax.sgd(0.1),
      compress.global_magnitude,
      begin_step=0,
      end_step=3,
      frequency=1,
      schedule=lambda t: values[t],
  )
  assert tx.sparsities == (0.5, 0.5, 0.6, 0.9)
  chained = optax.chain(optax.clip(10.0), tx)
  history, _ = run(chained, params, steps=4)
  for t in range(4):
    assert kept_total(cram_jax.gmp_masks(history[t + 1][1])) == round(
        (1 - values[t]) * N
    )


def test_grad_fn_and_extra_args_pass_through():
  params = params_tree()
  tx = cram_jax.gmp(
      optax.sgd(0.1),
      compress.global_magnitude,
      final_sparsity=0.5,
      begin_step=0,
      end_step=1,
      frequency=1,
  )
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params, grad_fn=lambda p, _: p)
  assert jax.tree.structure(updates) == jax.tree.structure(params)


def gmp_kwargs(**overrides):
  kwargs = dict(final_sparsity=0.9, begin_step=0, end_step=10, frequency=2)
  kwargs.update(overrides)
  return kwargs


@pytest.mark.parametrize(
    "args,error,match",
    [
        (dict(begin_step=10, end_step=10), ValueError, "begin_step must be <"),
        (dict(begin_step=11), ValueError, "begin_step=11, end_step=10"),
        (dict(begin_step=-1), ValueError, "begin_step must be >= 0, got -1"),
        (dict(begin_step=1.5), TypeError, "begin_step must be an int"),
        (dict(frequency=0), ValueError, "frequency must be >= 1, got 0"),
        (dict(frequency=True), TypeError, "frequency must be an int"),
        (dict(final_sparsity=1.0), ValueError, "in \\[0, 1\\), got 1.0"),
        (dict(final_sparsity=-0.1), ValueError, "got -0.1"),
        (dict(final_sparsity=float("nan")), ValueError, "got nan"),
        (dict(final_sparsity="0.9"), TypeError, "final_sparsity must be a"),
        (dict(final_sparsity=None), TypeError, "final_sparsity= is required"),
        (dict(initial_sparsity=0.95), ValueError, "0.95 > 0.9"),
        (dict(power=0.0), ValueError, "power must be a finite number > 0"),
        (dict(schedule=0.5), TypeError, "schedule must be a callable"),
        (
            dict(schedule=lambda t: 0.9 - t / 100),
            ValueError,
            "schedule must never decrease",
        ),
        (dict(schedule=lambda t: 1.0), ValueError, "schedule\\(0\\)"),
        (dict(schedule=lambda t: 0.5), ValueError, "final_sparsity=0.9 but"),
        (
            dict(schedule=lambda t: 0.9, initial_sparsity=0.1),
            ValueError,
            "with schedule= put them into the schedule",
        ),
    ],
)
def test_bad_options_raise_at_construction(args, error, match):
  with pytest.raises(error, match=match):
    cram_jax.gmp(
        optax.sgd(0.1), compress.global_magnitude, **gmp_kwargs(**args)
    )


def test_bad_compressors_and_optimizers():
  with pytest.raises(TypeError, match="compressor must be a compressor family"):
    cram_jax.gmp(optax.sgd(0.1), 0.9, **gmp_kwargs())
  with pytest.raises(TypeError, match="not global_magnitude\\(0.9\\)"):
    cram_jax.gmp(optax.sgd(0.1), compress.global_magnitude(0.9), **gmp_kwargs())
  with pytest.raises(TypeError, match="takes level="):
    cram_jax.gmp(
        optax.sgd(0.1), lambda s: compress.n_of_m(2, 4), **gmp_kwargs()
    )
  with pytest.raises(TypeError, match="did you mean optax.sgd"):
    cram_jax.gmp(optax.sgd, compress.global_magnitude, **gmp_kwargs())
  tx = cram_jax.gmp(optax.sgd(0.1), compress.global_magnitude, **gmp_kwargs())
  params = params_tree()
  state = tx.init(params)
  with pytest.raises(ValueError, match="gmp: update needs params"):
    tx.update(params, state)
  with pytest.raises(TypeError, match="gmp: state must be the GMPState"):
    tx.update(params, optax.sgd(0.1).init(params), params)
  bad = dict(params, head={"kernel": jnp.ones((5, 6))})
  with pytest.raises(ValueError, match="'head/kernel' has shape \\(5, 6\\)"):
    tx.update(bad, state, params)
  with pytest.raises(ValueError, match="gmp_masks: opt_state holds no"):
    cram_jax.gmp_masks(optax.sgd(0.1).init(params))

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
  # A kept weight that training moved to exactly 0 ties with the pruned
  # (zero) weights; it must still rank above them, whatever their flat index.
  params = params_tree()
  tx = cram_jax.gmp(
      optax.sgd(0.0),
      compress.global_magnitude,
      begin_step=0,
      end_step=1,
      frequency=1,
      schedule=lambda t: (0.5, 0.6)[t],
  )
  step = jax.jit(tx.update)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, state = step(zero_grads, tx.init(params), params)
  params = optax.apply_updates(params, updates)
  old = cram_jax.gmp_masks(state)
  assert kept_total(old) == 51
  # Zero the last 15 kept weights (highest flat indices): 36 nonzero kept
  # weights remain, fewer than the 41 the next update keeps.
  flat_kept = np.flatnonzero(
      np.concatenate([leaf(old, p).ravel() for p in PRUNABLE])
  )
  values = np.concatenate([leaf(params, p).ravel() for p in PRUNABLE])
  values[flat_kept[-15:]] = 0.0
  size = leaf(params, "conv/kernel").size
  params = {
      "conv": {
          "kernel": jnp.asarray(values[:size].reshape(3, 3, 2, 4)),
          "bias": params["conv"]["bias"],
      },
      "head": {"kernel": jnp.asarray(values[size:].reshape(6, 5))},
  }
  _, state = step(zero_grads, state, params)
  new = cram_jax.gmp_masks(state)
  assert kept_total(new) == round(0.4 * N) == 41
  for p in PRUNABLE:
    assert not np.any(leaf(new, p) & ~leaf(old, p)), p
  # All 36 nonzero kept weights stay, plus 5 of the 15 zeroed ones.
  kept = np.concatenate([leaf(new, p).ravel() for p in PRUNABLE])
  assert np.all(kept[values != 0]) and kept[flat_kept[-15:]].sum() == 5


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
        (
            dict(initial_sparsity=0.95),
            ValueError,
            "gmp: initial_sparsity must be <= final_sparsity .* 0.95 > 0.9",
        ),
        (dict(power=0.0), ValueError, "gmp: power must be a finite number > 0"),
        (dict(power=float("inf")), ValueError, "gmp: power .* got inf"),
        (
            dict(schedule=lambda t: "a"),
            TypeError,
            "gmp: schedule\\(0\\) \\(the sparsity\\) must be a real number",
        ),
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
  with pytest.raises(TypeError, match="must return a compressor, got 3"):
    cram_jax.gmp(optax.sgd(0.1), lambda s: 3, **gmp_kwargs())
  with pytest.raises(ValueError, match="has 1 levels, not 6"):
    cram_jax.gmp(
        optax.sgd(0.1),
        lambda s: compress.global_magnitude(0.5),
        **gmp_kwargs(),
    )
  with pytest.raises(TypeError, match="gmp: params leaf 'w' has dtype int32"):
    cram_jax.gmp(
        optax.sgd(0.1), compress.global_magnitude, **gmp_kwargs()
    ).init({"w": jnp.ones((3, 3), jnp.int32)})
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


# ----------------------------------------------------------------------------
# Runner wiring (experiments/): presets, config checks, BERT distillation.


def digits(method):
  from experiments.configs import digits as digits_config

  return digits_config.get_config(method)


def test_presets_and_steps():
  from experiments import optimizers
  from experiments import train as train_lib
  from experiments.configs import common

  assert common.method_fields("gmp-90") == {
      "optimizer.wrapper": "gmp",
      "gmp.final_sparsity": 0.9,
  }
  assert common.method_fields("acdc-80") == {
      "optimizer.wrapper": "acdc",
      "acdc.sparsity": 0.8,
  }
  for method in ("gmp-80", "gmp-90", "acdc-80", "acdc-90"):
    config = digits(method)
    train_lib.validate_config(config)
    assert train_lib.method_label(config) == method
  config = digits("gmp-90")
  config.name = ""
  assert train_lib.method_label(config) == "gmp-global-0.9(sgd)"
  # 22 steps per epoch: prune every epoch from epoch 2 to 20.
  assert optimizers.gmp_steps(config, 22) == {
      "begin_step": 44,
      "end_step": 440,
      "frequency": 22,
  }
  tx = optimizers.make_optimizer(config, 22)
  assert tx.update_steps == tuple(range(44, 441, 22))
  # AC/DC: 3 dense epochs, phases of 3, the last 9 of 30 compressed.
  config = digits("acdc-90")
  assert optimizers.acdc_steps(config, 22) == {
      "dense_warmup": 66,
      "phase_length": 66,
      "final_phase_start": 21 * 22,
  }
  plan = cram_jax.acdc_compressed(
      np.arange(0, 30 * 22, 22), **optimizers.acdc_steps(config, 22)
  )
  assert "".join("C" if c else "D" for c in plan) == (
      "DDD" + "CCCDDD" * 3 + "C" * 9
  )
  params = params_tree()
  state = optimizers.make_optimizer(config, 22).init(params)
  assert isinstance(state, cram_jax.ACDCState)


@pytest.mark.parametrize(
    "method,field,value,match",
    [
        ("gmp-90", "gmp.final_sparsity", 1.0, "gmp.final_sparsity must be"),
        ("gmp-90", "gmp.initial_sparsity", 0.95, "is above"),
        ("gmp-90", "gmp.end_epoch", 31.0, "end_epoch <= num_epochs"),
        ("gmp-90", "gmp.begin_epoch", 20.0, "begin_epoch < end_epoch"),
        ("gmp-90", "gmp.frequency_epochs", 0.0, "frequency_epochs must be"),
        ("gmp-90", "gmp.compressor", "nm", "gmp.compressor must be one of"),
        ("gmp-90", "gmp.power", -1.0, "gmp.power must be"),
        ("acdc-90", "acdc.sparsity", -0.1, "acdc.sparsity must be"),
        ("acdc-90", "acdc.phase_epochs", 0.0, "acdc.phase_epochs must be"),
        ("acdc-90", "acdc.final_epochs", 28.0, "exceed config.num_epochs"),
        ("acdc-90", "acdc.reset_momentum", 1, "must be True or False"),
        ("acdc-90", "acdc.compressor", "quantize", "one of"),
        ("gmp-90", "distill.teacher_checkpoint", "x.safetensors", "'squad'"),
        ("gmp-90", "distill.teacher_checkpoint", 3, "a path or ''"),
    ],
)
def test_config_errors(method, field, value, match):
  import ml_collections

  from experiments import train as train_lib

  # Not type-safe, as a config read back from JSON: the runner's own checks.
  config = ml_collections.ConfigDict(digits(method).to_dict(), type_safe=False)
  group, name = field.split(".")
  config[group][name] = value
  with pytest.raises((ValueError, TypeError), match=match):
    train_lib.validate_config(config)


def test_gmp_begin_and_end_on_one_step():
  from experiments import optimizers

  config = digits("gmp-90")
  config.gmp.begin_epoch, config.gmp.end_epoch = 2.0, 2.01
  with pytest.raises(ValueError, match="both step 44 at 22 steps per epoch"):
    optimizers.make_optimizer(config, 22)


def test_distillation_loss_closed_form():
  from experiments import tasks

  ln3 = np.log(3.0)
  teacher = jnp.asarray([[2 * ln3, 0.0], [0.0, 0.0]], jnp.float32)
  student = jnp.asarray([[0.0, 0.0], [0.0, 2 * ln3]], jnp.float32)
  # T = 2: row 1 has teacher (3/4, 1/4), student (1/2, 1/2); row 2 has
  # teacher (1/2, 1/2), student (1/4, 3/4).
  kl1 = 0.75 * np.log(1.5) + 0.25 * np.log(0.5)
  kl2 = 0.5 * np.log(2.0) + 0.5 * np.log(2.0 / 3.0)
  got = tasks.distillation_loss(student, teacher, 2.0)
  np.testing.assert_allclose(float(got), 4.0 * (kl1 + kl2) / 2, rtol=1e-6)
  # No gradient reaches the teacher's logits.
  grad = jax.grad(lambda t: tasks.distillation_loss(student, t, 2.0))(teacher)
  assert np.all(np.asarray(grad) == 0)


def test_bert_training_with_distillation(tmp_path):
  from test_experiments_e2e import (
      SQUAD_EXAMPLES,
      VOCAB,
      bert_config,
      mock_tfds,
  )

  from cram_jax import models
  from experiments import tasks
  from experiments import train as train_lib
  from experiments.metrics import read_jsonl

  vocab_file = tmp_path / "vocab.txt"
  vocab_file.write_text("\n".join(VOCAB) + "\n")
  config = bert_config(tmp_path / "tfds", str(vocab_file))
  config.optimizer.wrapper, config.name = "none", "adamw-distilled"
  config.bert.overrides.hidden_dropout_prob = 0.0
  config.bert.overrides.attention_probs_dropout_prob = 0.0
  config.log_every_steps = 1
  config.optimizer.learning_rate = 1e-2  # the student moves in 4 steps
  # hidden 64: with the helper's 128, this file's safetensors header length
  # (2432 = 0x980) starts with the byte 0x80, which
  # models.convert.checkpoint_file takes for a pickle's first byte.
  config.bert.overrides.hidden_size = 64
  # Teacher = the student's starting point: the first step's KD term is 0.
  model = models.BertForQuestionAnswering(tasks.bert_config(config))
  ids = jnp.zeros((1, 8), jnp.int32)
  teacher = model.init(jax.random.key(3), ids, train=False)["params"]
  path = str(tmp_path / "teacher.safetensors")
  models.save_bert(path, teacher)
  config.init_checkpoint = config.distill.teacher_checkpoint = path
  config.distill.weight, config.distill.temperature = 0.7, 2.0
  run_dir = str(tmp_path / "run")
  with mock_tfds(tmp_path / "tfds", examples=SQUAD_EXAMPLES):
    summary = train_lib.train_and_evaluate(config, run_dir)
  assert summary["status"] == "completed"
  rows = [
      r for r in read_jsonl(f"{run_dir}/metrics.jsonl") if r["split"] == "train"
  ]
  assert len(rows) == 4
  assert rows[0]["distill_loss"] < 1e-6  # same logits as the teacher
  assert rows[-1]["distill_loss"] > 1e-4  # the student has moved
  for r in rows:
    np.testing.assert_allclose(
        r["loss"], 0.3 * r["hard_loss"] + 0.7 * r["distill_loss"], rtol=1e-5
    )
  bad = bert_config(tmp_path / "tfds", str(vocab_file))
  bad.distill.teacher_checkpoint = str(tmp_path / "missing.safetensors")
  with pytest.raises(ValueError, match="missing.safetensors"):
    train_lib.validate_config(bad)

"""CrAM's update rule against independent oracles: optax's SAM, the closed-form step of docs/method.md
computed by hand in NumPy on a quadratic, and a NumPy re-implementation of a
whole multi-step run on a tiny MLP."""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from parallel_checks import assert_close_relative_to_change

from cram_jax import CrAMState, compress, cram

# ---------------------------------------------------------------- a tiny MLP


def mlp_params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "dense1": {
          "kernel": rng.normal(size=(4, 8)).astype(np.float32) * 0.7,
          "bias": rng.normal(size=(8,)).astype(np.float32) * 0.1,
      },
      "dense2": {
          "kernel": rng.normal(size=(8, 3)).astype(np.float32) * 0.5,
          "bias": rng.normal(size=(3,)).astype(np.float32) * 0.1,
      },
  }


def mlp_loss(params, x, y):
  h = jnp.tanh(x @ params["dense1"]["kernel"] + params["dense1"]["bias"])
  out = h @ params["dense2"]["kernel"] + params["dense2"]["bias"]
  return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))


def mlp_grad_numpy(p, x, y):
  """Hand-written backward pass of ``mlp_loss``."""
  h = np.tanh(x @ p["dense1"]["kernel"] + p["dense1"]["bias"])
  out = h @ p["dense2"]["kernel"] + p["dense2"]["bias"]
  d_out = (out - y) / x.shape[0]
  d_h = (d_out @ p["dense2"]["kernel"].T) * (1 - h**2)
  return {
      "dense1": {"kernel": x.T @ d_h, "bias": d_h.sum(0)},
      "dense2": {"kernel": h.T @ d_out, "bias": d_out.sum(0)},
  }


def batches(steps, seed=1, size=16):
  rng = np.random.default_rng(seed)
  return [
      (
          rng.normal(size=(size, 4)).astype(np.float32),
          rng.normal(size=(size, 3)).astype(np.float32),
      )
      for _ in range(steps)
  ]


def global_mask_numpy(kernels, sparsity):
  """Stable-sort oracle of global magnitude pruning, ties to the lower flat index."""
  flat = np.concatenate([np.abs(k).ravel() for k in kernels])
  keep_count = round((1 - sparsity) * flat.size)
  keep = np.zeros(flat.size, bool)
  keep[np.argsort(-flat, kind="stable")[:keep_count]] = True
  out, start = [], 0
  for k in kernels:
    out.append(keep[start : start + k.size].reshape(k.shape))
    start += k.size
  return out


def run_jax(tx, params, data, make_grad_fn):
  params = jax.tree.map(jnp.asarray, params)

  @jax.jit
  def step(params, state, x, y):
    grad_fn = make_grad_fn(x, y)
    updates, state = tx.update(
        grad_fn(params, 0), state, params, grad_fn=grad_fn
    )
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  history = []
  for x, y in data:
    params, state = step(params, state, x, y)
    history.append(params)
  return history


# ---------------------------------------------------------------- oracle 1: optax SAM


def test_identity_compression_equals_optax_sam_opaque_mode():
  lr, rho = 0.05, 0.1
  data = batches(6)
  ours = cram(
      optax.sgd(lr, momentum=0.9),
      compress.global_magnitude(0.0),
      rho=rho,
      plus=False,
      normalize=True,
  )
  sam = optax.contrib.sam(
      optax.sgd(lr, momentum=0.9),
      optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
      sync_period=2,
      opaque_mode=True,
  )
  got = run_jax(
      ours,
      mlp_params(),
      data,
      lambda x, y: jax.grad(lambda p, _: mlp_loss(p, x, y)),
  )
  want = run_jax(
      sam,
      mlp_params(),
      data,
      lambda x, y: jax.grad(lambda p, _: mlp_loss(p, x, y)),
  )
  for a, b in zip(got, want):
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6),
        a,
        b,
    )
  # And it actually trained: the points differ from the start.
  assert not np.allclose(
      got[-1]["dense1"]["kernel"], mlp_params()["dense1"]["kernel"]
  )


# ---------------------------------------------------------------- oracle 2: the formula


@pytest.mark.parametrize(
    "plus,sparse_grad,normalize",
    list(itertools.product([False, True], repeat=3)),
)
def test_quadratic_update_equals_hand_computed_formula(
    plus, sparse_grad, normalize
):
  rng = np.random.default_rng(7)
  a = rng.normal(size=(16, 16))
  q = a @ a.T / 16 + np.eye(16)
  c_vec = rng.normal(size=16)
  w0 = rng.normal(size=(3, 4))
  v0 = rng.normal(size=4)
  lr, rho, sparsity = 0.1, 0.3, 0.5

  def loss(p):
    flat = jnp.concatenate([p["w"].ravel(), p["v"]])
    return (
        0.5 * flat @ jnp.asarray(q, jnp.float32) @ flat
        - jnp.asarray(c_vec, jnp.float32) @ flat
    )

  # The closed-form step of docs/method.md section 2, by hand, in float64.
  x = np.concatenate([w0.ravel(), v0])
  g = q @ x - c_vec
  d = g / (np.linalg.norm(g) + 1e-12) if normalize else g
  x_t = x + rho * d
  mask = np.ones(16, bool)
  mask[:12] = global_mask_numpy([x_t[:12].reshape(3, 4)], sparsity)[
      0
  ].ravel()  # only w
  compressed = np.where(mask, x_t, 0.0)
  g2 = q @ compressed - c_vec
  if sparse_grad:
    g2 = np.where(mask, g2, 0.0)
  big_g = g2 + g if plus else g2
  expected = -lr * big_g

  tx = cram(
      optax.sgd(lr),
      compress.global_magnitude(sparsity),
      rho=rho,
      plus=plus,
      sparse_grad=sparse_grad,
      normalize=normalize,
  )
  params = {
      "w": jnp.asarray(w0, jnp.float32),
      "v": jnp.asarray(v0, jnp.float32),
  }
  grad_fn = jax.grad(lambda p, _: loss(p))
  updates, state = jax.jit(
      lambda p, s: tx.update(grad_fn(p, 0), s, p, grad_fn=grad_fn)
  )(params, tx.init(params))
  got = np.concatenate(
      [np.asarray(updates["w"]).ravel(), np.asarray(updates["v"])]
  )
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
  assert int(state.count) == 1


# ---------------------------------------------------------------- oracle 3: NumPy run


@pytest.mark.parametrize("sparsity", [0.6, 0.9])
def test_multi_step_mlp_matches_numpy_reimplementation(sparsity):
  lr, rho, wd, momentum = 0.1, 0.05, 5e-4, 0.9
  data = batches(8, seed=3)
  tx = cram(
      optax.chain(
          optax.add_decayed_weights(wd), optax.sgd(lr, momentum=momentum)
      ),
      compress.global_magnitude(sparsity),
      rho=rho,
  )
  got = run_jax(
      tx,
      mlp_params(),
      data,
      lambda x, y: jax.grad(lambda p, _: mlp_loss(p, x, y)),
  )

  # docs/method.md section 2, step by step, with NumPy only.
  p = jax.tree.map(np.float64, mlp_params())
  trace = jax.tree.map(np.zeros_like, p)
  for step, (x, y) in enumerate(data):
    x, y = x.astype(np.float64), y.astype(np.float64)
    g = mlp_grad_numpy(p, x, y)
    x_t = jax.tree.map(lambda w, gw: w + rho * gw, p, g)
    m1, m2 = global_mask_numpy(
        [x_t["dense1"]["kernel"], x_t["dense2"]["kernel"]], sparsity
    )
    c = {
        "dense1": {
            "kernel": m1 * x_t["dense1"]["kernel"],
            "bias": x_t["dense1"]["bias"],
        },
        "dense2": {
            "kernel": m2 * x_t["dense2"]["kernel"],
            "bias": x_t["dense2"]["bias"],
        },
    }
    g2 = mlp_grad_numpy(c, x, y)
    g2["dense1"]["kernel"] = g2["dense1"]["kernel"] * m1
    g2["dense2"]["kernel"] = g2["dense2"]["kernel"] * m2
    big_g = jax.tree.map(
        lambda a, b, w: a + b + wd * w, g2, g, p
    )  # CrAM+ sum, coupled wd
    trace = jax.tree.map(lambda t, gg: gg + momentum * t, trace, big_g)
    p = jax.tree.map(lambda w, t: w - lr * t, p, trace)
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(u, v, rtol=2e-4, atol=2e-5),
        got[step],
        p,
    )


# ---------------------------------------------------------------- integration


def test_rho_schedule_and_state_with_optax_tree_utilities():
  seen = []

  def schedule(count):
    return 0.1 * (count + 1)

  tx = cram(
      optax.sgd(0.1), compress.global_magnitude([0.5, 0.7]), rho=schedule, key=3
  )
  params = jax.tree.map(jnp.asarray, mlp_params())
  state = tx.init(params)
  assert isinstance(state, CrAMState)
  grad_fn = jax.grad(lambda p, _: mlp_loss(p, *batches(1)[0]))
  step = jax.jit(lambda p, s: tx.update(grad_fn(p, 0), s, p, grad_fn=grad_fn))
  for _ in range(3):
    _, new_state = step(params, state)
    seen.append(np.asarray(new_state.key))
    state = new_state
  assert int(optax.tree.get(state, "count")) == 3
  assert len({k.tobytes() for k in seen}) == 3  # a fresh level key every step
  # A compile-once check: three calls, one trace.
  assert step._cache_size() == 1


def test_composes_with_optax_chain_and_forwards_extra_args():
  params = jax.tree.map(jnp.asarray, mlp_params())
  grad_fn = jax.grad(lambda p, _: mlp_loss(p, *batches(1)[0]))
  inner = cram(optax.sgd(0.1), compress.global_magnitude(0.5), rho=0.05)
  chained = optax.chain(optax.clip_by_global_norm(1e9), inner)
  u1, _ = chained.update(
      grad_fn(params, 0),
      chained.init(params),
      params,
      grad_fn=grad_fn,
      unrelated_arg=1,
  )
  u2, _ = inner.update(
      grad_fn(params, 0), inner.init(params), params, grad_fn=grad_fn
  )
  jax.tree.map(np.testing.assert_allclose, u1, u2)


def test_flax_nnx_optimizer_forwards_grad_fn():
  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  x, y = batches(1)[0]
  graphdef, _ = nnx.split(model)

  def loss_pure(p, _=0):  # the step index cram passes
    return jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)

  tx = cram(optax.sgd(0.1), compress.global_magnitude(0.5), rho=0.2)
  start = nnx.as_pure(nnx.state(model, nnx.Param))
  expected_updates, _ = tx.update(
      jax.grad(loss_pure)(start),
      tx.init(start),
      start,
      grad_fn=jax.grad(loss_pure),
  )
  expected = optax.apply_updates(start, expected_updates)

  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
  optimizer.update(model, grads, grad_fn=jax.grad(loss_pure))
  jax.tree.map(
      np.testing.assert_allclose,
      nnx.as_pure(nnx.state(model, nnx.Param)),
      expected,
  )


class SmallBN(nn.Module):

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(3)(nn.relu(x))


def test_readme_train_step_keeps_batch_stats_from_the_clean_pass():
  model = SmallBN()
  x, y = batches(1)[0]
  variables = model.init(jax.random.key(0), x, train=False)
  tx = cram(
      optax.sgd(0.1, momentum=0.9), compress.global_magnitude(0.5), rho=0.05
  )
  opt_state = tx.init(variables["params"])

  def loss_fn(params, batch_stats):
    out, updates = model.apply(
        {"params": params, "batch_stats": batch_stats},
        x,
        train=True,
        mutable=["batch_stats"],
    )
    return jnp.mean((out - y) ** 2), updates["batch_stats"]

  @jax.jit
  def train_step(params, batch_stats, opt_state):
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats
    )

    # The compressed pass also runs in train mode, but its statistics are dropped.
    def grad_fn(p, _):
      return jax.grad(loss_fn, has_aux=True)(p, batch_stats)[0]

    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), new_stats, opt_state

  params, stats = variables["params"], variables["batch_stats"]
  _, new_stats, _ = train_step(params, stats, opt_state)
  _, clean_stats = loss_fn(params, stats)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
      new_stats,
      clean_stats,
  )
  # The statistics of the compressed point are far from those: they were dropped.
  grads = jax.grad(loss_fn, has_aux=True)(params, stats)[0]
  compressed, _ = compress.global_magnitude(0.5)(
      jax.tree.map(lambda w, g: w + 0.05 * g, params, grads)
  )
  _, compressed_stats = loss_fn(compressed, stats)
  assert not np.allclose(
      compressed_stats["BatchNorm_0"]["mean"],
      clean_stats["BatchNorm_0"]["mean"],
      rtol=1e-3,
  )


def test_pmap_with_batch_axis_name_equals_single_large_batch():
  n = jax.local_device_count()
  assert n == 8, "conftest sets 8 simulated CPU devices"
  data = batches(3, seed=5, size=32)

  def make_tx(axis):
    return cram(
        optax.sgd(0.1, momentum=0.9),
        compress.global_magnitude(0.7),
        rho=0.1,
        batch_axis_name=axis,
    )

  single = run_jax(
      make_tx(None),
      mlp_params(),
      data,
      lambda x, y: jax.grad(lambda p, _: mlp_loss(p, x, y)),
  )

  tx = make_tx("batch")

  def step(params, state, x, y):
    # Per-replica gradients: the caller averages the clean one, cram the second.
    grad_fn = jax.grad(lambda p, _: mlp_loss(p, x, y))
    grads = jax.lax.pmean(grad_fn(params, 0), "batch")
    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  pstep = jax.pmap(step, axis_name="batch")
  params = jax.tree.map(
      lambda w: np.stack([w] * n), mlp_params()
  )  # replicated along axis 0
  state = jax.pmap(tx.init)(params)
  for (x, y), want in zip(data, single):
    params, state = pstep(
        params, state, x.reshape(n, -1, 4), y.reshape(n, -1, 3)
    )
    for leaf in jax.tree.leaves(params):  # every replica holds the same point
      assert all(np.array_equal(leaf[0], leaf[i]) for i in range(n))
    # Two programs (pmap vs one device): compare relative to how far each leaf
    # moved, so rounding differences between CPUs cannot decide the outcome.
    assert_close_relative_to_change(
        jax.tree.map(lambda u: u[0], params),
        want,
        mlp_params(),
        "pmap vs single",
    )


# ------------------------------------------- one train step, SAM or CrAM


def sam_style_train_step(tx, axis_name):
  """A train step written for ``optax.contrib.sam(opaque_mode=True)``: the
  caller averages its clean gradient over replicas and passes
  ``grad_fn(params, i)``. Run unchanged with CrAM."""

  def step(params, state, x, y):
    loss_fn = lambda p, _: mlp_loss(p, x, y)  # noqa: E731
    grads = jax.grad(loss_fn)(params, 0)
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
    updates, state = tx.update(grads, state, params, grad_fn=jax.grad(loss_fn))
    return optax.apply_updates(params, updates), state

  return step


def recording(compressor, seen):
  """The compressor, with every mask it returns appended to `seen` (on the host,
  once per replica under pmap)."""

  def compress_and_record(params, key):
    compressed, masks = compressor(params, key)
    jax.debug.callback(
        lambda m: seen.append(jax.tree.map(np.asarray, m)), masks
    )
    return compressed, masks

  return compress_and_record


def sam_step_numpy(p, x, y, lr, rho):
  g = mlp_grad_numpy(p, x, y)
  norm = np.sqrt(sum(np.sum(v**2) for v in jax.tree.leaves(g)))
  g2 = mlp_grad_numpy(jax.tree.map(lambda w, d: w + rho * d / norm, p, g), x, y)
  return jax.tree.map(lambda w, d: w - lr * d, p, g2)


def cram_step_numpy(p, x, y, lr, rho, sparsity):
  """docs/method.md section 2 on the global batch: returns (new params, masks)."""
  g = mlp_grad_numpy(p, x, y)
  x_t = jax.tree.map(lambda w, d: w + rho * d, p, g)
  kernels = [x_t["dense1"]["kernel"], x_t["dense2"]["kernel"]]
  # The masks are compared exactly: the kept and dropped magnitudes nearest the
  # threshold must be far apart compared with float32 rounding.
  flat = np.sort(np.concatenate([np.abs(k).ravel() for k in kernels]))[::-1]
  keep = round((1 - sparsity) * flat.size)
  assert flat[keep - 1] - flat[keep] > 1e-4
  m1, m2 = global_mask_numpy(kernels, sparsity)
  c = {
      "dense1": {"kernel": m1 * kernels[0], "bias": x_t["dense1"]["bias"]},
      "dense2": {"kernel": m2 * kernels[1], "bias": x_t["dense2"]["bias"]},
  }
  g2 = mlp_grad_numpy(c, x, y)
  g2["dense1"]["kernel"] *= m1
  g2["dense2"]["kernel"] *= m2
  new = jax.tree.map(lambda w, a, b: w - lr * (a + b), p, g2, g)
  return new, (m1, m2)


@pytest.mark.parametrize("parallel", ["jit", "pmap"])
def test_one_sam_train_step_runs_sam_and_cram(parallel):
  n = jax.local_device_count()
  assert n == 8, "conftest sets 8 simulated CPU devices"
  lr, rho, sparsity = 0.1, 0.1, 0.7
  x, y = batches(1, seed=11, size=32)[0]
  axis = "batch" if parallel == "pmap" else None
  seen = []
  optimizers = {
      "sam": optax.contrib.sam(
          optax.sgd(lr),
          optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
          opaque_mode=True,
          batch_axis_name=axis,
      ),
      "cram": cram(
          optax.sgd(lr),
          recording(compress.global_magnitude(sparsity), seen),
          rho=rho,
          batch_axis_name=axis,
      ),
  }
  got = {}
  for name, tx in optimizers.items():
    step = sam_style_train_step(tx, axis)
    params = jax.tree.map(jnp.asarray, mlp_params())
    if parallel == "jit":
      new, _ = jax.jit(step)(params, tx.init(params), x, y)
    else:
      replicated = jax.tree.map(lambda w: jnp.stack([w] * n), params)
      new, _ = jax.pmap(step, axis_name=axis)(
          replicated,
          jax.pmap(tx.init)(replicated),
          x.reshape(n, -1, 4),
          y.reshape(n, -1, 3),
      )
      for leaf in jax.tree.leaves(new):  # every replica holds the same point
        assert all(np.array_equal(leaf[0], leaf[i]) for i in range(n))
      new = jax.tree.map(lambda w: w[0], new)
    got[name] = new

  # Oracles in float64 on the global batch (the mean of equal-sized shards'
  # mean losses is the global mean loss).
  p64 = jax.tree.map(np.float64, mlp_params())
  x64, y64 = x.astype(np.float64), y.astype(np.float64)
  want_cram, want_masks = cram_step_numpy(p64, x64, y64, lr, rho, sparsity)
  want = {"sam": sam_step_numpy(p64, x64, y64, lr, rho), "cram": want_cram}
  for name in want:
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6),
        got[name],
        want[name],
    )
  jax.block_until_ready(got)
  assert len(seen) == (n if parallel == "pmap" else 1)
  for masks in seen:  # every replica drew the global-batch mask
    assert masks["dense1"]["bias"] is None
    np.testing.assert_array_equal(masks["dense1"]["kernel"], want_masks[0])
    np.testing.assert_array_equal(masks["dense2"]["kernel"], want_masks[1])


# ---------------------------------------------------------------- errors


def test_bad_update_calls():
  params = jax.tree.map(jnp.asarray, mlp_params())
  tx = cram(optax.sgd(0.1), compress.global_magnitude(0.5), rho=0.1)
  with pytest.raises(ValueError, match="grad_fn"):
    tx.update(params, tx.init(params), params)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(params, tx.init(params), None, grad_fn=lambda p, _: p)
  with pytest.raises(TypeError, match="grad_fn must be callable"):
    tx.update(params, tx.init(params), params, grad_fn=3)
  with pytest.raises(TypeError, match="state must be the CrAMState"):
    tx.update(params, {"count": 0}, params, grad_fn=lambda p, _: p)
  with pytest.raises(TypeError, match="write `lambda p, _: ...`"):
    tx.update(params, tx.init(params), params, grad_fn=lambda p: p)
  ints = {"k": jnp.ones((4, 4), jnp.int32)}
  with pytest.raises(TypeError, match="params leaf 'k' has dtype int32"):
    tx.update(ints, tx.init(ints), ints, grad_fn=lambda p, _: p)


def one_argument_loss(p):
  return mlp_loss(p, *batches(1)[0])


def two_argument_loss(p, x, y):
  return mlp_loss(p, x, y)


@pytest.mark.parametrize(
    "grad_fn,ok",
    [
        (jax.grad(one_argument_loss), False),
        (lambda p: jax.grad(one_argument_loss)(p), False),
        (jax.jit(jax.grad(one_argument_loss)), False),
        (functools.partial(jax.grad(two_argument_loss), x=1, y=2), False),
        (jax.grad(lambda p, _: one_argument_loss(p)), True),
        (jax.grad(lambda p, *rest: one_argument_loss(p)), True),
        (jax.jit(jax.grad(lambda p, i: one_argument_loss(p))), True),
        (
            functools.partial(
                lambda p, i, scale: jax.tree.map(lambda w: scale * w, p),
                scale=1.0,
            ),
            True,
        ),
    ],
)
def test_grad_fn_must_take_params_and_a_step_index(grad_fn, ok):
  """SAM's opaque-mode contract: grad_fn(params, i); a one-argument grad_fn is a
  TypeError at trace time that says how to write it."""
  params = jax.tree.map(jnp.asarray, mlp_params())
  tx = cram(optax.sgd(0.1), compress.global_magnitude(0.5), rho=0.1)

  def step(p, state):
    return tx.update(jax.tree.map(jnp.ones_like, p), state, p, grad_fn=grad_fn)

  if ok:
    jax.eval_shape(step, params, tx.init(params))
    return
  with pytest.raises(
      TypeError,
      match=r"cram: grad_fn is called as grad_fn\(params, i\) like "
      r"optax.contrib.sam\(opaque_mode=True\).*write `lambda p, _: ...` or "
      r"`def grad_fn\(params, i\): ...`",
  ):
    jax.eval_shape(step, params, tx.init(params))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (
            dict(optimizer=optax.sgd),
            TypeError,
            r"did you mean optax.sgd\(...\)\?",
        ),
        (
            dict(optimizer=0.1),
            TypeError,
            "optax.GradientTransformation, got 0.1",
        ),
        (
            dict(compressor=compress.global_magnitude),
            TypeError,
            r"did you mean global_magnitude\(...\)",
        ),
        (dict(compressor=0.5), TypeError, "compressor must be callable"),
        (dict(rho="0.05"), TypeError, "rho must be a real number, got '0.05'"),
        (dict(rho=None), TypeError, "rho must be a real number, got None"),
        (dict(rho=[0.05]), TypeError, "rho must be a real number"),
        (dict(rho=True), TypeError, "rho must be a real number, got True"),
        (dict(rho=-1.0), ValueError, "rho must be a finite non-negative"),
        (dict(rho=float("nan")), ValueError, "got nan"),
        (dict(rho=float("inf")), ValueError, "got inf"),
        (
            dict(rho=np.ones(2)),
            ValueError,
            r"rho must be a scalar, got shape \(2,\)",
        ),
        (dict(plus="no"), TypeError, "plus must be True or False"),
        (dict(sparse_grad=1), TypeError, "sparse_grad must be True or False"),
        (dict(key="abc"), TypeError, "key must be a PRNG key"),
        (dict(key=True), TypeError, "got True"),
        (dict(batch_axis_name=3), TypeError, "batch_axis_name must be an axis"),
        (
            dict(local_perturbation=True),
            ValueError,
            "local_perturbation=True needs batch_axis_name",
        ),
    ],
)
def test_bad_options_fail_at_construction(kwargs, error, match):
  args = dict(
      optimizer=optax.sgd(0.1),
      compressor=compress.global_magnitude(0.5),
      rho=0.1,
  )
  args.update(kwargs)
  with pytest.raises(error, match=match):
    cram(args.pop("optimizer"), args.pop("compressor"), **args)


def _kernels(fn):
  return lambda tree: {
      name: {**layer, "kernel": fn(layer["kernel"])}
      for name, layer in tree.items()
  }


def _mask_tree(fn):
  def compressor(p, key):
    return p, jax.tree.map(lambda x: fn(x) if x.ndim == 2 else None, p)

  return compressor


@pytest.mark.parametrize(
    "grads,grad_fn,compressor,error,match",
    [
        # A (1, 8) gradient for a (4, 8) kernel used to broadcast silently.
        (
            _kernels(lambda k: k[:1]),
            None,
            None,
            ValueError,
            r"grads \(updates\) leaf 'dense1/kernel' has shape \(1, 8\), "
            r"the params leaf has shape \(4, 8\)",
        ),
        (
            None,
            _kernels(lambda k: k[:1]),
            None,
            ValueError,
            r"grad_fn\(compressed params\) leaf 'dense1/kernel' has shape "
            r"\(1, 8\), the params leaf has shape \(4, 8\)",
        ),
        (
            None,
            _kernels(lambda k: k.T),
            None,
            ValueError,
            r"leaf 'dense1/kernel' has shape \(8, 4\), the params leaf has "
            r"shape \(4, 8\)",
        ),
        (
            None,
            lambda g: {"dense1": g["dense1"]},
            None,
            ValueError,
            r"leaves missing from grad_fn\(compressed params\): "
            r"\['dense2/bias', 'dense2/kernel'\]",
        ),
        (
            None,
            lambda g: jax.tree.map(lambda x: x.astype(jnp.int32), g),
            None,
            TypeError,
            "leaf 'dense1/bias' has dtype int32, the params leaf has dtype "
            "float32",
        ),
        (
            None,
            None,
            lambda p, key: p,
            TypeError,
            r"compressor must return a pair \(compressed_params, masks\), "
            "got a dict",
        ),
        (
            None,
            None,
            _mask_tree(lambda x: jnp.ones((1, x.shape[1]), bool)),
            ValueError,
            r"compressor's masks leaf 'dense1/kernel' has shape \(1, 8\)",
        ),
        (
            None,
            None,
            _mask_tree(lambda x: jnp.ones(x.shape)),
            TypeError,
            "compressor's masks leaf 'dense1/kernel' has dtype float32, not "
            "bool",
        ),
    ],
)
@pytest.mark.parametrize("jit", [False, True])
def test_trees_that_do_not_match_params_are_named(
    grads, grad_fn, compressor, error, match, jit
):
  """Checked on static shapes: under jit, at trace time (eval_shape traces
  without compiling or running anything)."""
  params = jax.tree.map(jnp.asarray, mlp_params())
  x, y = batches(1)[0]
  clean_grad_fn = lambda p, _=0: jax.grad(mlp_loss)(p, x, y)  # noqa: E731
  tx = cram(
      optax.sgd(0.1),
      compressor or compress.global_magnitude(0.5),
      rho=0.1,
  )
  bad_grad_fn = (
      clean_grad_fn
      if grad_fn is None
      else lambda p, _: grad_fn(clean_grad_fn(p))
  )

  def step(p, state):
    g = clean_grad_fn(p)
    return tx.update(
        g if grads is None else grads(g), state, p, grad_fn=bad_grad_fn
    )

  with pytest.raises(error, match=match):
    if jit:
      jax.eval_shape(step, params, tx.init(params))
    else:
      step(params, tx.init(params))


def test_bad_schedule_values():
  params = jax.tree.map(jnp.asarray, mlp_params())

  def update(rho):
    tx = cram(optax.sgd(0.1), compress.global_magnitude(0.5), rho=rho)
    return jax.eval_shape(  # trace time
        lambda p: tx.update(p, tx.init(p), p, grad_fn=lambda q, _: q), params
    )

  with pytest.raises(ValueError, match="schedule's value\\) must be a finite"):
    update(lambda count: -0.1)  # a Python number: known at trace time
  with pytest.raises(TypeError, match="must be a real number, got 'a'"):
    update(lambda count: "a")
  with pytest.raises(ValueError, match=r"must be a scalar, got shape \(3,\)"):
    update(lambda count: jnp.ones(3))


def test_negative_rho_from_a_schedule_poisons_the_update():
  """A traced rho < 0 cannot raise without a host sync every step: the update
  is NaN instead of a silent step in the wrong direction."""
  params = jax.tree.map(jnp.asarray, mlp_params())
  x, y = batches(1)[0]
  grad_fn = lambda p, _=0: jax.grad(mlp_loss)(p, x, y)  # noqa: E731
  for value, finite in ((-0.1, False), (float("nan"), False), (0.1, True)):
    tx = cram(
        optax.sgd(0.1),
        compress.global_magnitude(0.5),
        rho=lambda count, value=value: jnp.float32(value) + 0 * count,
    )
    step = jax.jit(
        lambda p, s, tx=tx: tx.update(grad_fn(p), s, p, grad_fn=grad_fn)
    )
    updates, _ = step(params, tx.init(params))
    # Every leaf whose compressed-point gradient is not masked away is NaN.
    assert finite == all(np.isfinite(u).all() for u in jax.tree.leaves(updates))

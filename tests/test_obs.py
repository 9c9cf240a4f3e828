"""OBS one-shot pruner (cram_jax.obs): checked against independent oracles."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import cram_jax
from cram_jax import obs
from cram_jax.data import digits

# ----------------------------------------------------------------------------
# Linear least squares where the empirical Fisher IS the Hessian.


def _least_squares(n=64, d=8, seed=0):
  """Data whose per-sample gradients at the optimum give F = H exactly.

  Loss ``L(w) = (1/2n) sum_i (x_i^T w - y_i)^2`` has Hessian
  ``H = (1/n) X^T X`` everywhere. The per-sample gradient at w is
  ``g_i = x_i r_i`` with residual ``r_i = x_i^T w - y_i``, so the empirical
  Fisher ``(1/n) sum_i g_i g_i^T = (1/n) sum_i r_i^2 x_i x_i^T``. It equals H
  when every ``r_i^2 = 1``. So: pick signs ``s_i = +-1``, make the columns of X
  orthogonal to s (``X^T s = 0``), and set ``y = X w* + s``. Then
  ``X^T (X w* - y) = -X^T s = 0``: w* is the exact least-squares optimum, its
  residuals are ``-s_i``, and F = H with no approximation. OBS on this
  quadratic is then exact: removing weights by the OBS update is the optimal
  re-fit of the survivors, which numpy.linalg.lstsq computes independently.
  """
  rng = np.random.default_rng(seed)
  s = rng.choice([-1.0, 1.0], n)
  x = rng.standard_normal((n, d))
  x -= np.outer(s, s @ x) / n
  w_star = rng.standard_normal(d)
  return x, x @ w_star + s, w_star


def _ls_setup(**kw):
  x, y, w_star = _least_squares(**kw)

  def loss(p, batch):
    xb, yb = batch
    return 0.5 * jnp.mean((xb @ p["w"][:, 0] - yb) ** 2)

  params = {"w": jnp.asarray(w_star[:, None], jnp.float32)}
  batch = (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  grads = obs.fisher_gradients(loss, params, [batch], per_sample=True)
  return x, y, w_star, params, grads


def _refit_loss(x, y, keep):
  w = np.zeros(x.shape[1])
  w[keep] = np.linalg.lstsq(x[:, keep], y, rcond=None)[0]
  return 0.5 * np.mean((x @ w - y) ** 2), w


def test_ls_fisher_equals_hessian():
  x, _, _, _, grads = _ls_setup()
  g = np.asarray(grads["w"])[:, :, 0].astype(np.float64)
  assert g.shape == (64, 8)
  np.testing.assert_allclose(g.T @ g / 64, x.T @ x / 64, atol=1e-5)


def test_single_removal_is_the_best_and_the_closed_form():
  x, y, w_star, params, grads = _ls_setup()
  d = x.shape[1]
  losses = []
  for q in range(d):
    keep = np.ones(d, bool)
    keep[q] = False
    losses.append(_refit_loss(x, y, keep)[0])
  best = int(np.argmin(losses))
  assert sorted(losses)[1] - losses[best] > 1e-3  # a clear winner

  pruned, masks = obs.obs_prune(
      params, grads, 1 / d, block_size=d, damp=0.0, method="cholesky"
  )
  mask = np.asarray(masks["w"])[:, 0]
  assert np.flatnonzero(~mask).tolist() == [best]
  h_inv = np.linalg.inv(x.T @ x / x.shape[0])
  expected = w_star - (w_star[best] / h_inv[best, best]) * h_inv[:, best]
  got = np.asarray(pruned["w"])[:, 0]
  np.testing.assert_allclose(got, expected, atol=1e-5)
  assert got[best] == 0.0
  np.testing.assert_allclose(got, _refit_loss(x, y, mask)[1], atol=1e-5)


@pytest.mark.parametrize("steps", [1, 3])
def test_joint_update_is_the_exact_refit(steps):
  # Removing 3 of 8 weights jointly (or in 3 steps) lands on the least-squares
  # re-fit of the 5 survivors, whatever mask was chosen.
  x, y, _, params, grads = _ls_setup()
  pruned, masks = obs.obs_prune(
      params,
      grads,
      3 / 8,
      block_size=8,
      damp=0.0,
      method="cholesky",
      steps=steps,
  )
  keep = np.asarray(masks["w"])[:, 0]
  assert keep.sum() == 5
  np.testing.assert_allclose(
      np.asarray(pruned["w"])[:, 0], _refit_loss(x, y, keep)[1], atol=1e-5
  )


def test_gradual_steps_pick_the_best_greedy_removals():
  # With one Fisher, step t removes the survivor whose removal (with re-fit)
  # costs least given the earlier removals: a greedy brute force oracle.
  x, y, _, params, grads = _ls_setup(seed=1)
  _, masks = obs.obs_prune(
      params, grads, 3 / 8, block_size=8, damp=0.0, method="cholesky", steps=3
  )
  keep = np.ones(8, bool)
  for _ in range(3):
    options = [q for q in range(8) if keep[q]]
    costs = []
    for q in options:
      trial = keep.copy()
      trial[q] = False
      costs.append(_refit_loss(x, y, trial)[0])
    keep[options[int(np.argmin(costs))]] = False
  np.testing.assert_array_equal(np.asarray(masks["w"])[:, 0], keep)


def test_partial_last_block_is_decoupled():
  # Blocks of 3 over 8 weights: [0,1,2] [3,4,5] [6,7 + padding]. The padding
  # must neither be pruned nor disturb the last block, which must equal OBS
  # with the 2x2 Fisher block on its own.
  x, _, w_star, params, grads = _ls_setup()
  pruned, masks = obs.obs_prune(
      params,
      grads,
      0.5,
      block_size=3,
      damp=0.0,
      method="cholesky",
      pattern="layerwise",
  )
  mask = np.asarray(masks["w"])[:, 0]
  assert mask.sum() == 4
  h = x.T @ x / x.shape[0]
  got = np.asarray(pruned["w"])[:, 0]
  for lo, hi in ((0, 3), (3, 6), (6, 8)):
    block_q = [q for q in range(lo, hi) if not mask[q]]
    h_inv = np.linalg.inv(h[lo:hi, lo:hi])
    w = w_star[lo:hi]
    if block_q:
      qs = np.array(block_q) - lo
      dw = -h_inv[:, qs] @ np.linalg.solve(h_inv[np.ix_(qs, qs)], w[qs])
      w = w + dw
    np.testing.assert_allclose(got[lo:hi], w, atol=1e-5)


# ----------------------------------------------------------------------------
# Block inverses.


@pytest.mark.parametrize("method", obs.METHODS)
@pytest.mark.parametrize("m", [5, 40])
def test_block_inverses_match_numpy(method, m):
  rng = np.random.default_rng(m)
  g = rng.standard_normal((m, 6, 16)).astype(np.float32)
  lam = 0.3
  got = np.asarray(obs.fisher_inverse(g, lam, method=method))
  g64 = g.astype(np.float64)
  for b in range(6):
    f = lam * np.eye(16) + g64[:, b].T @ g64[:, b] / m
    np.testing.assert_allclose(got[b], np.linalg.inv(f), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------
# Counts, patterns and mask format.


def _random_tree(seed=0, m=12):
  k = jax.random.split(jax.random.key(seed), 5)
  params = {
      "Dense_0": {
          "kernel": jax.random.normal(k[0], (16, 12)),
          "bias": jnp.zeros(12),
      },
      "Conv_0": {"kernel": jax.random.normal(k[1], (3, 3, 8, 4))},
      "Dense_1": {"kernel": jax.random.normal(k[2], (12, 5))},
  }
  grads = jax.tree.map(
      lambda x: jax.random.normal(k[3], (m,) + x.shape), params
  )
  return params, grads


@pytest.mark.parametrize("sparsity", [0.0, 0.37, 0.9, 1.0])
def test_global_count_is_exact_and_masks_fit(sparsity):
  params, grads = _random_tree()
  pruned, masks = obs.obs_prune(params, grads, sparsity, block_size=32)
  cram_jax.check_masks(params, masks)
  assert masks["Dense_0"]["bias"] is None
  total = 16 * 12 + 3 * 3 * 8 * 4 + 12 * 5
  kept = sum(int(np.sum(m)) for m in jax.tree.leaves(masks))
  assert kept == round((1 - sparsity) * total)
  # Pruned entries are exactly zero, the masks reproduce them, bias untouched.
  again = cram_jax.apply_masks(masks, pruned)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(pruned)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for name in ("Dense_0", "Conv_0", "Dense_1"):
    mask = np.asarray(masks[name]["kernel"])
    assert np.all(np.asarray(pruned[name]["kernel"])[~mask] == 0)
  np.testing.assert_array_equal(
      np.asarray(pruned["Dense_0"]["bias"]), np.zeros(12)
  )


def test_layerwise_counts_per_leaf():
  params, grads = _random_tree()
  _, masks = obs.obs_prune(
      params, grads, 0.6, pattern="layerwise", block_size=20
  )
  for name, size in (("Dense_0", 192), ("Conv_0", 288), ("Dense_1", 60)):
    assert int(np.sum(masks[name]["kernel"])) == round(0.4 * size)


@pytest.mark.parametrize("order", ["input", "row_major"])
def test_zero_sparsity_is_identity(order):
  params, grads = _random_tree()
  pruned, masks = obs.obs_prune(params, grads, 0.0, block_order=order)
  for a, b in zip(jax.tree.leaves(pruned), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert all(np.all(m) for m in jax.tree.leaves(masks))


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (3, 8)])
@pytest.mark.parametrize("steps", [1, 2])
def test_nm_output_is_exactly_nm(nm, steps):
  n, m = nm
  params, grads = _random_tree(seed=n + m)
  pruned, masks = obs.obs_prune(
      params,
      grads,
      0.0,
      pattern=nm,
      block_size=16,
      steps=steps,
      include=["Dense_0/kernel", "Conv_0/kernel"],
  )
  cram_jax.check_masks(params, masks)
  for name in ("Dense_0", "Conv_0"):
    mask = np.asarray(masks[name]["kernel"])
    groups = np.moveaxis(mask, -2, -1)
    groups = groups.reshape(groups.shape[:-1] + (-1, m))
    assert np.all(groups.sum(-1) == n), name
    assert np.all(np.asarray(pruned[name]["kernel"])[~mask] == 0)


def test_nm_choice_minimises_the_joint_cost():
  # One block of one group of 4 (a (4, 1) kernel): the 2 weights removed are
  # the pair with the least exact joint OBS cost 0.5 w_Q^T ([F^-1]_QQ)^-1 w_Q,
  # found by brute force in float64.
  rng = np.random.default_rng(3)
  w = rng.standard_normal(4)
  g = rng.standard_normal((6, 4))
  params = {"k": jnp.asarray(w[:, None], jnp.float32)}
  grads = {"k": jnp.asarray(g[:, :, None], jnp.float32)}
  damp = 0.1
  lam = damp * np.mean(np.sum(g**2, 0) / 6)
  f_inv = np.linalg.inv(lam * np.eye(4) + g.T @ g / 6)
  costs = {
      q: 0.5 * w[list(q)] @ np.linalg.solve(f_inv[np.ix_(q, q)], w[list(q)])
      for q in itertools.combinations(range(4), 2)
  }
  best = min(costs, key=costs.get)
  _, masks = obs.obs_prune(
      params, grads, 0.0, pattern=(2, 4), block_size=4, damp=damp
  )
  assert sorted(np.flatnonzero(~np.asarray(masks["k"])[:, 0])) == list(best)


def test_methods_give_the_same_masks():
  params, grads = _random_tree(m=40)
  out = [
      obs.obs_prune(params, grads, 0.5, block_size=16, damp=0.1, method=me)
      for me in obs.METHODS
  ]
  for a, b in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(out[1][1])):
    assert np.mean(np.asarray(a) == np.asarray(b)) > 0.99


def test_chunking_does_not_change_the_result():
  params, grads = _random_tree()
  a = obs.obs_prune(params, grads, 0.7, block_size=8)
  b = obs.obs_prune(params, grads, 0.7, block_size=8, chunk_bytes=3 * 8 * 8 * 4)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_callable_grads_are_recomputed_each_step():
  params, grads = _random_tree()
  calls = []

  def grads_fn(p):
    calls.append(p)
    return grads

  a = obs.obs_prune(params, grads_fn, 0.5, steps=3, block_size=16)
  b = obs.obs_prune(params, grads, 0.5, steps=3, block_size=16)
  assert len(calls) == 3
  # The second call sees the params pruned by the first step.
  zeros = int(np.sum(np.asarray(calls[1]["Dense_0"]["kernel"]) == 0))
  assert zeros > 0
  for x, y in zip(jax.tree.leaves(a[1]), jax.tree.leaves(b[1])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"block_size": 0}, ValueError, "block_size must be >= 1, got 0"),
        ({"block_size": -3}, ValueError, "block_size must be >= 1, got -3"),
        ({"block_size": 2.0}, TypeError, "block_size must be an int"),
        ({"sparsity": 1.5}, ValueError, "sparsity must be in [0, 1], got 1.5"),
        ({"sparsity": -0.1}, ValueError, "sparsity must be in [0, 1]"),
        ({"sparsity": "0.5"}, TypeError, "sparsity must be a real number"),
        ({"steps": 0}, ValueError, "steps must be >= 1, got 0"),
        ({"damp": -1.0}, ValueError, "damp must be a finite number >= 0"),
        ({"damp": float("nan")}, ValueError, "damp must be a finite"),
        ({"pattern": "magnitude"}, ValueError, "pattern must be 'global'"),
        ({"pattern": (5, 4)}, ValueError, "1 <= n <= m, got (5, 4)"),
        ({"pattern": 3}, TypeError, "pattern must be"),
        ({"pattern": (2, 4), "block_size": 6}, ValueError, "block_size=6"),
        ({"method": "lu"}, ValueError, "method must be one of"),
        ({"block_order": "col"}, ValueError, "block_order must be one of"),
        (
            {"pattern": (2, 4), "block_order": "row_major"},
            ValueError,
            "needs block_order='input'",
        ),
        (
            {"method": "sherman_morrison", "damp": 0},
            ValueError,
            "needs damp > 0",
        ),
        ({"include": "nothing_here"}, ValueError, "matches no leaf"),
    ],
)
def test_bad_options_raise(kwargs, error, words):
  params, grads = _random_tree()
  kwargs = {"sparsity": 0.5, **kwargs}
  sparsity = kwargs.pop("sparsity")
  with pytest.raises(error, match="obs_prune") as info:
    obs.obs_prune(params, grads, sparsity, **kwargs)
  assert words in str(info.value)


def test_bad_grads_raise():
  params, grads = _random_tree()
  missing = {k: v for k, v in grads.items() if k != "Dense_1"}
  with pytest.raises(ValueError, match="grads does not match the params tree"):
    obs.obs_prune(params, missing, 0.5)
  bad = jax.tree.map(lambda x: x, grads)
  bad["Conv_0"]["kernel"] = jnp.zeros((12, 3, 3, 8, 5))
  with pytest.raises(ValueError, match=r"leaf 'Conv_0/kernel' has shape"):
    obs.obs_prune(params, bad, 0.5)
  bad["Conv_0"]["kernel"] = jnp.zeros((7, 3, 3, 8, 4))
  with pytest.raises(
      ValueError,
      match=r"'Dense_0/kernel' has 12 gradients, earlier leaves have m = 7",
  ):
    obs.obs_prune(params, bad, 0.5)
  empty = jax.tree.map(lambda x: x[:0], grads)
  with pytest.raises(ValueError, match="m = 0"):
    obs.obs_prune(params, empty, 0.5)
  nan = jax.tree.map(lambda x: x.at[0].set(jnp.nan), grads)
  with pytest.raises(ValueError, match="'Conv_0/kernel' has non-finite"):
    obs.obs_prune(params, nan, 0.5)
  zero = jax.tree.map(jnp.zeros_like, grads)
  with pytest.raises(ValueError, match="every gradient is zero"):
    obs.obs_prune(params, zero, 0.5)
  with pytest.raises(ValueError, match="not positive definite.*damp=0"):
    obs.obs_prune(
        params, grads, 0.5, damp=0, block_size=32, method="cholesky"
    )  # m=12 < 32


def test_nm_indivisible_leaf_is_named():
  params, grads = _random_tree()
  with pytest.raises(
      ValueError,
      match=r"leaf 'Dense_1/kernel' has 12 inputs along axis 0, "
      "not a multiple of 8",
  ):
    obs.obs_prune(params, grads, 0.0, pattern=(2, 8), block_size=16)


def test_fisher_gradients_errors_and_shapes():
  params = {"w": jnp.ones((3, 2))}

  def loss(p, b):
    return jnp.sum((b @ p["w"]) ** 2)

  batches = [jnp.ones((4, 3)), 2 * jnp.ones((4, 3))]
  g = obs.fisher_gradients(loss, params, batches)
  assert g["w"].shape == (2, 3, 2)
  np.testing.assert_allclose(g["w"][1], 4 * g["w"][0], rtol=1e-6)
  per = obs.fisher_gradients(loss, params, batches, per_sample=True)
  assert per["w"].shape == (8, 3, 2)
  # Sum of per-example gradients of a summed loss = the batch gradient.
  np.testing.assert_allclose(per["w"][:4].sum(0), g["w"][0], rtol=1e-5)
  with pytest.raises(
      ValueError, match="fisher_gradients: batches is empty, m = 0"
  ):
    obs.fisher_gradients(loss, params, [])
  with pytest.raises(
      TypeError, match="fisher_gradients: loss_fn must be callable"
  ):
    obs.fisher_gradients("loss", params, batches)
  with pytest.raises(
      TypeError, match="fisher_gradients: per_sample must be True"
  ):
    obs.fisher_gradients(loss, params, batches, per_sample=1)
  with pytest.raises(
      TypeError, match="fisher_gradients: batches must be an iterable"
  ):
    obs.fisher_gradients(loss, params, 3)
  with pytest.raises(TypeError, match="must return a real scalar"):
    obs.fisher_gradients(lambda p, b: b @ p["w"], params, batches)
  with pytest.raises(ValueError, match="leading sizes"):
    obs.fisher_gradients(
        lambda p, b: loss(p, b[0]),
        params,
        [(jnp.ones((4, 3)), jnp.ones(5))],
        per_sample=True,
    )


# ----------------------------------------------------------------------------
# A small MLP on the digits data: OBS beats magnitude pruning.


def _digits():
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  y = y.astype(np.int32)
  train, test = digits.split_indices("train"), digits.split_indices("test")
  return (x[train], y[train]), (x[test], y[test])


def _apply(p, x):
  h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
  return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def _loss(p, batch):
  x, y = batch
  return optax.softmax_cross_entropy_with_integer_labels(_apply(p, x), y).mean()


@pytest.fixture(scope="module")
def trained_mlp():
  train, test = _digits()
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {
      "Dense_0": {
          "kernel": jax.random.normal(k1, (64, 64)) / 8,
          "bias": jnp.zeros(64),
      },
      "Dense_1": {
          "kernel": jax.random.normal(k2, (64, 10)) / 8,
          "bias": jnp.zeros(10),
      },
  }
  opt = optax.adamw(1e-2, weight_decay=1e-3)
  state = opt.init(params)

  @jax.jit
  def step(p, s):
    g = jax.grad(_loss)(p, train)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  for _ in range(100):
    params, state = step(params, state)
  grads = obs.fisher_gradients(_loss, params, [train], per_sample=True)
  return params, grads, test


@pytest.mark.parametrize("sparsity", [0.7, 0.8, 0.9])
def test_mlp_obs_beats_magnitude(trained_mlp, sparsity):
  params, grads, test = trained_mlp
  dense = float(_loss(params, test))
  magnitude, _ = cram_jax.global_magnitude(sparsity)(params)
  pruned, masks = obs.obs_prune(params, grads, sparsity, steps=16, damp=1e-2)
  kept = sum(int(np.sum(m)) for m in jax.tree.leaves(masks))
  assert kept == round((1 - sparsity) * (64 * 64 + 64 * 10))
  loss_mag = float(_loss(magnitude, test))
  loss_obs = float(_loss(pruned, test))
  # A meaningful margin: OBS removes at least 40% of magnitude's excess loss.
  assert loss_obs - dense < 0.6 * (loss_mag - dense), (loss_obs, loss_mag)

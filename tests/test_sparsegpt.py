"""SparseGPT / GPTQ (cram_jax.sparsegpt) against independent NumPy oracles.

Oracles: an explicit-loop float64 NumPy SparseGPT in PyTorch's (out, in)
layout; exact masked least squares (numpy.linalg.lstsq per output); an explicit
NumPy im2col checked against the conv itself; magnitude pruning and plain
rounding on a trained digits MLP.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

from cram_jax import compress, models
from cram_jax import sparsegpt as sg
from cram_jax.compress.select import path_str, selected
from cram_jax.data import digits

# --------------------------------------------------------------------------
# NumPy reference SparseGPT: (d_out, d_in) layout, float64, explicit loops.
# --------------------------------------------------------------------------


def kept_through(sparsity, count):
  return int(round((1.0 - sparsity) * count))


def reference_sparsegpt(kernel, hessian, sparsity, block, damp, nm=None):
  """Frantar & Alistarh's algorithm 1 as in their code, columns = inputs.

  Exact kept count per block: the layer's round((1-s) * size) spread by
  cumulative rounding; largest w^2/U_jj^2 kept, ties to the lower index of
  the Flax (input, output) flat order.
  """
  w = np.array(kernel, np.float64).T.copy()  # (d_out, d_in)
  d_out, d_in = w.shape
  h = np.array(hessian, np.float64).copy()
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  w[:, dead] = 0.0
  h += damp * np.mean(np.diag(h)) * np.eye(d_in)
  u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, u.T @ u = inv(h)
  keep = np.zeros_like(w, bool)
  for i1 in range(0, d_in, block):
    i2 = min(i1 + block, d_in)
    count = i2 - i1
    w1 = w[:, i1:i2].copy()
    err1 = np.zeros_like(w1)
    u1 = u[i1:i2, i1:i2]
    keep1 = np.zeros_like(w1, bool)
    if nm is None:
      k = kept_through(sparsity, i2 * d_out) - kept_through(
          sparsity, i1 * d_out
      )
      score = (w1**2 / np.diag(u1)[None, :] ** 2).T.ravel()  # Flax order
      order = sorted(range(score.size), key=lambda j: (-score[j], j))
      flat = np.zeros(score.size, bool)
      flat[order[:k]] = True
      keep1 = flat.reshape(count, d_out).T
    for i in range(count):
      if nm is not None and i % nm[1] == 0:
        n, m = nm
        for r in range(d_out):
          s = w1[r, i : i + m] ** 2 / np.diag(u1)[i : i + m] ** 2
          best = sorted(range(m), key=lambda j: (-s[j], j))[:n]
          keep1[r, [i + j for j in best]] = True
      col = w1[:, i].copy()
      q = np.where(keep1[:, i], col, 0.0)
      err = (col - q) / u1[i, i]
      w1[:, i:] -= np.outer(err, u1[i, i:])
      w1[:, i] = q
      err1[:, i] = err
    w[:, i1:i2] = w1
    w[:, i2:] -= err1 @ u[i1:i2, i2:]
    keep[:, i1:i2] = keep1
  return w.T, keep.T


def correlated_inputs(rng, n, d_in, dead=()):
  """Inputs with strongly correlated features (where OBS beats magnitude)."""
  mix = rng.normal(size=(d_in, d_in)) / np.sqrt(d_in) + np.eye(d_in)
  x = rng.normal(size=(n, d_in)) @ mix
  x[:, list(dead)] = 0.0
  return x


def dense_case(seed, d_in, d_out, n=256, dead=()):
  rng = np.random.default_rng(seed)
  x = correlated_inputs(rng, n, d_in, dead)
  w = rng.normal(size=(d_in, d_out)).astype(np.float32)
  h = (x.T @ x / n).astype(np.float32)
  return x, w, h


@pytest.mark.parametrize(
    "d_in, d_out, block, sparsity, nm, dead",
    [
        (20, 6, 8, 0.6, None, (3,)),  # padded last block, a dead input
        (16, 5, 16, 0.5, None, ()),  # one block
        (24, 7, 5, 0.83, None, ()),  # blocks of 5 (padded), odd sparsity
        (16, 6, 8, None, (2, 4), (5,)),
        (16, 3, 8, None, (1, 4), ()),
    ],
)
def test_matches_numpy_reference(d_in, d_out, block, sparsity, nm, dead):
  x, w, h = dense_case(d_in + d_out, d_in, d_out, dead=dead)
  params = {"Dense_0": {"kernel": w, "bias": np.zeros(d_out, np.float32)}}
  out, masks = sg.sparsegpt_prune(
      params,
      {"Dense_0/kernel": h},
      sparsity,
      nm=nm,
      block_size=block,
      damp=0.01,
  )
  ref_w, ref_keep = reference_sparsegpt(w, h, sparsity, block, 0.01, nm)
  np.testing.assert_array_equal(
      np.asarray(masks["Dense_0"]["kernel"]), ref_keep
  )
  assert masks["Dense_0"]["bias"] is None
  got = np.asarray(out["Dense_0"]["kernel"])
  np.testing.assert_allclose(got, ref_w, rtol=1e-4, atol=2e-5)
  assert np.all(got[~ref_keep] == 0.0)  # pruned weights are exactly zero
  if sparsity is not None:
    assert ref_keep.sum() == kept_through(sparsity, w.size)


@pytest.mark.parametrize("block", [3, 16])
def test_fixed_mask_survivors_are_the_masked_least_squares(block):
  """With a fixed mask the sequential OBS solves min ||X w - X v|| exactly
  when, per output, every pruned input comes before every kept one: each
  pruning step then re-solves all still-free weights, and kept weights are
  only frozen once no error is left to spread. damp=0, so no ridge term."""
  rng = np.random.default_rng(7)
  d_in, d_out, n = 12, 5, 300
  x = correlated_inputs(rng, n, d_in)
  w = rng.normal(size=(d_in, d_out)).astype(np.float32)
  h = (x.T @ x / n).astype(np.float32)
  cut = np.array([0, 3, 6, 9, 11])  # pruned prefix length per output
  keep = np.arange(d_in)[:, None] >= cut[None, :]
  out, _ = sg.sparsegpt_prune(
      {"k": w},
      {"k": h},
      None,
      masks={"k": keep},
      block_size=block,
      damp=0.0,
  )
  got = np.asarray(out["k"])
  x32 = x.astype(np.float32).astype(np.float64)  # the inputs h came from
  for j in range(d_out):
    kept = keep[:, j]
    v, *_ = np.linalg.lstsq(x32[:, kept], x32 @ w[:, j], rcond=None)
    expected = np.zeros(d_in)
    expected[kept] = v
    np.testing.assert_allclose(got[:, j], expected, rtol=1e-3, atol=1e-3)
  assert np.all(got[~keep] == 0.0)


def test_fixed_mask_lies_between_least_squares_and_plain_masking():
  """Any mask: never better than the masked least squares (the optimum),
  better than zeroing the pruned weights and leaving the rest alone."""
  x, w, h = dense_case(3, 32, 8)
  keep = np.abs(w) >= np.quantile(np.abs(w), 0.7)
  out, masks = sg.sparsegpt_prune(
      {"k": w}, {"k": h}, None, masks={"k": keep}, damp=0.0
  )
  np.testing.assert_array_equal(np.asarray(masks["k"]), keep)
  optimum = np.zeros(w.shape)
  for j in range(w.shape[1]):
    optimum[keep[:, j], j] = np.linalg.lstsq(
        x[:, keep[:, j]], x @ w[:, j], rcond=None
    )[0]

  def err(v):
    return np.linalg.norm(x @ (w - v))

  ours = err(np.asarray(out["k"]))
  assert err(optimum) <= ours * (1 + 1e-4)
  assert ours < 0.97 * err(np.where(keep, w, 0)), ours


# --------------------------------------------------------------------------
# Hessians: NumPy im2col.
# --------------------------------------------------------------------------


def numpy_im2col(x, kernel_hw, strides, padding, dilation=(1, 1)):
  """Rows of patches in (kh, kw, cin) order; padding 'SAME', 'VALID' or pairs."""
  n, height, width, c = x.shape
  (kh, kw), (sh, sw), (dh, dw) = kernel_hw, strides, dilation
  eff = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
  if padding == "VALID":
    pads = [(0, 0), (0, 0)]
  elif padding == "SAME":  # TensorFlow's rule: extra padding at the end
    pads = []
    for size, s, e in zip((height, width), (sh, sw), eff):
      out = -(-size // s)
      total = max((out - 1) * s + e - size, 0)
      pads.append((total // 2, total - total // 2))
  else:
    pads = list(padding)
  xp = np.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])
  oh = (xp.shape[1] - eff[0]) // sh + 1
  ow = (xp.shape[2] - eff[1]) // sw + 1
  rows = []
  for b in range(n):
    for i in range(oh):
      for j in range(ow):
        patch = [
            xp[b, i * sh + a * dh, j * sw + e * dw, :]
            for a in range(kh)
            for e in range(kw)
        ]
        rows.append(np.concatenate(patch))
  return np.asarray(rows), (n, oh, ow)


@pytest.mark.parametrize(
    "padding, strides, dilation",
    [
        ("SAME", (2, 2), (1, 1)),
        ("VALID", (2, 2), (1, 1)),
        (((1, 2), (0, 1)), (2, 1), (2, 1)),
    ],
)
def test_conv_hessian_is_numpy_im2col(padding, strides, dilation):
  conv = nn.Conv(
      3, (3, 2), strides=strides, padding=padding, kernel_dilation=dilation
  )
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 8, 7, 2)), np.float64)
  variables = conv.init(jax.random.key(1), x)
  rows, out_shape = numpy_im2col(x, (3, 2), strides, padding, dilation)
  # The im2col ordering is the kernel's: rows @ kernel is the conv itself.
  kernel = np.asarray(variables["params"]["kernel"], np.float64)
  direct = np.asarray(conv.apply(variables, x), np.float64)
  np.testing.assert_allclose(
      (rows @ kernel.reshape(-1, 3)).reshape(out_shape + (3,))
      + np.asarray(variables["params"]["bias"]),
      direct,
      atol=1e-5,
  )
  hs = sg.layer_hessians(conv.apply, variables, [x[:1], x[1:]])
  assert list(hs) == ["kernel"]
  np.testing.assert_allclose(
      np.asarray(hs["kernel"]), rows.T @ rows / len(rows), atol=1e-5
  )


def test_dense_hessian_pools_every_token_and_every_call():
  class Twice(nn.Module):

    @nn.compact
    def __call__(self, x):
      shared = nn.Dense(4, name="shared")
      return shared(x) + shared(2 * x)

  x = np.asarray(jax.random.normal(jax.random.key(0), (3, 5, 4)), np.float32)
  model = Twice()
  variables = model.init(jax.random.key(1), x)
  hs = sg.layer_hessians(model.apply, variables, [x, x[:1]])
  rows = np.concatenate(
      [
          x.reshape(-1, 4),
          2 * x.reshape(-1, 4),
          x[:1].reshape(-1, 4),
          2 * x[:1].reshape(-1, 4),
      ]
  ).astype(np.float64)
  np.testing.assert_allclose(
      np.asarray(hs["shared/kernel"]), rows.T @ rows / len(rows), rtol=1e-5
  )


# --------------------------------------------------------------------------
# Digits MLP: SparseGPT beats magnitude pruning at the same per-layer sparsity.
# --------------------------------------------------------------------------


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(128)(x))
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(10)(x)


@pytest.fixture(scope="module")
def digits_mlp():
  data = load_digits()
  images = digits.to_uint8(data.images).reshape(-1, 64) / 255.0
  train, test = digits.split_indices("train"), digits.split_indices("test")
  xs = {
      k: images[i].astype(np.float32)
      for k, i in (("train", train), ("test", test))
  }
  ys = {"train": data.target[train], "test": data.target[test]}
  model = MLP()
  params = model.init(jax.random.key(0), xs["train"][:1])["params"]
  opt = optax.adam(3e-3)
  state = opt.init(params)

  def loss(p, x, y):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, s):
    g = jax.grad(loss)(p, xs["train"], ys["train"])
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  for _ in range(300):
    params, state = step(params, state)
  test_loss = jax.jit(lambda p: loss(p, xs["test"], ys["test"]))
  return model, params, xs, test_loss


def test_beats_magnitude_on_digits_mlp(digits_mlp):
  """Held-out loss with the hidden layers pruned (the classifier dense, as the
  zoo's uniform selections keep the head), and the layer-wise objective
  ||X W - X W'|| on held-out inputs for every layer, classifier included."""
  model, params, xs, test_loss = digits_mlp
  dense = float(test_loss(params))
  assert dense < 0.25  # the model did learn
  calib = xs["train"][:512]
  hs = sg.layer_hessians(
      model.apply, {"params": params}, [calib[:256], calib[256:]]
  )
  assert sorted(hs) == ["Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"]
  hidden = r"^Dense_[01]/"
  for s in (0.7, 0.8, 0.9):
    ours, ours_masks = sg.sparsegpt_prune(
        params, hs, s, block_size=32, include=hidden
    )
    mag, mag_masks = compress.layerwise_magnitude(s, include=hidden)(params)
    for name in ("Dense_0", "Dense_1"):
      a = np.asarray(ours_masks[name]["kernel"])
      b = np.asarray(mag_masks[name]["kernel"])
      assert a.sum() == b.sum()  # same per-layer sparsity
    assert ours_masks["Dense_2"]["kernel"] is None
    ours_loss, mag_loss = float(test_loss(ours)), float(test_loss(mag))
    assert ours_loss < 0.85 * mag_loss, (s, dense, ours_loss, mag_loss)

  # Each layer's own inputs on the held-out set, from the dense model.
  _, inter = model.apply(
      {"params": params},
      xs["test"],
      capture_intermediates=True,
      mutable=["intermediates"],
  )
  inputs = [xs["test"]] + [
      np.maximum(
          np.asarray(inter["intermediates"][f"Dense_{i}"]["__call__"][0]), 0
      )
      for i in (0, 1)
  ]
  for s in (0.7, 0.8, 0.9):
    ours, _ = sg.sparsegpt_prune(params, hs, s, block_size=32)
    mag, _ = compress.layerwise_magnitude(s)(params)
    for i, x in enumerate(inputs):
      w = np.asarray(params[f"Dense_{i}"]["kernel"])

      def err(p, x=x, w=w, i=i):
        return np.linalg.norm(x @ (w - np.asarray(p[f"Dense_{i}"]["kernel"])))

      assert err(ours) < 0.9 * err(mag), (s, i, err(ours), err(mag))


def test_nm_is_exact_along_the_input_axis(digits_mlp):
  model, params, xs, _ = digits_mlp
  hs = sg.layer_hessians(model.apply, {"params": params}, [xs["train"][:256]])
  # the classifier's 128 inputs are N:M-divisible like the others
  out, masks = sg.sparsegpt_prune(params, hs, 0.5, nm=(2, 4))
  for name in ("Dense_0", "Dense_1", "Dense_2"):
    mask = np.asarray(masks[name]["kernel"])
    w = np.asarray(out[name]["kernel"])
    groups = mask.reshape(mask.shape[0] // 4, 4, -1).sum(axis=1)
    assert np.all(groups == 2)
    assert np.all(w[~mask] == 0.0)


def test_nm_on_a_conv_groups_input_channels():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(3, 3, 8, 5)).astype(np.float32)
  x = correlated_inputs(rng, 200, 72)
  h = (x.T @ x / 200).astype(np.float32)
  out, masks = sg.sparsegpt_prune(
      {"c": kernel}, {"c": h}, None, nm=(2, 4), block_size=8
  )
  mask = np.asarray(masks["c"])
  assert np.all(mask.reshape(3, 3, 2, 4, 5).sum(axis=3) == 2)  # axis -2
  assert np.all(np.asarray(out["c"])[~mask] == 0.0)


# --------------------------------------------------------------------------
# GPTQ.
# --------------------------------------------------------------------------


def test_gptq_is_on_the_grid_and_beats_rounding():
  x, w, h = dense_case(11, 48, 16, n=400)
  out, masks = sg.gptq_quantize({"k": w}, {"k": h}, 3, block_size=16)
  q = np.asarray(out["k"])
  assert np.asarray(masks["k"]).all()
  scale = np.abs(w).max(axis=0) / 3  # the 3-bit symmetric grid per output
  steps = q / scale
  np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)
  assert np.abs(steps).max() <= 3 + 1e-4
  rtn = np.asarray(compress.fake_quantize(jnp.asarray(w), 3))
  err = lambda v: np.linalg.norm(x @ (w - v))  # noqa: E731
  assert err(q) < 0.8 * err(rtn), (err(q), err(rtn))


# --------------------------------------------------------------------------
# The zoo.
# --------------------------------------------------------------------------


def test_resnet_hessians_for_every_prunable_kernel():
  model = models.ResNet8(num_classes=10)
  x = np.asarray(
      jax.random.uniform(jax.random.key(0), (4, 8, 8, 3)), np.float32
  )
  variables = model.init(jax.random.key(1), x, train=False)
  hs = sg.layer_hessians(model.apply, variables, [x[:2], x[2:]], train=False)
  expected = selected(variables["params"], models.RESNET_PRUNABLE)
  assert list(hs) == [name for name, _ in expected]
  for name, leaf in expected:
    d_in = int(np.prod(leaf.shape[:-1]))
    assert hs[name].shape == (d_in, d_in)
  # The stem sees the images: its Hessian is their im2col (3x3, pad 1).
  rows, _ = numpy_im2col(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
  np.testing.assert_allclose(
      np.asarray(hs["conv_init/kernel"]), rows.T @ rows / len(rows), atol=1e-5
  )
  out, masks = sg.sparsegpt_prune(
      variables["params"], hs, 0.75, select=models.RESNET_PRUNABLE
  )
  for name, leaf in expected:
    mask = next(
        m
        for p, m in jax.tree_util.tree_flatten_with_path(masks)[0]
        if path_str(p) == name
    )
    assert int(mask.sum()) == round(0.25 * leaf.size)
  logits = model.apply({**variables, "params": out}, x, train=False)
  assert np.all(np.isfinite(np.asarray(logits)))


def test_bert_hessians_for_every_prunable_kernel():
  config = models.BertConfig.tiny(
      vocab_size=50,
      max_position_embeddings=16,
      hidden_size=32,
      intermediate_size=64,
  )
  model = models.BertForSequenceClassification(config)
  ids = jax.random.randint(jax.random.key(0), (3, 7), 0, 50)
  mask = jnp.ones_like(ids)
  variables = model.init(jax.random.key(1), ids, train=False)
  batches = [{"input_ids": ids, "attention_mask": mask}, (ids[:1],)]
  hs = sg.layer_hessians(
      model.apply, variables, batches, select=models.BERT_PRUNABLE, train=False
  )
  expected = [
      name for name, _ in selected(variables["params"], models.BERT_PRUNABLE)
  ]
  assert list(hs) == expected and len(expected) == 12
  layer = "bert/encoder/layer_0/attention"
  # Q, K and V read the same inputs.
  np.testing.assert_array_equal(
      np.asarray(hs[f"{layer}/query/kernel"]),
      np.asarray(hs[f"{layer}/key/kernel"]),
  )
  assert hs["bert/encoder/layer_1/output/kernel"].shape == (64, 64)
  # The default selection adds the pooler and the classifier, not embeddings.
  every = sg.layer_hessians(model.apply, variables, batches, train=False)
  assert set(every) - set(hs) == {"bert/pooler/kernel", "classifier/kernel"}
  out, masks = sg.sparsegpt_prune(
      variables["params"], hs, 0.5, nm=(2, 4), select=models.BERT_PRUNABLE
  )
  logits = model.apply({"params": out}, ids, train=False)
  assert np.all(np.isfinite(np.asarray(logits)))
  # With the default selection the embeddings have no Hessian: an error.
  with pytest.raises(
      ValueError, match="no hessian for the selected leaf " "'bert/embeddings/"
  ):
    sg.sparsegpt_prune(variables["params"], every, 0.5)


# --------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------


@pytest.fixture()
def small():
  x, w, h = dense_case(0, 8, 4)
  return {"Dense_0": {"kernel": w}}, {"Dense_0/kernel": h}


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            dict(sparsity=1.5),
            ValueError,
            r"sparsity must be in \[0, 1\], got 1.5",
        ),
        (dict(sparsity=-0.1), ValueError, r"sparsity must be in \[0, 1\]"),
        (dict(sparsity="0.5"), TypeError, "sparsity must be a real number"),
        (dict(sparsity=None), ValueError, "sparsity is None"),
        (
            dict(sparsity=0.3, nm=(2, 4)),
            ValueError,
            r"nm=\(2, 4\) prunes 0.5 of the weights but sparsity=0.3",
        ),
        (
            dict(sparsity=None, nm=(5, 4)),
            ValueError,
            r"1 <= n <= m, got nm=\(5, 4\)",
        ),
        (dict(sparsity=None, nm=(0, 4)), ValueError, "1 <= n <= m"),
        (
            dict(sparsity=None, nm=(2, 3)),
            ValueError,
            "block_size=128 is not a multiple of m=3",
        ),
        (
            dict(sparsity=None, nm=(2, 4.0)),
            TypeError,
            r"nm\[1\] \(m\) must be an int",
        ),
        (dict(sparsity=None, nm=2), TypeError, "nm must be a pair"),
        (
            dict(sparsity=None, nm=(2, 16), block_size=16),
            ValueError,
            "leaf 'Dense_0/kernel' has 8 inputs along axis 0, not a multiple of 16",
        ),
        (
            dict(sparsity=0.5, block_size=0),
            ValueError,
            "block_size must be >= 1, got 0",
        ),
        (
            dict(sparsity=0.5, block_size=4.0),
            TypeError,
            "block_size must be an int",
        ),
        (
            dict(sparsity=0.5, damp=-1.0),
            ValueError,
            "damp must be a finite number >= 0",
        ),
        (dict(sparsity=0.5, damp=float("nan")), ValueError, "damp must be"),
        (dict(sparsity=0.5, include="nothing"), ValueError, "matches no leaf"),
        (
            dict(sparsity=0.5, masks={"Dense_0": {"kernel": None}}),
            ValueError,
            "masks= fixes the pruned weights",
        ),
    ],
)
def test_bad_options_raise(small, kwargs, error, message):
  params, hs = small
  with pytest.raises(error, match=message) as info:
    sg.sparsegpt_prune(params, hs, **kwargs)
  assert "sparsegpt_prune" in str(info.value)


def test_bad_hessians_raise(small):
  params, hs = small
  h = hs["Dense_0/kernel"]
  with pytest.raises(
      ValueError, match="no hessian for the selected leaf 'Dense_0/kernel'"
  ):
    sg.sparsegpt_prune(params, {"Dense_1/kernel": h}, 0.5)
  with pytest.raises(
      ValueError,
      match=r"'Dense_0/kernel' has shape \(4, 4\), expected \(8, 8\)",
  ):
    sg.sparsegpt_prune(params, {"Dense_0/kernel": h[:4, :4]}, 0.5)
  with pytest.raises(TypeError, match="hessians must be a dict"):
    sg.sparsegpt_prune(params, [h], 0.5)
  with pytest.raises(
      TypeError, match="hessian of leaf 'Dense_0/kernel' must be a float array"
  ):
    sg.sparsegpt_prune(params, {"Dense_0/kernel": h.astype(np.int32)}, 0.5)
  bad = h.copy()
  bad[0, 0] = np.nan
  with pytest.raises(ValueError, match="'Dense_0/kernel' has non-finite"):
    sg.sparsegpt_prune(params, {"Dense_0/kernel": bad}, 0.5)
  with pytest.raises(
      ValueError, match="'Dense_0/kernel'.*not positive definite"
  ):
    sg.sparsegpt_prune(
        params, {"Dense_0/kernel": -np.eye(8, dtype=np.float32)}, 0.5
    )
  with pytest.raises(ValueError, match="bits must be in \\[2, 16\\], got 1"):
    sg.gptq_quantize(params, hs, 1)
  # 'params/...' paths find the Hessians of variables['params'] paths.
  out, _ = sg.sparsegpt_prune({"params": params}, hs, 0.5)
  assert np.sum(np.asarray(out["params"]["Dense_0"]["kernel"]) != 0) == 16


def test_layer_hessians_bad_input():
  model = MLP()
  x = np.zeros((2, 64), np.float32)
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(
      TypeError, match="layer_hessians: batches must be an iterable"
  ):
    sg.layer_hessians(model.apply, variables, x)
  with pytest.raises(ValueError, match="layer_hessians: batches is empty"):
    sg.layer_hessians(model.apply, variables, [])
  with pytest.raises(TypeError, match="layer_hessians: variables must be"):
    sg.layer_hessians(model.apply, variables["params"], [x])
  with pytest.raises(
      TypeError, match="layer_hessians: apply_fn must be callable"
  ):
    sg.layer_hessians(None, variables, [x])
  with pytest.raises(
      ValueError, match="layer_hessians: no Dense or Conv layer"
  ):
    sg.layer_hessians(
        model.apply, variables, [x], select=lambda p, leaf: p.endswith("bias")
    )
  grouped = nn.Conv(4, (3, 3), feature_group_count=2)
  xc = np.zeros((1, 5, 5, 4), np.float32)
  with pytest.raises(ValueError, match="leaf 'kernel' is a grouped conv"):
    sg.layer_hessians(grouped.apply, grouped.init(jax.random.key(0), xc), [xc])

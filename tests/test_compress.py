"""Compressors against NumPy oracles (stable sorts), plus their error messages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cram_jax import compress

# ---------------------------------------------------------------- oracles


def topk_oracle(flat_abs: np.ndarray, k: int) -> np.ndarray:
  """Keep the k largest; ties to the lower index (stable sort on -|w|)."""
  order = np.argsort(-flat_abs, kind="stable")
  keep = np.zeros(flat_abs.shape, bool)
  keep[order[:k]] = True
  return keep


def nm_oracle(x: np.ndarray, n: int, m: int) -> np.ndarray:
  moved = np.moveaxis(np.abs(x), -2, -1)
  blocks = moved.reshape(-1, m)
  keep = np.zeros(blocks.shape, bool)
  for row, block in enumerate(blocks):
    keep[row, np.argsort(-block, kind="stable")[:n]] = True
  return np.moveaxis(keep.reshape(moved.shape), -1, -2)


# ---------------------------------------------------------------- strategies

# Few distinct values, so duplicates and zeros are common.
values = st.sampled_from(
    [0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 2.0, 3.25, -3.25, 1e-30, 7.0]
)


PALETTE = np.asarray(
    [0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 2.0, 3.25, -3.25, 1e-30, 7.0], np.float32
)


@st.composite
def param_trees(draw, min_leaves=1, max_leaves=3):
  """Leaves of up to ~1700 weights (past the 128-slice counting path), drawn from a
  seed: continuous values, or a small palette full of duplicates and zeros."""
  tree = {}
  for i in range(draw(st.integers(min_leaves, max_leaves))):
    shape = tuple(draw(st.lists(st.integers(1, 12), min_size=2, max_size=3)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
      data = rng.normal(size=shape).astype(np.float32)
    else:
      data = rng.choice(PALETTE, size=shape)
    tree[f"layer{i}"] = {"kernel": data, "bias": np.ones(shape[-1], np.float32)}
  return tree


def kernels(tree):
  return [tree[name]["kernel"] for name in sorted(tree)]


# ---------------------------------------------------------------- global / layerwise


@given(tree=param_trees(), sparsity=st.floats(0.0, 1.0))
def test_global_magnitude_matches_stable_sort_oracle(tree, sparsity):
  params = jax.tree.map(jnp.asarray, tree)
  pruned, masks = jax.jit(compress.global_magnitude(sparsity))(params)
  mask_list = [np.asarray(masks[n]["kernel"]) for n in sorted(tree)]
  flat_abs = np.concatenate([np.abs(k).ravel() for k in kernels(tree)])
  k = round((1 - sparsity) * flat_abs.size)
  expected = topk_oracle(flat_abs, k)
  got = np.concatenate([m.ravel() for m in mask_list])
  np.testing.assert_array_equal(got, expected)
  # The properties, stated directly.
  assert got.sum() == k
  if 0 < k < flat_abs.size:
    assert flat_abs[got].min() >= flat_abs[~got].max()
  for n in sorted(tree):
    assert masks[n]["bias"] is None
    np.testing.assert_array_equal(pruned[n]["bias"], tree[n]["bias"])
    np.testing.assert_array_equal(
        pruned[n]["kernel"], np.where(masks[n]["kernel"], tree[n]["kernel"], 0)
    )


@given(tree=param_trees(), sparsity=st.floats(0.0, 1.0))
def test_layerwise_magnitude_matches_oracle_per_leaf(tree, sparsity):
  params = jax.tree.map(jnp.asarray, tree)
  _, masks = jax.jit(compress.layerwise_magnitude(sparsity))(params)
  for n in sorted(tree):
    kernel = tree[n]["kernel"]
    k = round((1 - sparsity) * kernel.size)
    np.testing.assert_array_equal(
        np.asarray(masks[n]["kernel"]).ravel(),
        topk_oracle(np.abs(kernel).ravel(), k),
    )


@settings(max_examples=15)  # two compilations per example
@given(tree=param_trees(), sparsity=st.floats(0.0, 1.0))
def test_masks_identical_for_equal_inputs(tree, sparsity):
  # Two separately built and compiled compressors, on fresh copies of the values.
  a = jax.jit(compress.global_magnitude(sparsity))(
      jax.tree.map(jnp.asarray, tree)
  )[1]
  b = jax.jit(compress.global_magnitude(sparsity))(
      jax.tree.map(lambda x: jnp.asarray(x.copy()), tree)
  )[1]
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_traced_sparsity_equals_static():
  rng = np.random.default_rng(0)
  params = {
      "a": jnp.asarray(rng.normal(size=(40, 30)), jnp.float32),
      "b": jnp.asarray(rng.normal(size=(3, 3, 8, 16)), jnp.float32),
  }
  traced = jax.jit(lambda p, s: compress.global_magnitude(s)(p)[1])
  for s in (0.0, 0.25, 0.5, 0.7, 0.9, 0.95, 1.0):
    static = compress.global_magnitude(s)(params)[1]
    jax.tree.map(
        np.testing.assert_array_equal, traced(params, jnp.float32(s)), static
    )


def test_multi_level_samples_each_level_and_keeps_exact_counts():
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.normal(size=(50, 20)), jnp.float32)}
  levels = [0.5, 0.7, 0.9]
  fn = jax.jit(compress.global_magnitude(levels))
  seen = []
  for i in range(60):
    kept = int(fn(params, jax.random.key(i))[1]["w"].sum())
    assert kept in {round((1 - s) * 1000) for s in levels}
    seen.append(kept)
  counts = np.unique(seen, return_counts=True)[1]
  assert len(counts) == 3 and counts.min() >= 10  # uniform-ish over 60 draws


def test_float64_and_bfloat16_leaves():
  rng = np.random.default_rng(2)
  raw = rng.normal(size=(16, 8)).astype(np.float32)
  params = {"bf16": jnp.asarray(raw, jnp.bfloat16), "f32": jnp.asarray(raw)}
  _, masks = compress.global_magnitude(0.75)(params)
  flat = np.concatenate(
      [
          np.abs(np.asarray(params["bf16"], np.float32)).ravel(),
          np.abs(raw).ravel(),
      ]
  )
  got = np.concatenate(
      [np.asarray(masks["bf16"]).ravel(), np.asarray(masks["f32"]).ravel()]
  )
  np.testing.assert_array_equal(got, topk_oracle(flat, round(0.25 * flat.size)))


def test_selection_include_exclude():
  params = {
      "params": {
          "conv_init": {"kernel": jnp.ones((3, 3, 3, 8))},
          "block": {"kernel": jnp.ones((3, 3, 8, 8))},
          "head": {"kernel": jnp.ones((8, 10)), "bias": jnp.ones(10)},
      }
  }
  _, masks = compress.layerwise_magnitude(0.5, exclude=("conv_init", "head"))(
      params
  )
  assert masks["params"]["conv_init"]["kernel"] is None
  assert masks["params"]["head"]["kernel"] is None
  assert masks["params"]["block"]["kernel"] is not None
  _, masks = compress.global_magnitude(0.5, include=r"head/kernel$")(params)
  assert masks["params"]["head"]["kernel"] is not None
  assert masks["params"]["block"]["kernel"] is None


# ---------------------------------------------------------------- N:M


@st.composite
def nm_cases(draw):
  n, m = draw(st.sampled_from([(1, 2), (2, 4), (4, 8), (1, 4), (3, 4), (4, 4)]))
  lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
  shape = lead + (m * draw(st.integers(1, 3)), draw(st.integers(1, 4)))
  size = int(np.prod(shape))
  data = np.asarray(
      draw(st.lists(values, min_size=size, max_size=size)), np.float32
  )
  return n, m, data.reshape(shape)


@given(case=nm_cases())
def test_n_of_m_matches_oracle_and_every_group_is_valid(case):
  n, m, kernel = case
  pruned, masks = jax.jit(compress.n_of_m(n, m))({"k": jnp.asarray(kernel)})
  mask = np.asarray(masks["k"])
  np.testing.assert_array_equal(mask, nm_oracle(kernel, n, m))
  groups = np.moveaxis(mask, -2, -1).reshape(-1, m)
  assert (groups.sum(-1) == n).all()
  mags = np.moveaxis(np.abs(kernel), -2, -1).reshape(-1, m)
  for g, a in zip(groups, mags):
    if n < m:
      assert a[g].min() >= a[~g].max()
  np.testing.assert_array_equal(pruned["k"], np.where(mask, kernel, 0))


def test_n_of_m_groups_along_inputs_of_dense_and_conv():
  dense = np.arange(1, 9, dtype=np.float32).reshape(8, 1) * np.ones(
      (1, 3), np.float32
  )
  _, masks = compress.n_of_m(2, 4)({"Dense_0": {"kernel": jnp.asarray(dense)}})
  # Along axis 0 (inputs): in every 4 consecutive rows, the last two (largest) survive.
  np.testing.assert_array_equal(
      np.asarray(masks["Dense_0"]["kernel"])[:, 0], [0, 0, 1, 1, 0, 0, 1, 1]
  )
  conv = np.broadcast_to(
      np.arange(1, 5, dtype=np.float32)[None, None, :, None], (3, 3, 4, 2)
  )
  _, masks = compress.n_of_m(2, 4)({"Conv_0": {"kernel": jnp.asarray(conv)}})
  np.testing.assert_array_equal(
      np.asarray(masks["Conv_0"]["kernel"])[1, 2, :, 1], [0, 0, 1, 1]
  )


def test_random_choice_uses_one_of_the_compressors():
  rng = np.random.default_rng(3)
  params = {
      "a": jnp.asarray(rng.normal(size=(8, 8)), jnp.float32),
      "b": jnp.ones(4),
  }
  two_four = compress.n_of_m(2, 4)(params)[1]["a"]
  four_eight = compress.n_of_m(4, 8)(params)[1]["a"]
  fn = jax.jit(
      compress.random_choice([compress.n_of_m(2, 4), compress.n_of_m(4, 8)])
  )
  picked = set()
  for i in range(20):
    mask = fn(params, jax.random.key(i))[1]["a"]
    if np.array_equal(mask, two_four):
      picked.add("2:4")
    elif np.array_equal(mask, four_eight):
      picked.add("4:8")
    else:
      raise AssertionError("mask is neither 2:4 nor 4:8")
  assert picked == {"2:4", "4:8"}


def test_random_choice_unifies_skipped_leaves():
  params = {"first": jnp.ones((3, 4)), "rest": jnp.arange(64.0).reshape(8, 8)}
  fn = compress.random_choice(
      [
          compress.n_of_m(2, 4, on_indivisible="skip"),
          compress.global_magnitude(0.5),
      ]
  )
  _, masks = jax.jit(fn)(params, jax.random.key(0))
  assert masks["first"].shape == (3, 4)


# ---------------------------------------------------------------- quantisation


@given(
    bits=st.integers(2, 8),
    data=st.lists(st.floats(-5, 5, width=32), min_size=12, max_size=12),
)
def test_quantize_matches_numpy_oracle(bits, data):
  kernel = np.asarray(data, np.float32).reshape(4, 3)
  quantised, masks = jax.jit(compress.quantize(bits))(
      {"k": jnp.asarray(kernel)}
  )
  levels = 2 ** (bits - 1) - 1
  peak = np.abs(kernel).max(axis=0, keepdims=True)
  scale = np.where(peak > 0, peak / levels, 1.0).astype(np.float32)
  expected = np.clip(np.round(kernel / scale), -levels, levels) * scale
  np.testing.assert_allclose(quantised["k"], expected, rtol=1e-6, atol=1e-6)
  assert np.all(np.abs(np.asarray(quantised["k"]) - kernel) <= scale / 2 + 1e-6)
  assert np.asarray(masks["k"]).all()


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), [0.5, 1.2], []])
def test_sparsity_out_of_range_is_rejected(bad):
  with pytest.raises(ValueError, match="sparsity"):
    compress.global_magnitude(bad)
  with pytest.raises(ValueError, match="sparsity"):
    compress.layerwise_magnitude(bad)


@pytest.mark.parametrize(
    "n,m,match",
    [(5, 4, "1 <= n <= m"), (0, 4, "1 <= n <= m"), (-1, 2, "1 <= n <= m")],
)
def test_n_of_m_bad_arguments(n, m, match):
  with pytest.raises(ValueError, match=match):
    compress.n_of_m(n, m)


def test_n_of_m_type_and_policy_errors():
  with pytest.raises(TypeError, match="n must be an int"):
    compress.n_of_m(2.0, 4)
  with pytest.raises(ValueError, match="on_indivisible"):
    compress.n_of_m(2, 4, on_indivisible="pad")


def test_indivisible_axis_names_the_leaf():
  params = {"Dense_0": {"kernel": jnp.ones((6, 8))}}
  with pytest.raises(
      ValueError,
      match=r"leaf 'Dense_0/kernel' has 6 inputs along axis 0, "
      r"not a multiple of 4",
  ):
    compress.n_of_m(2, 4)(params)
  # The explicit policy leaves it dense instead.
  with pytest.raises(ValueError, match="every selected leaf was skipped"):
    compress.n_of_m(2, 4, on_indivisible="skip")(params)


def test_selection_matching_no_leaf():
  params = {"Dense_0": {"kernel": jnp.ones((4, 4))}}
  with pytest.raises(ValueError, match="matches no leaf"):
    compress.global_magnitude(0.5, include="nothing_here")(params)
  with pytest.raises(ValueError, match="matches no leaf"):
    compress.global_magnitude(0.5)({"bias": jnp.ones(4)})


def test_non_float_leaf_explicitly_selected():
  params = {"table": jnp.ones((4, 4), jnp.int32), "k": jnp.ones((4, 4))}
  with pytest.raises(TypeError, match="leaf 'table'.*int32"):
    compress.global_magnitude(0.5, include="table")(params)
  # The default rule skips integer leaves.
  _, masks = compress.global_magnitude(0.5)(params)
  assert masks["table"] is None
  with pytest.raises(TypeError, match="leaf 'table'"):
    compress.global_magnitude(0.5, select=lambda path, leaf: True)(params)


def test_multi_level_without_key():
  with pytest.raises(ValueError, match="needs a PRNG key"):
    compress.global_magnitude([0.5, 0.9])({"k": jnp.ones((4, 4))})


def test_quantize_bad_bits():
  with pytest.raises(ValueError, match=r"bits must be in \[2, 16\], got 1"):
    compress.quantize(1)
  with pytest.raises(TypeError, match="bits must be an int"):
    compress.quantize(4.0)


def test_select_and_patterns_together():
  with pytest.raises(ValueError, match="either select= or include="):
    compress.global_magnitude(0.5, select=compress.Selection(), exclude="x")
  with pytest.raises(ValueError, match="not a valid regex"):
    compress.Selection(include="(")


def test_check_masks_mismatch():
  params = {"a": jnp.ones((2, 2)), "b": jnp.ones(2)}
  with pytest.raises(ValueError, match="does not match the params tree"):
    compress.check_masks(params, {"a": jnp.ones((2, 2), bool)}, owner="t")
  with pytest.raises(ValueError, match="leaf 'a' has shape"):
    compress.check_masks(
        params, {"a": jnp.ones((2, 3), bool), "b": None}, owner="t"
    )
  with pytest.raises(TypeError, match="leaf 'a' has dtype float32"):
    compress.check_masks(params, {"a": jnp.ones((2, 2)), "b": None}, owner="t")


def test_level_argument_sweeps_levels_with_one_compilation():
  rng = np.random.default_rng(4)
  params = {
      "a": jnp.asarray(rng.normal(size=(30, 20)), jnp.float32),
      "b": jnp.asarray(rng.normal(size=(7, 9)), jnp.float32),
  }
  levels = [0.5, 0.8, 0.95]
  for make in (compress.global_magnitude, compress.layerwise_magnitude):
    swept = jax.jit(make(levels))
    for i, s in enumerate(levels):
      jax.tree.map(
          np.testing.assert_array_equal,
          swept(params, level=i)[1],
          make(s)(params)[1],
      )
    assert swept._cache_size() == 1
  with pytest.raises(ValueError, match="level must index one of the 3"):
    compress.global_magnitude(levels)(params, level=3)

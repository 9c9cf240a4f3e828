"""Compressors against NumPy oracles (stable sorts), plus their error messages."""

import collections
import re

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


# What a failed run-time range check raises: the host callback's ValueError
# (CPU), or a backend's JaxRuntimeError carrying its message.
RUN_TIME_ERRORS = (ValueError, jax.errors.JaxRuntimeError)

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


# Both ways of finding the cut ("auto" is search on CPU, digits on GPU): each
# must give the oracle's masks.
SCHEDULES = ("search", "digits")


# ---------------------------------------------------------------- global / layerwise


@pytest.mark.parametrize("schedule", SCHEDULES)
@settings(max_examples=25)  # per schedule: one compilation per example
@given(tree=param_trees(), sparsity=st.floats(0.0, 1.0))
def test_global_magnitude_matches_stable_sort_oracle(schedule, tree, sparsity):
  params = jax.tree.map(jnp.asarray, tree)
  fn = compress.global_magnitude(sparsity, schedule=schedule)
  pruned, masks = jax.jit(fn)(params)
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


@pytest.mark.parametrize("schedule", SCHEDULES)
@settings(max_examples=25)  # per schedule: one compilation per example
@given(tree=param_trees(), sparsity=st.floats(0.0, 1.0))
def test_layerwise_magnitude_matches_oracle_per_leaf(schedule, tree, sparsity):
  params = jax.tree.map(jnp.asarray, tree)
  fn = compress.layerwise_magnitude(sparsity, schedule=schedule)
  _, masks = jax.jit(fn)(params)
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
  # 16-bit floats rank on 16-bit keys; 1e-30 stays above 0 in bfloat16 and
  # flushes to 0 in float16 (more ties).
  dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]))
  return n, m, np.asarray(jnp.asarray(data.reshape(shape), dtype))


@given(case=nm_cases())
def test_n_of_m_matches_oracle_and_every_group_is_valid(case):
  n, m, kernel = case
  pruned, masks = jax.jit(compress.n_of_m(n, m))({"k": jnp.asarray(kernel)})
  mask = np.asarray(masks["k"])
  # The oracle ranks the same values in float32 (16-bit floats embed exactly).
  kernel = kernel.astype(np.float32)
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


@pytest.mark.parametrize(
    "bad",
    [
        -0.1,
        1.5,
        float("nan"),
        float("inf"),
        -float("inf"),
        [0.5, 1.2],
        [],
        np.array([]),
        np.full((2, 2), 0.5),
    ],
)
def test_sparsity_out_of_range_is_rejected(bad):
  with pytest.raises(ValueError, match="sparsity"):
    compress.global_magnitude(bad)
  with pytest.raises(ValueError, match="sparsity"):
    compress.layerwise_magnitude(bad)


@pytest.mark.parametrize(
    "bad", [True, np.bool_(False), "0.5", None, [0.5, True], 0.5 + 0j, {0.5}]
)
def test_sparsity_of_the_wrong_type_is_rejected(bad):
  # A bool is not a number here: True would otherwise prune everything.
  for make in (compress.global_magnitude, compress.layerwise_magnitude):
    with pytest.raises(TypeError, match=r"sparsity must be a real number"):
      make(bad)


@pytest.mark.parametrize("as_array", [np.asarray, jnp.asarray])
def test_levels_given_as_an_array_are_a_list_of_levels(as_array):
  rng = np.random.default_rng(7)
  kernel = rng.normal(size=(12, 10)).astype(np.float32)
  levels = [0.25, 0.6, 0.9]
  compress_fn = compress.global_magnitude(as_array(levels))
  assert len(compress_fn.levels) == 3
  for i, s in enumerate(levels):
    _, masks = compress_fn({"k": jnp.asarray(kernel)}, level=i)
    want = topk_oracle(np.abs(kernel).ravel(), round((1 - s) * kernel.size))
    np.testing.assert_array_equal(np.asarray(masks["k"]).ravel(), want)


@pytest.mark.parametrize(
    "make,level,sparsity,match",
    [
        (compress.global_magnitude, 3, None, "got 3"),
        (compress.global_magnitude, -1, None, "got -1"),
        (compress.layerwise_magnitude, 7, None, "got 7"),
        (
            compress.global_magnitude,
            None,
            1.5,
            r"sparsity must be in \[0, 1\], got 1.5",
        ),
        (compress.global_magnitude, None, float("nan"), "got nan"),
        (compress.layerwise_magnitude, None, -0.25, "got -0.25"),
    ],
)
def test_traced_level_or_sparsity_out_of_range_is_loud_under_jit(
    make, level, sparsity, match
):
  """Traced values cannot be checked at trace time: the run itself raises,
  never clamps (a ValueError carrying the message on CPU; a backend may wrap
  the callback's error in a JaxRuntimeError)."""
  params = {"k": jnp.asarray(np.random.default_rng(0).normal(size=(6, 5)))}
  if level is not None:
    run = jax.jit(lambda p, i: make([0.5, 0.7, 0.9])(p, level=i))
    arg = level
  else:
    run = jax.jit(lambda p, s: make(s)(p))
    arg = sparsity
  with pytest.raises(RUN_TIME_ERRORS, match=match):
    jax.block_until_ready(run(params, arg))


def test_traced_range_check_costs_no_host_call_when_in_range(monkeypatch):
  from cram_jax.compress import validate  # noqa: PLC0415

  calls = []
  real = validate._raise_out_of_range
  monkeypatch.setattr(
      validate,
      "_raise_out_of_range",
      lambda *a, **k: (calls.append(a), real(*a, **k)),
  )
  rng = np.random.default_rng(1)
  params = {"k": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)}
  levels = [0.2, 0.5, 0.8]
  sweep = jax.jit(lambda p, i: compress.global_magnitude(levels)(p, level=i))
  for i in range(3):
    jax.block_until_ready(sweep(params, i))
  assert calls == []  # the cond's reporting branch never ran
  # Under vmap the cond runs both branches; the host re-check keeps quiet.
  batched = jax.vmap(lambda i: sweep(params, i)[1]["k"])(jnp.arange(3))
  for i, s in enumerate(levels):
    want = topk_oracle(
        np.abs(np.asarray(params["k"])).ravel(), round((1 - s) * 30)
    )
    np.testing.assert_array_equal(np.asarray(batched[i]).ravel(), want)
  calls.clear()
  with pytest.raises(RUN_TIME_ERRORS, match="got 3"):
    jax.block_until_ready(sweep(params, 3))
  assert len(calls) == 1


@pytest.mark.parametrize(
    "level,error,match",
    [
        (3, ValueError, "level must index one of the 3"),
        (np.int64(-1), ValueError, "got -1"),
        (jnp.asarray(5), ValueError, "got 5"),
        (1.5, TypeError, "level must be an int index, got 1.5"),
        (True, TypeError, "level must be an int index, got True"),
        ("1", TypeError, "level must be an int index"),
        (np.float32(1), TypeError, "dtype float32"),
        (np.array([0, 1]), ValueError, r"scalar index, got shape \(2,\)"),
    ],
)
def test_bad_concrete_level_is_rejected_before_tracing(level, error, match):
  params = {"k": jnp.ones((4, 4))}
  for make in (compress.global_magnitude, compress.layerwise_magnitude):
    with pytest.raises(error, match=match):
      make([0.5, 0.7, 0.9])(params, level=level)


@pytest.mark.parametrize(
    "key,error,match",
    [
        ("abc", TypeError, "key must be a PRNG key"),
        (1.5, TypeError, "key must be a PRNG key"),
        (True, TypeError, "got True"),
        (np.zeros(3, np.uint32), ValueError, r"must have shape \(2,\)"),
        (np.zeros(2, np.float32), TypeError, "dtype float32"),
        (
            jax.random.split(jax.random.key(0)),
            ValueError,
            "a single PRNG key",
        ),
    ],
)
def test_bad_keys_are_rejected(key, error, match):
  params = {"k": jnp.ones((4, 4))}
  for make in (
      lambda: compress.global_magnitude([0.5, 0.7]),
      lambda: compress.global_magnitude(0.5),  # needs no key, checks it
      lambda: compress.n_of_m(2, 4),
      lambda: compress.quantize(8),
      lambda: compress.random_choice([compress.n_of_m(2, 4)]),
  ):
    with pytest.raises(error, match=match):
      make()(params, key)
  # The accepted forms.
  for key in (0, np.int64(3), jax.random.key(1), jax.random.PRNGKey(2)):
    compress.global_magnitude([0.5, 0.7])(params, key)


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
  with pytest.raises(TypeError, match="n must be an int, got True"):
    compress.n_of_m(True, 4)
  with pytest.raises(TypeError, match="axis must be an int, got 1.5"):
    compress.n_of_m(2, 4, axis=1.5)
  with pytest.raises(ValueError, match="on_indivisible"):
    compress.n_of_m(2, 4, on_indivisible="pad")
  with pytest.raises(ValueError, match="on_indivisible"):
    compress.n_of_m(2, 4, on_indivisible=None)
  with pytest.raises(
      ValueError, match="leaf 'k' of shape \\(8, 4\\) has no axis 5"
  ):
    compress.n_of_m(2, 4, axis=5)({"k": jnp.ones((8, 4))})


@pytest.mark.parametrize(
    "n,m,axis,shape,error,match",
    [
        (3, 2, -2, (8, 4), ValueError, "needs 1 <= n <= m, got n=3, m=2"),
        (0, 4, -2, (8, 4), ValueError, "needs 1 <= n <= m"),
        (2, 0, -2, (8, 4), ValueError, "needs 1 <= n <= m"),
        (-1, 4, -2, (8, 4), ValueError, "needs 1 <= n <= m"),
        (2.0, 4, -2, (8, 4), TypeError, "n must be an int, got 2.0"),
        (2, True, -2, (8, 4), TypeError, "m must be an int, got True"),
        (2, 4, 5, (8, 4), ValueError, "2 dimensions, no axis 5"),
        (2, 4, 1.5, (8, 4), TypeError, "axis must be an int, got 1.5"),
        (
            2,
            3,
            -2,
            (8, 4),
            ValueError,
            "8 entries along axis 0, not a multiple of 3",
        ),
        (2, 4, -2, (), ValueError, "0 dimensions, no axis -2"),
    ],
)
def test_nm_mask_bad_arguments(n, m, axis, shape, error, match):
  # Before: nm_mask(x, 3, 2) kept every weight.
  with pytest.raises(error, match=match):
    compress.nm_mask(jnp.ones(shape), n, m, axis)


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


@pytest.mark.parametrize(
    "bits,error,match",
    [
        (1, ValueError, r"bits must be in \[2, 16\], got 1"),
        (0, ValueError, r"bits must be in \[2, 16\], got 0"),
        (33, ValueError, r"bits must be in \[2, 16\], got 33"),
        (4.0, TypeError, "bits must be an int, got 4.0"),
        (True, TypeError, "bits must be an int, got True"),
    ],
)
def test_quantize_bad_bits(bits, error, match):
  # Before: fake_quantize(x, 1) returned NaN everywhere.
  with pytest.raises(error, match=match):
    compress.quantize(bits)
  with pytest.raises(error, match=match):
    compress.fake_quantize(jnp.ones((4, 4)), bits)


@pytest.mark.parametrize(
    "x,axis,error,match",
    [
        (
            jnp.ones((4, 3)),
            5,
            ValueError,
            r"x of shape \(4, 3\) has 2 dimensions, no axis 5",
        ),
        (jnp.ones((4, 3)), -3, ValueError, "no axis -3"),
        (jnp.ones((4, 3)), 1.5, TypeError, "axis must be an int, got 1.5"),
        (jnp.ones(()), -1, ValueError, "0 dimensions, no axis -1"),
        (jnp.ones((4, 3), jnp.int32), -1, TypeError, "floating-point array"),
        ("abc", -1, TypeError, "floating-point array, got 'abc'"),
    ],
)
def test_fake_quantize_bad_array_or_axis(x, axis, error, match):
  # Before: axis=5 on a 2-D array quietly used axis 1 (5 % 2).
  with pytest.raises(error, match=match):
    compress.fake_quantize(x, 8, axis=axis)


def test_fake_quantize_honours_axis():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(5, 4)).astype(np.float32)
  for axis in (0, 1, -1):
    keep = tuple(a for a in range(2) if a != axis % 2)
    scale = np.abs(x).max(axis=keep, keepdims=True) / 7  # 4 bits: 7 levels
    want = np.clip(np.round(x / scale), -7, 7) * scale
    np.testing.assert_allclose(
        compress.fake_quantize(jnp.asarray(x), 4, axis=axis), want, rtol=1e-6
    )


def test_quantize_bad_axis():
  with pytest.raises(TypeError, match="axis must be an int, got 'x'"):
    compress.quantize(8, axis="x")
  with pytest.raises(ValueError, match="leaf 'k' of shape"):
    compress.quantize(8, axis=2)({"k": jnp.ones((4, 4))})


def test_select_and_patterns_together():
  with pytest.raises(ValueError, match="either select= or include="):
    compress.global_magnitude(0.5, select=compress.Selection(), exclude="x")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (
            dict(include=5),
            TypeError,
            "include must be a regex string or a list",
        ),
        (dict(exclude=3.5), TypeError, "exclude must be a regex string"),
        (
            dict(exclude=["a", 3]),
            TypeError,
            "exclude patterns must be strings, got 3",
        ),
        (dict(include="("), ValueError, "not a valid regex"),
        (dict(include=[]), ValueError, "include is an empty list; use None"),
        (dict(min_ndim=True), TypeError, "min_ndim must be an int, got True"),
        (dict(min_ndim=2.0), TypeError, "min_ndim must be an int, got 2.0"),
        (dict(min_ndim=-1), ValueError, "non-negative"),
    ],
)
def test_selection_bad_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    compress.Selection(**kwargs)


def test_bad_select_callables():
  params = {"k": jnp.ones((4, 4))}
  with pytest.raises(TypeError, match="use include='kernel'"):
    compress.global_magnitude(0.5, select="kernel")
  with pytest.raises(
      TypeError,
      match=r"select\('k', leaf\) must return True or False, got None",
  ):
    compress.global_magnitude(0.5, select=lambda path, leaf: None)(params)
  # Compiled patterns and concrete bool arrays are fine.
  import re  # noqa: PLC0415

  _, masks = compress.global_magnitude(
      0.5, select=compress.Selection(include=re.compile("k"))
  )(params)
  assert masks["k"] is not None
  _, masks = compress.global_magnitude(
      0.5, select=lambda path, leaf: jnp.asarray(path == "k")
  )(params)
  assert masks["k"] is not None


def _params_only(p, key=None):
  return p


@pytest.mark.parametrize(
    "args,error,match",
    [
        (([],), ValueError, "needs at least one compressor"),
        ((compress.n_of_m(2, 4),), TypeError, "must be a list of compressors"),
        (([0.5],), TypeError, r"compressors\[0\]: compressor must be callable"),
        (
            ([compress.global_magnitude],),
            TypeError,
            r"did you mean global_magnitude\(...\)",
        ),
        (
            ([compress.n_of_m(2, 4), compress.n_of_m(1, 4)], [True, False]),
            TypeError,
            r"probabilities\[0\] must be a real number, got True",
        ),
        (
            ([compress.n_of_m(2, 4), compress.n_of_m(1, 4)], [float("nan"), 1]),
            ValueError,
            "2 non-negative numbers summing to 1",
        ),
        (
            ([compress.n_of_m(2, 4), compress.n_of_m(1, 4)], "ab"),
            TypeError,
            "probabilities must be a list of numbers",
        ),
        (
            ([compress.n_of_m(2, 4), compress.n_of_m(1, 4)], [1.0]),
            ValueError,
            "summing to 1, got \\[1.0\\]",
        ),
    ],
)
def test_random_choice_bad_arguments(args, error, match):
  with pytest.raises(error, match=match):
    compress.random_choice(*args)


def test_random_choice_bad_compressor_outputs():
  params = {"k": jnp.ones((4, 4))}
  with pytest.raises(
      TypeError, match=r"compressors\[0\] must return a pair .* got a dict"
  ):
    compress.random_choice([_params_only])(params, 0)
  with pytest.raises(ValueError, match="needs a PRNG key"):
    compress.random_choice([compress.n_of_m(2, 4)])(params)


@pytest.mark.parametrize("fn", [compress.check_masks, compress.apply_masks])
@pytest.mark.parametrize(
    "masks,error,match",
    [
        (
            {"a": jnp.ones((2, 2), bool)},
            ValueError,
            "missing from the mask tree: \\['b'\\]",
        ),
        (
            {"a": jnp.ones((2, 2), bool), "b": None, "c": None},
            ValueError,
            "extra leaves in the mask tree: \\['c'\\]",
        ),
        (
            {"a": jnp.ones((2, 3), bool), "b": None},
            ValueError,
            r"leaf 'a' has shape \(2, 3\), the params leaf has shape \(2, 2\)",
        ),
        # Broadcastable, so jnp.where would have broadcast it silently.
        (
            {"a": jnp.ones((1, 2), bool), "b": None},
            ValueError,
            r"leaf 'a' has shape \(1, 2\), the params leaf has shape \(2, 2\)",
        ),
        (
            {"a": jnp.ones((2, 2)), "b": None},
            TypeError,
            "leaf 'a' has dtype float32, not bool",
        ),
        ({"a": "yes", "b": None}, TypeError, "leaf 'a' is not an array"),
        (None, ValueError, "masks is None"),
    ],
)
def test_masks_that_do_not_fit_params(fn, masks, error, match):
  params = {"a": jnp.ones((2, 2)), "b": jnp.ones(2)}
  with pytest.raises(error, match=match):
    if fn is compress.check_masks:
      fn(params, masks)
    else:
      fn(masks, params)


def test_masks_in_another_container_with_the_same_paths_fit():
  from flax.core import FrozenDict  # noqa: PLC0415

  params = {"a": jnp.arange(4.0).reshape(2, 2), "b": jnp.ones(2)}
  masks = FrozenDict(
      {"a": jnp.asarray([[True, False], [False, True]]), "b": None}
  )
  out = compress.apply_masks(masks, params)
  assert isinstance(out, dict)
  np.testing.assert_array_equal(out["a"], [[0.0, 0.0], [0.0, 3.0]])
  np.testing.assert_array_equal(out["b"], [1.0, 1.0])


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


# ---------------------------------------------------------------- distributions


def erk_oracle(shapes, sparsity, dense=()):
  """Closed-form ERK densities, jaxpruner-style: one most-dense layer at a time.

  Density_i = eps * sum(shape_i) / prod(shape_i), scaled so that the layers keep
  round((1 - s) * N) weights; a layer over density 1 is kept whole and eps is
  solved again for the rest. Returns (densities, saturated set, kept target).
  """
  sizes = np.asarray([np.prod(s) for s in shapes], np.float64)
  raw = np.asarray([np.sum(s) / np.prod(s) for s in shapes], np.float64)
  target = round((1 - sparsity) * sizes.sum())
  whole = set(dense)
  saturated = set()
  while True:
    rest = [i for i in range(len(shapes)) if i not in whole | saturated]
    budget = target - sum(sizes[i] for i in whole | saturated)
    eps = budget / sum(raw[i] * sizes[i] for i in rest)
    top = max(raw[i] for i in rest)
    if eps * top > 1:
      saturated |= {i for i in rest if raw[i] == top}
      continue
    break
  density = np.ones(len(shapes))
  for i in rest:
    density[i] = eps * raw[i]
  return density, saturated, target


# Conv and dense kernels of different shapes; at 50% the 1x1 shortcut and the
# head saturate (ERK favours small, thin layers) and the rest are re-scaled.
ERK_SHAPES = {
    "conv_init": (3, 3, 3, 16),
    "block/conv": (3, 3, 16, 32),
    "block/shortcut": (1, 1, 16, 32),
    "mlp/kernel": (32, 64),
    "head": (64, 10),
}


def erk_params(seed=0, shapes=ERK_SHAPES):
  rng = np.random.default_rng(seed)
  return {
      name: {"kernel": jnp.asarray(rng.normal(size=shape), jnp.float32)}
      for name, shape in shapes.items()
  }


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.97])
def test_erk_densities_match_the_closed_form(sparsity):
  params = erk_params()
  names = sorted(ERK_SHAPES)  # the flatten order
  shapes = [ERK_SHAPES[n] for n in names]
  density, saturated, target = erk_oracle(shapes, sparsity)
  if sparsity == 0.5:  # the case with saturated layers, re-scaled rest
    assert {names[i] for i in saturated} == {"block/shortcut", "head"}
  _, masks = jax.jit(compress.layerwise_magnitude(compress.erk(sparsity)))(
      params
  )
  kept = [int(np.asarray(masks[n]["kernel"]).sum()) for n in names]
  sizes = [int(np.prod(s)) for s in shapes]
  assert sum(kept) == target  # exact total
  for i, (k, n, d) in enumerate(zip(kept, sizes, density)):
    if i in saturated:
      assert k == n
    else:
      assert abs(k - d * n) < 1  # floor or ceil of the ideal count
  # Largest remainder: exactly the leaves with the largest fractional parts
  # are rounded up (no near-ties in these shapes).
  rest = [i for i in range(len(names)) if i not in saturated]
  frac = {
      i: density[i] * sizes[i] - np.floor(density[i] * sizes[i]) for i in rest
  }
  up = {i for i in rest if kept[i] > np.floor(density[i] * sizes[i])}
  by_frac = sorted(rest, key=lambda i: -frac[i])
  assert up == set(by_frac[: len(up)])
  # The distribution reports the same split without pruning.
  reported = compress.erk(sparsity)(params)
  for n, k, size in zip(names, kept, sizes):
    assert reported[n]["kernel"] == pytest.approx(1 - k / size, abs=1e-12)
  assert jax.tree.leaves(compress.erk(sparsity).kept(params)) == kept
  # Each leaf keeps its k largest magnitudes.
  for n, k in zip(names, kept):
    w = np.abs(np.asarray(params[n]["kernel"])).ravel()
    np.testing.assert_array_equal(
        np.asarray(masks[n]["kernel"]).ravel(), topk_oracle(w, k)
    )


@settings(max_examples=25)  # one compilation per example
@given(tree=param_trees(min_leaves=2, max_leaves=4), sparsity=st.floats(0, 1))
def test_erk_exact_total_and_per_leaf_masks_match_oracle(tree, sparsity):
  params = jax.tree.map(jnp.asarray, tree)
  _, masks = jax.jit(compress.layerwise_magnitude(compress.erk(sparsity)))(
      params
  )
  names = sorted(tree)
  shapes = [tree[n]["kernel"].shape for n in names]
  density, saturated, target = erk_oracle(shapes, sparsity)
  kept = [int(np.asarray(masks[n]["kernel"]).sum()) for n in names]
  assert sum(kept) == target
  for i, n in enumerate(names):
    size = tree[n]["kernel"].size
    if i in saturated:
      assert kept[i] == size
    else:
      assert abs(kept[i] - density[i] * size) < 1 + 1e-9
    assert masks[n]["bias"] is None
    np.testing.assert_array_equal(
        np.asarray(masks[n]["kernel"]).ravel(),
        topk_oracle(np.abs(tree[n]["kernel"]).ravel(), kept[i]),
    )


def test_erk_dense_leaves_count_in_the_total_and_get_no_mask():
  params = erk_params(1)
  names = sorted(ERK_SHAPES)
  shapes = [ERK_SHAPES[n] for n in names]
  stem = names.index("conv_init")
  density, saturated, target = erk_oracle(shapes, 0.9, dense={stem})
  pruned, masks = compress.layerwise_magnitude(
      compress.erk(0.9, dense="conv_init")
  )(params)
  assert masks["conv_init"]["kernel"] is None
  np.testing.assert_array_equal(
      pruned["conv_init"]["kernel"], params["conv_init"]["kernel"]
  )
  kept = {
      n: int(np.asarray(masks[n]["kernel"]).sum())
      for n in names
      if n != "conv_init"
  }
  assert sum(kept.values()) + int(np.prod(shapes[stem])) == target
  for n, k in kept.items():
    i = names.index(n)
    n_i = int(np.prod(shapes[i]))
    assert k == n_i if i in saturated else abs(k - density[i] * n_i) < 1


def test_uniform_is_the_plain_number():
  params = erk_params(2)
  for s in (0.3, [0.5, 0.9]):
    a = jax.jit(compress.layerwise_magnitude(s))(params, level=0)[1]
    b = jax.jit(compress.layerwise_magnitude(compress.uniform(s)))(
        params, level=0
    )[1]
    jax.tree.map(np.testing.assert_array_equal, a, b)
  traced = jax.jit(
      lambda p, s: compress.layerwise_magnitude(compress.uniform(s))(p)[1]
  )(params, jnp.float32(0.3))
  jax.tree.map(
      np.testing.assert_array_equal,
      traced,
      compress.layerwise_magnitude(0.3)(params)[1],
  )


@settings(max_examples=20)  # one compilation per example
@given(
    tree=param_trees(min_leaves=3, max_leaves=3),
    s0=st.floats(0, 1),
    s1=st.floats(0, 1),
)
def test_user_map_first_match_wins_and_none_stays_dense(tree, s0, s1):
  params = jax.tree.map(jnp.asarray, tree)
  mapping = {"layer0/": None, "layer[01]/": s0, ".*": s1}  # layer1 -> s0
  pruned, masks = jax.jit(compress.layerwise_magnitude(mapping))(params)
  assert masks["layer0"]["kernel"] is None
  np.testing.assert_array_equal(
      pruned["layer0"]["kernel"], tree["layer0"]["kernel"]
  )
  for name, s in (("layer1", s0), ("layer2", s1)):
    w = tree[name]["kernel"]
    np.testing.assert_array_equal(
        np.asarray(masks[name]["kernel"]).ravel(),
        topk_oracle(np.abs(w).ravel(), round((1 - s) * w.size)),
    )


def test_user_map_default_and_levels_with_level_under_jit():
  params = erk_params(3)
  dist = compress.custom(
      {"conv_init": None, "head": [0.0, 0.5, 0.8]}, default=[0.5, 0.7, 0.9]
  )
  assert dist.num_levels == 3
  fn = jax.jit(compress.layerwise_magnitude(dist))
  for i, (head_s, rest_s) in enumerate(zip([0.0, 0.5, 0.8], [0.5, 0.7, 0.9])):
    masks = fn(params, level=i)[1]
    assert masks["conv_init"]["kernel"] is None
    for name, shape in ERK_SHAPES.items():
      if name == "conv_init":
        continue
      s = head_s if name == "head" else rest_s
      assert int(masks[name]["kernel"].sum()) == round((1 - s) * np.prod(shape))
  assert fn._cache_size() == 1
  # A default of None leaves unmatched leaves dense.
  masks = compress.layerwise_magnitude(
      compress.custom({"head": 0.5}, default=None)
  )(params)[1]
  assert [n for n in ERK_SHAPES if masks[n]["kernel"] is not None] == ["head"]


def test_erk_levels_sweep_with_level_under_jit_and_sample_with_a_key():
  params = erk_params(4)
  levels = [0.5, 0.7, 0.9]
  swept = jax.jit(compress.layerwise_magnitude(compress.erk(levels)))
  singles = []
  for i, s in enumerate(levels):
    single = compress.layerwise_magnitude(compress.erk(s))(params)[1]
    jax.tree.map(
        np.testing.assert_array_equal, swept(params, level=i)[1], single
    )
    singles.append(sum(int(m.sum()) for m in jax.tree.leaves(single)))
  assert swept._cache_size() == 1
  total = sum(int(np.prod(s)) for s in ERK_SHAPES.values())
  assert singles == [round((1 - s) * total) for s in levels]
  seen = set()
  for k in range(30):
    masks = swept(params, jax.random.key(k))[1]
    seen.add(sum(int(m.sum()) for m in jax.tree.leaves(masks)))
  assert seen == set(singles)
  with pytest.raises(ValueError, match="level must index one of the 3"):
    compress.layerwise_magnitude(compress.erk(levels))(params, level=3)
  with pytest.raises(RUN_TIME_ERRORS, match="level must index one of the 3"):
    jax.block_until_ready(swept(params, level=3))


@pytest.mark.parametrize(
    "make,error,match",
    [
        (
            lambda: compress.erk(1.5),
            ValueError,
            r"erk\(1.5\): sparsity must be in \[0, 1\], got 1.5",
        ),
        (lambda: compress.erk([0.5, -0.1]), ValueError, "got -0.1"),
        (lambda: compress.erk("0.9"), TypeError, "must be a real number"),
        (
            lambda: compress.erk(0.9, dense=3),
            TypeError,
            "dense must be a regex",
        ),
        (
            lambda: compress.erk(0.9, dense="("),
            ValueError,
            "dense pattern '\\(' is not a valid regex",
        ),
        (
            lambda: compress.custom({"head": 2.0}),
            ValueError,
            "pattern 'head': sparsity must be in",
        ),
        (
            lambda: compress.custom({"head": "x"}),
            TypeError,
            "must be a real number",
        ),
        (lambda: compress.custom({}), TypeError, "non-empty dict"),
        (
            lambda: compress.custom({"a": [0.1, None]}),
            TypeError,
            "None cannot be one of a list of levels",
        ),
        (lambda: compress.custom([("head", 0.5)]), TypeError, "non-empty dict"),
        (
            lambda: compress.custom({1: 0.5}),
            TypeError,
            "map keys must be regex strings, got 1",
        ),
        (
            lambda: compress.custom({"[": 0.5}),
            ValueError,
            "pattern '\\[' is not a valid regex",
        ),
        (
            lambda: compress.custom({"a": [0.1, 0.2], "b": [0.1, 0.2, 0.3]}),
            ValueError,
            r"same length, got lengths \[2, 3\]",
        ),
        (
            lambda: compress.custom({"a": 0.5}, default=1.1),
            ValueError,
            "default: sparsity must be in",
        ),
        (lambda: compress.uniform(float("nan")), ValueError, "must be in"),
        (
            lambda: compress.global_magnitude(compress.erk(0.9)),
            TypeError,
            r"layer-wise by definition; use layerwise_magnitude\(erk\(0.9\)\)",
        ),
        (
            lambda: compress.global_magnitude({".*": 0.9}),
            TypeError,
            "layer-wise by definition",
        ),
    ],
)
def test_bad_distributions_are_rejected_at_construction(make, error, match):
  with pytest.raises(error, match=match):
    make()


@pytest.mark.parametrize(
    "dist,match",
    [
        (
            compress.custom({"conv_init": None, "hed": 0.9, ".*": 0.5}),
            r"pattern 'hed' decides no leaf: it matches no prunable leaf",
        ),
        (
            compress.custom({".*": 0.5, "head": 0.9}),
            r"pattern 'head' decides no leaf: its leaves \['head/kernel'\] are taken by earlier patterns",
        ),
        (
            compress.custom({"head": 0.9}),
            r"prunable leaf 'block/conv/kernel' matches no pattern",
        ),
        (compress.custom({".*": None}), "every prunable leaf is left dense"),
        (
            compress.erk(0.9, dense="nothing"),
            "dense pattern 'nothing' matches no prunable leaf",
        ),
        (
            compress.erk(0.95, dense="block/conv"),
            r"the leaves kept dense \(\['block/conv/kernel'\]\) hold 4608 of the 8240 weights, more than the 412",
        ),
    ],
)
def test_distributions_that_do_not_fit_the_params(dist, match):
  params = erk_params(5)
  with pytest.raises(ValueError, match=match):
    compress.layerwise_magnitude(dist)(params)
  with pytest.raises(ValueError, match=match):
    dist(params)


def test_erk_errors_for_traced_targets_and_scalar_leaves():
  with pytest.raises(TypeError, match="ERK needs a concrete target sparsity"):
    jax.jit(lambda s: compress.erk(s))(jnp.float32(0.5))
  params = {"w": jnp.ones((4, 4)), "s": jnp.ones(())}
  with pytest.raises(ValueError, match="leaf 's' is a scalar"):
    compress.layerwise_magnitude(
        compress.erk(0.5), select=compress.Selection(min_ndim=0)
    )(params)
  with pytest.raises(ValueError, match=r"level must be in \[0, 0\], got 1"):
    compress.erk(0.5)(params, level=1)


# ---------------------------------------------------------------- 16-bit, ties, sharding

LEVELS = (0.0, 0.3, 0.5, 0.9, 1.0)


@st.composite
def tie_trees(draw, dtype):
  """1-3 leaves in ``dtype``: integer values from a small range (many ties) or
  normal draws (distinct in float32, tied after rounding to 16 bits)."""
  tree = {}
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  distinct = draw(st.sampled_from([1, 3, 8, None]))
  for i in range(draw(st.integers(1, 3))):
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=2, max_size=3)))
    if distinct is None:
      data = rng.normal(size=shape)
    else:
      data = rng.integers(-distinct, distinct + 1, size=shape)
    tree[f"layer{i}"] = jnp.asarray(data, dtype)
  return tree


def _as_f32(tree):
  return [np.asarray(tree[n], np.float32) for n in sorted(tree)]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_large_leaves_keep_or_drop_their_ties_whole_around_the_cut(
    dtype, schedule
):
  # Every |w| equal: the ties are kept in flat order, so every leaf before the
  # cut keeps all of its weights and every leaf after it none. Leaves past
  # _BRANCH_MIN entries take those masks from a branch of their own, which a
  # closed form checks here, with the cut in the small middle leaf (half
  # kept: 256*512 + 2048 of 2*256*512 + 64*64) and in the last, large one.
  shapes = {"a": (256, 512), "b": (64, 64), "c": (512, 256)}
  rng = np.random.default_rng(3)
  tree = {
      n: jnp.asarray(rng.choice([-1.0, 1.0], size=shape), dtype)
      for n, shape in shapes.items()
  }
  sizes = [int(np.prod(shape)) for shape in shapes.values()]
  fn = jax.jit(compress.global_magnitude([0.5, 0.25], schedule=schedule))
  for level, kept in enumerate([sizes[0] + 2048, sizes[0] + sizes[1] + 64512]):
    pruned, masks = fn(tree, level=level)
    got = np.concatenate([np.asarray(masks[n]).ravel() for n in shapes])
    np.testing.assert_array_equal(got, np.arange(sum(sizes)) < kept)
    for n in shapes:
      np.testing.assert_array_equal(
          np.asarray(pruned[n]), np.where(masks[n], tree[n], 0)
      )


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@settings(max_examples=8)  # one compilation per example sweeps the levels
@given(data=st.data())
def test_global_16_bit_and_tied_inputs_match_oracle(dtype, schedule, data):
  tree = data.draw(tie_trees(dtype))
  swept = jax.jit(compress.global_magnitude(LEVELS, schedule=schedule))
  flat = np.concatenate([np.abs(x).ravel() for x in _as_f32(tree)])
  for level, s in enumerate(LEVELS):
    masks = swept(tree, level=level)[1]
    got = np.concatenate([np.asarray(masks[n]).ravel() for n in sorted(tree)])
    np.testing.assert_array_equal(
        got, topk_oracle(flat, round((1 - s) * flat.size)), err_msg=f"{s=}"
    )


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@settings(max_examples=8)
@given(data=st.data())
def test_layerwise_16_bit_and_tied_inputs_match_oracle(dtype, schedule, data):
  tree = data.draw(tie_trees(dtype))
  swept = jax.jit(compress.layerwise_magnitude(LEVELS, schedule=schedule))
  for level, s in enumerate(LEVELS):
    masks = swept(tree, level=level)[1]
    for n, x in zip(sorted(tree), _as_f32(tree)):
      np.testing.assert_array_equal(
          np.asarray(masks[n]).ravel(),
          topk_oracle(np.abs(x).ravel(), round((1 - s) * x.size)),
          err_msg=f"{n} {s=}",
      )


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("keep", [0, 1, 7, 30, 31, 45, 59, 60, 61, 89, 90])
def test_ties_cut_in_the_first_middle_or_last_leaf(dtype, keep, schedule):
  # 90 equal magnitudes in three leaves (30 each) and a few larger ones; the
  # cut through the ties falls in leaf 0, 1 or 2 depending on keep.
  leaves = [np.full((5, 6), -2.0, np.float32) for _ in range(3)]
  leaves[1][0, 0] = leaves[2][4, 5] = 3.0  # two strictly above the tie value
  tree = {f"l{i}": jnp.asarray(x, dtype) for i, x in enumerate(leaves)}
  size = 90
  s = 1 - keep / size
  masks = jax.jit(compress.global_magnitude(s, schedule=schedule))(tree)[1]
  got = np.concatenate([np.asarray(masks[f"l{i}"]).ravel() for i in range(3)])
  flat = np.concatenate([np.abs(x).ravel() for x in leaves])
  np.testing.assert_array_equal(got, topk_oracle(flat, keep))
  assert got.sum() == keep


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("seed", [0, 1])
def test_interleaved_shapes_match_oracle(seed, schedule):
  # Leaves of three shapes alternate in tree order and few distinct values
  # make ties at every level, so the cut through the ties walks the flat
  # index across leaves of different shapes.
  rng = np.random.default_rng(seed)
  shapes = [(4, 6), (3, 2, 4), (4, 6), (3, 2, 4), (4, 6), (2, 5)]
  leaves = [rng.integers(-2, 3, size=sh).astype(np.float32) for sh in shapes]
  tree = {f"l{i}": jnp.asarray(x) for i, x in enumerate(leaves)}
  levels = (0.0, 0.2, 0.45, 0.6, 0.85, 1.0)
  by_global = jax.jit(compress.global_magnitude(levels, schedule=schedule))
  by_layer = jax.jit(compress.layerwise_magnitude(levels, schedule=schedule))
  flat = np.concatenate([np.abs(x).ravel() for x in leaves])
  for level, s in enumerate(levels):
    masks = by_global(tree, level=level)[1]
    got = np.concatenate([np.asarray(masks[f"l{i}"]).ravel() for i in range(6)])
    np.testing.assert_array_equal(
        got, topk_oracle(flat, round((1 - s) * flat.size)), err_msg=f"{s=}"
    )
    masks = by_layer(tree, level=level)[1]
    for i, x in enumerate(leaves):
      np.testing.assert_array_equal(
          np.asarray(masks[f"l{i}"]).ravel(),
          topk_oracle(np.abs(x).ravel(), round((1 - s) * x.size)),
          err_msg=f"l{i} {s=}",
      )


def _lowered_ops(fn, tree, platform):
  """The multiset of StableHLO op names of ``fn(tree)`` lowered for ``platform``."""
  text = jax.jit(fn).trace(tree).lower(lowering_platforms=(platform,)).as_text()
  return collections.Counter(re.findall(r"stablehlo\.[a-z_]+", text))


@pytest.mark.parametrize("kind", ["global", "layerwise"])
def test_auto_schedule_is_digits_on_gpus_and_search_elsewhere(kind):
  # Lowered for one platform, lax.platform_dependent keeps only that
  # platform's branch (plus a constant switch around it): the ops of "auto"
  # are those of the chosen schedule, and none of the other's.
  make = {
      "global": compress.global_magnitude,
      "layerwise": compress.layerwise_magnitude,
  }[kind]
  rng = np.random.default_rng(0)
  tree = {
      "a": jnp.asarray(rng.normal(size=(64, 300)), jnp.float32),
      "b": jnp.asarray(rng.normal(size=(3, 3, 8, 16)), jnp.float32),
  }
  wrapper = {"stablehlo.constant", "stablehlo.case", "stablehlo.return"}
  for platform, chosen, other in [
      ("cuda", "digits", "search"),
      ("rocm", "digits", "search"),
      ("cpu", "search", "digits"),
  ]:
    auto = _lowered_ops(make(0.9), tree, platform)
    want = _lowered_ops(make(0.9, schedule=chosen), tree, platform)
    not_want = _lowered_ops(make(0.9, schedule=other), tree, platform)
    assert not want - auto, (platform, want - auto)
    assert set(auto - want) <= wrapper, (platform, auto - want)
    # The schedules differ (else this test could not tell them apart).
    assert set(not_want - auto) - wrapper, platform


@pytest.mark.parametrize(
    "schedule, error",
    [
        ("radix", ValueError),
        ("Search", ValueError),
        (None, TypeError),
        (2, TypeError),
    ],
)
def test_bad_schedule_is_rejected_at_construction(schedule, error):
  for make in (compress.global_magnitude, compress.layerwise_magnitude):
    with pytest.raises(
        error, match=r"schedule must be one of 'auto', 'search'"
    ):
      make(0.9, schedule=schedule)


def _sharded_cases():
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((8,), ("d",))
  mesh2 = jax.make_mesh((2, 4), ("a", "b"))
  return [
      ("fsdp axis 0", NamedSharding(mesh, P("d", None))),
      ("fsdp axis 1", NamedSharding(mesh, P(None, "d"))),
      ("2-d mesh", NamedSharding(mesh2, P("a", "b"))),
      ("2-d mesh, swapped", NamedSharding(mesh2, P("b", "a"))),
      ("replicated", NamedSharding(mesh, P())),
  ]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_sharded_params_give_the_masks_of_unsharded_ones(dtype):
  assert jax.device_count() == 8  # tests/conftest.py
  rng = np.random.default_rng(7)
  # Few distinct values: the tie search runs too.
  tree = {
      "a": jnp.asarray(rng.integers(-4, 5, size=(64, 16)), dtype),
      "b": jnp.asarray(rng.normal(size=(32, 24)), dtype),
  }
  fns = [
      compress.global_magnitude(0.7),
      compress.layerwise_magnitude(0.6),
      compress.n_of_m(2, 4),
  ]
  want = [jax.jit(fn)(tree)[1] for fn in fns]
  for name, sharding in _sharded_cases():
    sharded = jax.device_put(tree, sharding)
    for fn, expected in zip(fns, want):
      got = jax.jit(fn)(sharded)[1]
      for leaf in tree:
        np.testing.assert_array_equal(
            np.asarray(got[leaf]), np.asarray(expected[leaf]), err_msg=name
        )


def test_blocks_of_a_sharded_axis_that_split_runs_or_groups():
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  # 24 rows over 8 devices: blocks of 3 rows, not a multiple of 4 or 8.
  x = np.random.default_rng(8).normal(size=(24, 16)).astype(np.float32)
  mesh = jax.make_mesh((8,), ("d",))
  sharded = {"k": jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("d")))}
  for fn in (compress.global_magnitude(0.5), compress.layerwise_magnitude(0.3)):
    np.testing.assert_array_equal(
        np.asarray(jax.jit(fn)(sharded)[1]["k"]),
        np.asarray(fn({"k": jnp.asarray(x)})[1]["k"]),
    )
  with pytest.raises(
      ValueError,
      match=r"n_of_m\(2, 4\): leaf 'k' of shape \(24, 16\) is split into 8 "
      "shards of 3 along axis 0, not a multiple of 4",
  ):
    jax.jit(compress.n_of_m(2, 4))(sharded)


# -------------------------------------------- the sample bracket is a guess


def _sampled_trees(kind: str, dtype) -> dict[str, jax.Array]:
  """Leaves whose axes are long enough to be sampled (one weight in 64 reads).

  ``misleading``: the sampled weights (entry 0 of every run of 8 rows and of
  8 columns) are far larger than the rest, so the bracket the search takes
  from the sample is wrong for every level; ``ties``: 5 distinct magnitudes;
  ``normal``: distinct draws (tied after rounding to 16 bits). The first
  leaf is large enough to be skipped by a condition when it is settled and to
  take the tie-splitting branch of the final masks (``_BRANCH_MIN``), the
  others are counted and masked without one.
  """
  rng = np.random.default_rng(7)
  tree = {}
  for i, shape in enumerate([(256, 512), (3, 3, 16, 64), (256, 32)]):
    if kind == "ties":
      x = rng.integers(-2, 3, size=shape).astype(np.float32)
    else:
      x = rng.normal(size=shape).astype(np.float32)
    if kind == "misleading":
      rows = (slice(None),) * (len(shape) - 2)
      x[rows + (slice(None, None, 8), slice(None, None, 8))] += 100.0
    tree[f"layer{i}"] = jnp.asarray(x, dtype)
  return tree


@pytest.mark.parametrize("kind", ["misleading", "ties", "normal"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_masks_are_exact_whatever_the_sample_suggests(kind, dtype):
  # The sample only proposes where to look first: the counts on all weights
  # decide, so a misleading sample costs passes, never exactness.
  tree = _sampled_trees(kind, dtype)
  names = sorted(tree)
  leaves = [np.abs(np.asarray(tree[n], np.float32)) for n in names]
  flat = np.concatenate([x.ravel() for x in leaves])
  levels = (0.5, 0.9, 0.97)
  by_global = jax.jit(compress.global_magnitude(levels))
  by_layer = jax.jit(compress.layerwise_magnitude(levels))
  for level, s in enumerate(levels):
    masks = by_global(tree, level=level)[1]
    got = np.concatenate([np.asarray(masks[n]).ravel() for n in names])
    np.testing.assert_array_equal(
        got, topk_oracle(flat, round((1 - s) * flat.size)), err_msg=f"{s=}"
    )
    masks = by_layer(tree, level=level)[1]
    for n, x in zip(names, leaves):
      np.testing.assert_array_equal(
          np.asarray(masks[n]).ravel(),
          topk_oracle(x.ravel(), round((1 - s) * x.size)),
          err_msg=f"{n} {s=}",
      )

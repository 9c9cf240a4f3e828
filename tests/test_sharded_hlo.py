"""Sharded compressors and CrAM steps move no parameter-sized array between devices.

Each compressor, and a full CrAM update step, is compiled for 8 simulated CPU
devices under four shardings of a tiny conv+MLP params tree, and the collectives
of the optimised HLO (``tests/hlo_checks.py``) are inspected:

* ``fsdp_first``: every leaf split 8 ways on its first axis of a size divisible
  by 8 (axis 0 of Dense kernels and biases, the input axis of the 3x3 conv
  kernel, whose spatial axes have 3 entries);
* ``fsdp_last``: every leaf split 8 ways on its last (output) axis;
* ``tensor_parallel``: a 2x4 ``('data', 'model')`` mesh; kernels split over
  ``'model'`` on the input axis and the output axis alternately, biases
  replicated, the batch split over ``'data'``;
* ``mixed``: some leaves replicated, others split 8 ways.

"Parameter-sized" (``hlo_checks.PARAMETER_SIZED``): a collective with an array
of more than 64 elements. The smallest pruned kernel has 16384 weights, so even
a vector of one entry per 128 weights of a leaf (or of a 8-way shard's
transpose) is caught, while the scalars and per-level count vectors that an
exact top-k needs (a sum of counts across shards per bisection pass) pass. N:M
groups of 4 along the input axis never straddle a shard here (every split puts
a multiple of 4 inputs on each device): where they do, communication would be
inherent, not a defect.

Against the masks code of 2026-11 (bit bisection over ``reshape(128, -1)`` of
the flattened leaf) the magnitude compressors fail these checks: XLA gathers the
predicates of the sharded leaves and all-reduces 128-lane partial sums. That is
the acceptance check for the rewrite; N:M passes.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import math
import pathlib
import sys

import hlo_checks
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import cram_jax
from cram_jax import compress

BATCH = 16
SHARDINGS = ("fsdp_first", "fsdp_last", "tensor_parallel", "mixed")
COMPRESSORS = {
    # name: (compressor, levels to run: None for a compressor without level=)
    "global_levels": (compress.global_magnitude([0.5, 0.7, 0.9]), (0, 1, 2)),
    "layerwise": (compress.layerwise_magnitude(0.9), None),
    "layerwise_erk": (compress.layerwise_magnitude(compress.erk(0.9)), None),
    "n_of_m": (compress.n_of_m(2, 4), None),
    # The GPU schedule ("auto" takes it on GPUs), compiled here for CPUs.
    "global_levels_digits": (
        compress.global_magnitude([0.5, 0.7, 0.9], schedule="digits"),
        (0, 1, 2),
    ),
    "layerwise_digits": (
        compress.layerwise_magnitude(0.9, schedule="digits"),
        None,
    ),
}


def make_params() -> dict[str, dict[str, jax.Array]]:
  """A conv + 2-layer MLP tree; every kernel has >= 16384 weights.

  Dense_1's kernel is rounded to quarters, so the magnitude compressors meet
  many ties at their threshold and take the lower-flat-index path.
  """
  k = jax.random.split(jax.random.key(0), 5)
  return {
      "Conv_0": {"kernel": jax.random.normal(k[0], (3, 3, 32, 64))},
      "Dense_0": {
          "kernel": jax.random.normal(k[1], (64, 256)),
          "bias": 0.1 * jax.random.normal(k[2], (256,)),
      },
      "Dense_1": {
          "kernel": jnp.round(4 * jax.random.normal(k[3], (256, 64))) / 4,
          "bias": 0.1 * jax.random.normal(k[4], (64,)),
      },
  }


def loss(params, batch):
  """Squared error of a 3x3 conv on 3x3 patches (one output pixel), then an MLP.

  The conv is written as its einsum: a padded convolution compiles several
  times slower on the partitioned CPU backend, for nothing these tests need.
  """
  x, y = batch
  h = jax.nn.relu(jnp.einsum("bhwi,hwio->bo", x, params["Conv_0"]["kernel"]))
  h = jax.nn.relu(h @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
  out = h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
  return jnp.mean((out - y) ** 2)


def make_batch():
  k1, k2 = jax.random.split(jax.random.key(1))
  return (
      jax.random.normal(k1, (BATCH, 3, 3, 32)),
      jax.random.normal(k2, (BATCH, 64)),
  )


def _compile(lowered):
  """Compiles with LLVM at -O0: twice as fast, and it changes no collective.

  Where collectives go is decided by XLA's HLO passes (SPMD partitioning),
  which run the same at every backend optimisation level.
  """
  return lowered.compile({"xla_backend_optimization_level": 0})


def _split(ndim: int, axis: int, name: str) -> P:
  spec = [None] * ndim
  spec[axis] = name
  return P(*spec)


@functools.cache
def layout(sharding: str) -> tuple[Mesh, dict, P]:
  """``(mesh, params PartitionSpec tree, batch PartitionSpec)`` of a sharding."""
  assert jax.device_count() >= 8, "tests/conftest.py sets 8 CPU devices"
  params = make_params()
  if sharding == "tensor_parallel":
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    kernels = itertools.count()  # in flatten order: Conv_0, Dense_0, Dense_1

    def spec(path, x):
      if x.ndim == 1:
        return P()
      return _split(x.ndim, -2 if next(kernels) % 2 == 0 else -1, "model")

    return mesh, jax.tree_util.tree_map_with_path(spec, params), P("data")
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  if sharding == "fsdp_first":

    def spec(path, x):
      return _split(x.ndim, [d % 8 for d in x.shape].index(0), "data")

  elif sharding == "fsdp_last":

    def spec(path, x):
      return _split(x.ndim, -1, "data")

  else:
    assert sharding == "mixed", sharding
    split = {"Conv_0/kernel": -1, "Dense_0/bias": 0, "Dense_1/kernel": 0}

    def spec(path, x):
      axis = split.get(compress.path_str(path))
      return P() if axis is None else _split(x.ndim, axis, "data")

  return mesh, jax.tree_util.tree_map_with_path(spec, params), P("data")


def param_shardings(sharding: str) -> dict:
  mesh, specs, _ = layout(sharding)
  return jax.tree.map(
      lambda s: NamedSharding(mesh, s),
      specs,
      is_leaf=lambda s: isinstance(s, P),
  )


def state_shardings(sharding: str, state):
  """Optimizer state leaves shaped like a param get its sharding; the rest
  (step counts, PRNG key data) are replicated. All param shapes differ."""
  mesh, _, _ = layout(sharding)
  by_shape = {
      jnp.shape(x): s
      for x, s in zip(
          jax.tree.leaves(make_params()),
          jax.tree.leaves(param_shardings(sharding)),
      )
  }
  return jax.tree.map(
      lambda x: by_shape.get(jnp.shape(x), NamedSharding(mesh, P())), state
  )


def _run_compressor(compressor, levels):
  if levels is None:
    return lambda p: compressor(p)
  return lambda p, level: compressor(p, level=level)


@functools.cache
def compiled_compressor(name: str, sharding: str | None):
  """The compressor jitted for a sharding (None: one device, no sharding).

  The compressed params and the masks are pinned to the params' sharding, as
  a training step needs them: nothing may be gathered to produce them.
  """
  compressor, levels = COMPRESSORS[name]
  fn = _run_compressor(compressor, levels)
  args = [make_params()] + ([jnp.int32(0)] if levels is not None else [])
  if sharding is None:
    return _compile(jax.jit(fn).lower(*args))
  p_sh = param_shardings(sharding)
  in_sh = [p_sh]
  if levels is not None:
    in_sh.append(NamedSharding(layout(sharding)[0], P()))
  _, masks = jax.eval_shape(fn, *args)
  mask_sh = jax.tree.map(
      lambda m, s: None if m is None else s,
      masks,
      p_sh,
      is_leaf=lambda m: m is None,
  )
  return _compile(
      jax.jit(
          fn, in_shardings=tuple(in_sh), out_shardings=(p_sh, mask_sh)
      ).lower(*args)
  )


def _outputs(name: str, sharding: str | None):
  """Every ``(level, compressed, masks)`` of the compressor on ``make_params()``."""
  _, levels = COMPRESSORS[name]
  params = make_params()
  if sharding is not None:
    params = jax.device_put(params, param_shardings(sharding))
  compiled = compiled_compressor(name, sharding)
  if levels is None:
    return [(None, *compiled(params))]
  return [(lv, *compiled(params, jnp.int32(lv))) for lv in levels]


@pytest.mark.parametrize("sharding", SHARDINGS)
@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_compressor_moves_no_parameter_sized_array(name, sharding):
  found = hlo_checks.parameter_sized(compiled_compressor(name, sharding))
  assert not found, (
      f"{name} under {sharding}: parameter-sized collectives\n"
      + hlo_checks.describe(found)
  )


@pytest.mark.parametrize("sharding", SHARDINGS)
@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_compressor_sharded_equals_unsharded_bitwise(name, sharding):
  sparsity = {"layerwise": 0.9, "global_levels": (0.5, 0.7, 0.9)}
  name_of_kind = name.removesuffix("_digits")
  for (level, got_c, got_m), (_, want_c, want_m) in zip(
      _outputs(name, sharding), _outputs(name, None)
  ):
    where = f"{name} (level {level}) under {sharding}"
    for (path, got), want in zip(
        jax.tree_util.tree_leaves_with_path(got_m), jax.tree.leaves(want_m)
    ):
      np.testing.assert_array_equal(
          np.asarray(got), np.asarray(want), f"{where}: {path}"
      )
    for got, want in zip(jax.tree.leaves(got_c), jax.tree.leaves(want_c)):
      assert np.asarray(got).tobytes() == np.asarray(want).tobytes(), where
    # The unsharded reference itself keeps the exact counts (an oracle
    # independent of the sharded program).
    kernels = jax.tree.leaves(want_m)
    if name_of_kind == "global_levels":
      total = sum(m.size for m in kernels)
      s = sparsity[name_of_kind][level]
      assert sum(int(m.sum()) for m in kernels) == round((1 - s) * total)
    elif name_of_kind == "layerwise":
      assert [int(m.sum()) for m in kernels] == [
          round(0.1 * m.size) for m in kernels
      ]
    elif name == "n_of_m":
      for m in kernels:
        groups = np.moveaxis(np.asarray(m), -2, -1).reshape(-1, 4)
        assert (groups.sum(-1) == 2).all()


# The CrAM step: what is legitimate.
#
# A data-parallel or FSDP step moves parameter-sized arrays by nature: FSDP
# all-gathers each kernel for the forward and backward pass, and the gradient
# of a batch split across devices is summed across them (an all-reduce, or a
# reduce-scatter into the params' sharding; XLA's CPU backend all-reduces then
# slices); activations of the split batch cross devices too. A CrAM step
# evaluates the gradient twice (at x and at the compressed perturbed point), so
# two SGD steps of the same model, loss, batch and shardings are its budget.
# Everything else in CrAM (the perturbation x + rho * g, the masks, the
# compression, masking g2, the CrAM+ sum, the SGD update) is elementwise or a
# top-k by counting, and needs at most scalars and per-level counts across
# devices. So the CrAM step may have at most twice as many parameter-sized
# collectives (more than 64 elements) as the SGD step, moving at most twice
# as many elements in their parameter-sized arrays.
#
# Totals, not one budget per op or per shape: XLA partitions the two programs
# independently and may trade an all-gather of an activation for an
# all-reduce, or combine collectives differently (measured: under `mixed`, a
# CrAM step with a collective-free compressor all-reduces 12% more than two SGD
# steps but moves 17% fewer elements in all). The slack this leaves is why the
# compressor tests above also check each compressor alone, where the budget is
# zero: they catch what this cannot, e.g. XLA gathering the perturbed params
# once and reusing the copy for both the mask and the forward pass.


def _train_step(tx, cram_like: bool):
  def step(params, state, batch):
    grads = jax.grad(loss)(params, batch)
    extra = (
        {"grad_fn": lambda p, _: jax.grad(loss)(p, batch)} if cram_like else {}
    )
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  return step


@functools.cache
def compiled_step(method: str, sharding: str):
  if method == "cram":
    tx = cram_jax.cram(
        optax.sgd(0.1, momentum=0.9),
        compress.global_magnitude([0.5, 0.7, 0.9]),
        rho=0.05,
        plus=True,
    )
  else:
    tx = optax.sgd(0.1, momentum=0.9)
  params = make_params()
  state = tx.init(params)
  mesh, _, batch_spec = layout(sharding)
  p_sh = param_shardings(sharding)
  s_sh = state_shardings(sharding, state)
  b_sh = (NamedSharding(mesh, batch_spec),) * 2
  return _compile(
      jax.jit(
          _train_step(tx, method == "cram"),
          in_shardings=(p_sh, s_sh, b_sh),
          out_shardings=(p_sh, s_sh),
      ).lower(params, state, make_batch())
  )


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_sgd_step_has_parameter_sized_collectives(sharding):
  """Positive control: the parser sees the traffic every sharding needs
  (FSDP gathers, gradient sums over the batch axis)."""
  assert hlo_checks.parameter_sized(compiled_step("sgd", sharding))


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_cram_step_adds_no_parameter_sized_collective(sharding):
  cram_step, sgd_step = (compiled_step(m, sharding) for m in ("cram", "sgd"))
  (count, volume), (sgd_count, sgd_volume) = map(
      hlo_checks.traffic, (cram_step, sgd_step)
  )
  sgd = hlo_checks.parameter_sized(sgd_step)
  extra = hlo_checks.excess(hlo_checks.parameter_sized(cram_step), sgd + sgd)
  assert count <= 2 * sgd_count and volume <= 2 * sgd_volume, (
      f"CrAM step under {sharding}: {count} parameter-sized collectives moving "
      f"{volume} elements; two SGD steps: {2 * sgd_count} moving "
      f"{2 * sgd_volume}. Those not in two SGD steps:\n"
      + hlo_checks.describe(extra)
  )


def test_parser_reads_shapes_async_and_tuples():
  text = """
HloModule m
ENTRY %main (p0: f32[8,256], p1: f32[4]) -> f32[64,256] {
  %p0 = f32[8,256]{1,0} parameter(0)
  %p1 = f32[4]{0} parameter(1)
  %ag = (f32[8,256]{1,0}, f32[64,256]{1,0}) all-gather-start(%p0), dimensions={0}
  %agd = f32[64,256]{1,0} all-gather-done(%ag)
  %ar = (f32[4]{0}, u8[128]{0}) all-reduce(f32[4]{0} %p1, u8[128]{0} %x), to_apply=%add
  %cp = f32[4]{0} collective-permute(%p1), source_target_pairs={{0,1}}
  ROOT %r = f32[64,256]{1,0} copy(%agd)
}
"""
  found = hlo_checks.collectives(text)
  assert [(c.op, c.elements) for c in found] == [
      ("all-gather", 16384),
      ("all-reduce", 128),
      ("collective-permute", 4),
  ]
  assert found[0].operands == (("f32", (8, 256)),)
  assert [c.op for c in hlo_checks.parameter_sized(text)] == [
      "all-gather",
      "all-reduce",
  ]
  # Elements read + written in arrays over 64 entries.
  assert hlo_checks.volume_by_op(text) == {
      "all-gather": 2 * 8 * 256 + 64 * 256,
      "all-reduce": 2 * 128,
  }


def test_a_gathering_compressor_is_caught():
  """Positive control for the compressor check: a global threshold by
  ``jnp.sort`` of the concatenated magnitudes needs the whole model on one
  device."""

  def sort_prune(params):
    leaves = [x for x in jax.tree.leaves(params) if x.ndim >= 2]
    flat = jnp.concatenate([jnp.abs(x).ravel() for x in leaves])
    t = jnp.sort(flat)[math.floor(0.9 * flat.size)]
    return jax.tree.map(lambda x: jnp.where(jnp.abs(x) >= t, x, 0), params)

  compiled = _compile(
      jax.jit(sort_prune, in_shardings=(param_shardings("fsdp_last"),)).lower(
          make_params()
      )
  )
  assert hlo_checks.parameter_sized(compiled)


@functools.cache
def _load_benchmark():
  """``benchmarks/masks.py`` as a module (benchmarks/ is not a package)."""
  path = pathlib.Path(__file__).parent.parent / "benchmarks" / "masks.py"
  spec = importlib.util.spec_from_file_location("benchmark_masks", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its dataclasses look themselves up here
  spec.loader.exec_module(module)
  return module


def test_benchmark_runs_on_a_tiny_tree(capsys):
  """``benchmarks/masks.py --quick`` end to end on a tiny tree, so the script
  cannot rot (its real trees are far too big for a test)."""
  masks = _load_benchmark()
  tiny = masks.make_params({"conv": (3, 3, 8, 16), "dense": (16, 32)})
  args = masks.parse_args(
      ["--quick", "--draws", "2", "--only", "global", "n_of_m"]
  )
  assert args.repeats == 2 and args.trees == ["resnet50"] and args.draws == 2
  assert masks.parse_args(["--quick"]).draws == 1
  assert masks.parse_args([]).draws == 3
  again = masks.redraw(tiny, 1)  # the second draw: new weights, same shapes
  for x, y in zip(jax.tree.leaves(tiny), jax.tree.leaves(again), strict=True):
    assert x.shape == y.shape and y.dtype == jnp.float32
    assert not np.array_equal(x, y)
  rows, checks = masks.run(args, {"tiny": tiny})
  names = [r.name for r in rows]
  assert names == [
      "global(0.9)",
      "n_of_m(2, 4)",
      "global magnitude, jnp.sort threshold (reference)",
      "global magnitude, lax.top_k threshold (reference)",
      "2:4, double argsort (reference)",
  ]
  for r in rows:
    assert 0 < r.seconds < 60 and 0 < r.floor_seconds < 60, r
  for r in rows[:2]:
    assert r.compile_seconds > 0 and r.bf16_ratio > 0 and r.sharded_ratio > 0
    # Two draws, the reported ratio their median (the mean of two).
    assert len(r.draw_ratios) == 2
    assert r.floor_ratio == pytest.approx(sum(r.draw_ratios) / 2)
  # N:M along the input axis of kernels split on the output axis: local.
  assert rows[1].sharded_collectives == 0
  # 4 targets per compressor, one speed-up per reference.
  assert len(checks) == 2 * 4 + 3
  out = capsys.readouterr().out
  table = [line for line in out.splitlines() if line.startswith("| tiny |")]
  assert len(table) == len(rows)
  status = [line.split()[0] for line in out.splitlines() if " (" in line]
  assert sorted(set(status) & {"PASS", "FAIL"}) and len(
      [s for s in status if s in ("PASS", "FAIL")]
  ) == len(checks)


def test_schedules_benchmark_runs_on_a_tiny_tree(capsys):
  """``benchmarks/schedules.py`` end to end on a tiny tree (it checks that the
  two schedules give equal masks before timing them)."""
  sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "benchmarks"))
  import schedules  # pylint: disable=import-outside-toplevel

  tiny = _load_benchmark().make_params(
      {"conv": (3, 3, 8, 16), "dense": (16, 32)}
  )
  args = schedules.parse_args(
      ["--calls", "2", "--repeats", "1", "--dtypes", "bfloat16"]
  )
  table = schedules.run(args, {"tiny": tiny})
  programs = [
      "one-read floor",
      "global, search",
      "global, digits",
      "layerwise, search",
      "layerwise, digits",
  ]
  assert [row[1:3] for row in table] == [("bfloat16", p) for p in programs]
  assert all(row[3] > 0 and row[4] > 0 for row in table)
  out = capsys.readouterr().out
  lines = out.splitlines()
  assert len([x for x in lines if x.startswith("| tiny |")]) == 5


def test_benchmark_trees_and_floor():
  masks = _load_benchmark()
  # BERT-base: 12 x (4 x 768^2 + 2 x 768 x 3072) + the 768^2 pooler.
  assert sum(map(math.prod, masks.bert_base_kernel_shapes().values())) == (
      12 * (4 * 768**2 + 2 * 768 * 3072) + 768**2
  )
  # ResNet-50 conv and dense kernels (no BatchNorm, no bias): 25,502,912.
  shapes = masks.resnet50_kernel_shapes()
  assert len(shapes) == 54
  assert sum(map(math.prod, shapes.values())) == 25_502_912
  # The floor: exactly |w| >= t and where(), on the pruned leaves only.
  params = masks.make_params({"a": (4, 8), "b": (3, 4)})
  pruned = {"a": {"kernel": params["a"]["kernel"]}, "b": {"kernel": None}}
  out, got = jax.jit(masks.floor_fn(pruned))(params, jnp.float32(0.5))
  w = np.asarray(params["a"]["kernel"])
  np.testing.assert_array_equal(got["a"]["kernel"], np.abs(w) >= 0.5)
  np.testing.assert_array_equal(
      out["a"]["kernel"], np.where(np.abs(w) >= 0.5, w, 0)
  )
  assert got["b"]["kernel"] is None
  np.testing.assert_array_equal(out["b"]["kernel"], params["b"]["kernel"])


@pytest.mark.parametrize("compressor", ["global", "layerwise"])
def test_outputs_split_into_blocks_that_runs_do_not_divide(compressor):
  # A classifier kernel like ResNet-50's 2048x1000 split 8 ways on its outputs
  # has blocks of 125 entries: counting runs of 8 along that axis straddle
  # shards, and XLA gathered the uint8 partial sums. Here 64x40: blocks of 5.
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  kernel = jax.random.normal(jax.random.key(3), (64, 40))
  params = {"head": {"kernel": kernel}}
  sharded = jax.device_put(params, NamedSharding(mesh, P(None, "data")))
  fn = {
      "global": compress.global_magnitude(0.9),
      "layerwise": compress.layerwise_magnitude(0.9),
  }[compressor]
  found = hlo_checks.parameter_sized(_compile(jax.jit(fn).lower(sharded)))
  assert not found, hlo_checks.describe(found)
  _, want = jax.jit(fn)(params)
  _, got = jax.jit(fn)(sharded)
  np.testing.assert_array_equal(
      np.asarray(got["head"]["kernel"]), np.asarray(want["head"]["kernel"])
  )

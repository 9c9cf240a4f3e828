"""Mask speed of the compressors on ResNet-50- and BERT-base-sized kernel trees.

For each tree and compressor (global 0.9; global [.5, .7, .9] at level 2, the
level passed traced as in a CrAM-Multi step; layer-wise 0.9; 2:4), measured
side by side in one run:

* the steady median time of the compiled compressor (pruned params and masks);
* its ratio to the one-read floor: the same outputs from a known threshold,
  ``m = |w| >= t; where(m, w, 0)`` per pruned leaf, jitted (the least any
  compressor must do; for N:M too);
* compile time: ``jax.jit(f).lower(...).compile()`` timed on its own;
* bfloat16 vs float32 time;
* sharded vs unsharded time: kernels split 8 ways on their output (last) axis
  with a ``NamedSharding`` over 8 devices, and the number of collectives
  moving a parameter-sized array in the sharded program: more than 64
  elements or 4 per kernel, whichever is larger (the searches all-reduce
  per-kernel count vectors, up to 3 candidates per kernel: 54 x 3 on
  ResNet-50; the smallest shard of a kernel is far larger);
* on ResNet-50, the references: global threshold by ``jnp.sort`` and by
  ``lax.top_k``, 2:4 by a double argsort (their masks are checked equal first).

Every ratio comes from calls taken in turns (compressor, floor, bf16, ...,
then again; each timed call after an untimed one of the same function), so a
change of machine load between them shifts both sides.

The searches take more or fewer passes depending on where the cut falls among
the weights, so one draw of the weights can flatter or wrong a compressor
(ResNet-50 global(0.9) once took 5.0x to 7.3x the floor over four draws). The
times, floor ratio and bf16 ratio are taken on ``--draws`` draws (default 3)
with the same compiled programs, and each is the median over draws; the table
also lists every draw's floor ratio.

With fewer than 8 devices the sharded column runs in a child process on 8
simulated CPU devices, and everything else in this one: simulating 8 devices
splits the CPU's threads between them, which slowed the floor up to 2x and
the compressors less, so unsharded ratios taken there were off by up to 40%.
Both sides of the sharded ratio are timed in the child.

On Linux the script restarts itself with glibc's malloc told to keep freed
memory (``GLIBC_TUNABLES``, see :data:`MALLOC_TUNABLES`) unless that variable
is set already. By default glibc hands large freed blocks back to the
system, and depending on how a program was called the next call faulted its
output pages in again: on BERT-base the level-2 global mask, called as an
ahead-of-time compiled program, took 90k page faults (350 MB) and 300 ms a
call instead of 0 and 180 ms, while other calls of the same program did not.
Kept memory times the work, as a long training run that reuses its buffers
sees it.

Prints one Markdown table (the README's tables are cut from it) and the targets
as PASS/FAIL lines: floor ratio <= 6 (global, layer-wise), <= 3 (N:M); bf16 <=
1.3x float32; compile <= 2 s; no parameter-sized collective when sharded; and
ours >= 10x faster than each reference.

  python benchmarks/masks.py [--repeats 5] [--draws 3] [--quick]
      [--trees resnet50 bert]
      [--only global global_levels layerwise n_of_m] [--no-sharded]

``--quick``: 2 repeats, one draw, ResNet-50 only (a smoke run). Ratios are
only good measured in one run on one machine; a loaded machine inflates them
all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cram_jax import compress

# The HLO collective parser is shared with tests/test_sharded_hlo.py.
sys.path.insert(
    0, str(pathlib.Path(__file__).resolve().parent.parent / "tests")
)
import hlo_checks  # noqa: E402

SHARDS = 8
# Never hand freed memory back to the system: no mmap'ed blocks (threshold at
# its maximum, 4 GiB - 1) and no trimming of the heap (16 GiB).
MALLOC_TUNABLES = (
    "glibc.malloc.mmap_threshold=4294967295:"
    "glibc.malloc.trim_threshold=17179869184"
)
TARGET_FLOOR = {"global": 6.0, "layerwise": 6.0, "n_of_m": 3.0}
TARGET_BF16 = 1.3
TARGET_COMPILE_S = 2.0


def resnet50_kernel_shapes(
    num_classes: int = 1000,
) -> dict[str, tuple[int, ...]]:
  """Flax-layout conv/dense kernel shapes of ImageNet ResNet-50 (v1.5)."""
  shapes = {"conv_init": (7, 7, 3, 64)}
  in_ch = 64
  for stage, (blocks, width) in enumerate(
      zip((3, 4, 6, 3), (64, 128, 256, 512))
  ):
    for b in range(blocks):
      name = f"stage{stage}_block{b}"
      shapes[f"{name}/conv1"] = (1, 1, in_ch, width)
      shapes[f"{name}/conv2"] = (3, 3, width, width)
      shapes[f"{name}/conv3"] = (1, 1, width, 4 * width)
      if b == 0:
        shapes[f"{name}/proj"] = (1, 1, in_ch, 4 * width)
      in_ch = 4 * width
  shapes["head"] = (in_ch, num_classes)
  return shapes


def bert_base_kernel_shapes() -> dict[str, tuple[int, ...]]:
  """Kernel shapes of the BERT-base encoder (12 layers) and pooler."""
  hidden, ffn = 768, 3072
  shapes = {}
  for layer in range(12):
    for name in ("query", "key", "value", "out"):
      shapes[f"layer{layer}/attention/{name}"] = (hidden, hidden)
    shapes[f"layer{layer}/intermediate"] = (hidden, ffn)
    shapes[f"layer{layer}/output"] = (ffn, hidden)
  shapes["pooler"] = (hidden, hidden)
  return shapes


TREES = {"resnet50": resnet50_kernel_shapes, "bert": bert_base_kernel_shapes}


def make_params(
    shapes: dict[str, tuple[int, ...]], seed: int = 0
) -> dict[str, dict[str, jax.Array]]:
  """Standard-normal float32 kernels ``{name: {"kernel": array}}``."""
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return {
      name: {"kernel": jax.random.normal(k, shape, jnp.float32)}
      for k, (name, shape) in zip(keys, shapes.items())
  }


def to_bf16(params: Any) -> Any:
  return jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)


def redraw(params: Any, seed: int) -> Any:
  """Fresh standard-normal float32 weights shaped as ``params``' leaves."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
      treedef,
      [
          jax.random.normal(k, x.shape, jnp.float32)
          for k, x in zip(keys, leaves)
      ],
  )


@dataclasses.dataclass(frozen=True)
class Case:
  """A compressor under test: ``fn(params, *extra)`` -> (compressed, masks)."""

  key: str  # as --only names it
  name: str
  kind: str  # "global", "layerwise" or "n_of_m": picks the floor target
  fn: Callable[..., Any]
  extra: tuple[Any, ...] = ()


def cases(sparsity: float = 0.9) -> list[Case]:
  multi = compress.global_magnitude([0.5, 0.7, sparsity])
  # The ResNet stem has 3 input channels, not a multiple of 4: left dense.
  nm = compress.n_of_m(2, 4, on_indivisible="skip")
  return [
      Case(
          "global",
          f"global({sparsity})",
          "global",
          compress.global_magnitude(sparsity),
      ),
      Case(
          "global_levels",
          f"global([.5, .7, {sparsity}]), level 2",
          "global",
          lambda p, level: multi(p, level=level),
          (jnp.int32(2),),
      ),
      Case(
          "layerwise",
          f"layerwise({sparsity})",
          "layerwise",
          compress.layerwise_magnitude(sparsity),
      ),
      Case("n_of_m", "n_of_m(2, 4)", "n_of_m", nm),
  ]


def floor_fn(pruned: Any) -> Callable[..., Any]:
  """One read per pruned leaf: ``|w| >= t`` and ``where``, for a known t.

  ``pruned``: the compressor's mask tree (None where a leaf is not pruned), so
  the floor produces exactly the compressor's outputs.
  """

  def fn(params, threshold):
    def leaf(mask, x):
      if mask is None:
        return x, None
      keep = jnp.abs(x) >= threshold.astype(x.dtype)
      return jnp.where(keep, x, jnp.zeros((), x.dtype)), keep

    pairs = jax.tree.map(
        leaf, pruned, params, is_leaf=lambda m: m is None or hasattr(m, "shape")
    )
    is_pair = lambda t: isinstance(t, tuple)  # noqa: E731
    return (
        jax.tree.map(lambda t: t[0], pairs, is_leaf=is_pair),
        jax.tree.map(lambda t: t[1], pairs, is_leaf=is_pair),
    )

  return fn


def sort_threshold_masks(params, sparsity):
  leaves = jax.tree.leaves(params)
  flat = jnp.concatenate([jnp.abs(x).ravel() for x in leaves])
  keep = round((1 - sparsity) * flat.size)
  threshold = jnp.sort(flat)[flat.size - keep]
  return [jnp.abs(x) >= threshold for x in leaves]


def top_k_masks(params, sparsity):
  leaves = jax.tree.leaves(params)
  flat = jnp.concatenate([jnp.abs(x).ravel() for x in leaves])
  keep = round((1 - sparsity) * flat.size)
  threshold = lax.top_k(flat, keep)[0][-1]
  return [jnp.abs(x) >= threshold for x in leaves]


def double_argsort_nm(params, n=2, m=4):
  out = []
  for x in jax.tree.leaves(params):
    if x.shape[-2] % m:
      out.append(None)
      continue
    moved = jnp.moveaxis(jnp.abs(x), -2, -1)
    blocks = moved.reshape(moved.shape[:-1] + (-1, m))
    rank = jnp.argsort(
        jnp.argsort(-blocks, axis=-1, stable=True), axis=-1, stable=True
    )
    out.append(jnp.moveaxis((rank < n).reshape(moved.shape), -1, -2))
  return out


def compiled(fn: Callable[..., Any], args: Sequence[Any]) -> tuple[Any, float]:
  """``(compiled fn, seconds to lower and compile it)``; a fresh cache entry."""
  start = time.perf_counter()
  out = jax.jit(fn).lower(*args).compile()
  return out, time.perf_counter() - start


def median_seconds(fn: Callable[..., Any], args: Sequence[Any], repeats: int):
  return in_turns({"fn": (fn, args)}, repeats)["fn"]


def in_turns(
    calls: dict[str, tuple[Callable[..., Any], Sequence[Any]]], repeats: int
) -> dict[str, float]:
  """Median seconds of each ``fn(*args)``, the calls taken in turns.

  ``repeats`` rounds calling every function in turn: a change of load during
  the measurement reaches all of them alike. With several functions each
  timed call follows an untimed one of the same function: right after
  another function's call, the allocator hands out fresh pages for the
  outputs, and the floor (a few hundred MB written in tens of ms) took up to
  twice its time.
  """
  times = {name: [] for name in calls}
  for round_ in range(repeats):
    for name, (fn, args) in calls.items():
      if round_ == 0 or len(calls) > 1:
        jax.block_until_ready(fn(*args))
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def shard_on_outputs(params: Any, mesh: Mesh) -> Any:
  """Each kernel split over the mesh on its last axis (replicated if indivisible)."""

  def put(x):
    spec = [None] * x.ndim
    if x.shape[-1] % mesh.size == 0:
      spec[-1] = mesh.axis_names[0]
    return jax.device_put(x, NamedSharding(mesh, P(*spec)))

  return jax.tree.map(put, params)


@dataclasses.dataclass
class Row:
  """One line of the table; None where a column does not apply."""

  tree: str
  name: str
  kind: str | None  # None for a reference
  seconds: float
  floor_seconds: float
  compile_seconds: float | None = None
  bf16_ratio: float | None = None
  sharded_ratio: float | None = None
  sharded_collectives: int | None = None
  versus: str | None = None  # for a reference: the name of our row
  # Per draw of the weights: time / floor time (ours only; empty: one draw).
  draw_ratios: tuple[float, ...] = ()

  @property
  def floor_ratio(self) -> float:
    """The median over draws of time / floor time."""
    if self.draw_ratios:
      return statistics.median(self.draw_ratios)
    return self.seconds / self.floor_seconds


def _same_masks(got: Sequence[Any], want: Sequence[Any], what: str) -> None:
  for g, w in zip(got, want, strict=True):
    if (g is None) != (w is None) or (
        g is not None and not np.array_equal(np.asarray(g), np.asarray(w))
    ):
      raise AssertionError(f"{what}: masks differ from ours")


def selected_cases(sparsity: float, only: Sequence[str] | None) -> list[Case]:
  return [c for c in cases(sparsity) if only is None or c.key in only]


def the_mesh() -> Mesh:
  """A 1-D mesh over the first ``SHARDS`` devices."""
  return Mesh(np.array(jax.devices()[:SHARDS]), ("shards",))


def sharded_entry(
    case: Case, params: Any, fn: Any, mesh: Mesh, repeats: int
) -> tuple[float, int]:
  """(sharded / unsharded time, parameter-sized collectives) of one case;
  ``fn``: the case compiled for ``params`` unsharded."""
  sharded = shard_on_outputs(params, mesh)
  sharded_fn, _ = compiled(case.fn, (sharded, *case.extra))
  times = in_turns(
      {
          "unsharded": (fn, (params, *case.extra)),
          "sharded": (sharded_fn, (sharded, *case.extra)),
      },
      repeats,
  )
  # Per-kernel count vectors are not parameter-sized: see the module doc.
  limit = max(hlo_checks.PARAMETER_SIZED, 4 * len(jax.tree.leaves(params)))
  return (
      times["sharded"] / times["unsharded"],
      len(hlo_checks.parameter_sized(sharded_fn, limit)),
  )


def sharded_column(
    params: Any,
    repeats: int,
    mesh: Mesh,
    sparsity: float = 0.9,
    only: Sequence[str] | None = None,
) -> dict[str, tuple[float, int]]:
  """Per case key: :func:`sharded_entry`."""
  column = {}
  for case in selected_cases(sparsity, only):
    fn, _ = compiled(case.fn, (params, *case.extra))
    column[case.key] = sharded_entry(case, params, fn, mesh, repeats)
  return column


def sharded_column_in_child(
    trees: Sequence[str],
    repeats: int,
    sparsity: float,
    only: Sequence[str] | None,
) -> dict[str, dict[str, tuple[float, int]]]:
  """:func:`sharded_column` of each named tree, measured by this script in a
  child process on 8 simulated CPU devices (see the module doc)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
      env.get("XLA_FLAGS", "")
      + f" --xla_force_host_platform_device_count={SHARDS}"
  ).strip()
  argv = [
      sys.executable,
      str(pathlib.Path(__file__).resolve()),
      "--sharded-column",
      "--repeats",
      str(repeats),
      "--sparsity",
      str(sparsity),
      "--trees",
      *trees,
  ]
  if only is not None:
    argv += ["--only", *only]
  child = subprocess.run(argv, env=env, capture_output=True, text=True)
  if child.returncode != 0:
    raise RuntimeError(
        f"masks.py: the sharded column's child process failed "
        f"(exit {child.returncode}):\n{child.stderr[-3000:]}"
    )
  found = json.loads(child.stdout.strip().splitlines()[-1])
  return {
      tree: {key: tuple(value) for key, value in column.items()}
      for tree, column in found.items()
  }


def measure_tree(
    tree: str,
    params: Any,
    repeats: int,
    *,
    mesh: Mesh | None,
    references: bool,
    sparsity: float = 0.9,
    only: Sequence[str] | None = None,
    draws: int = 1,
) -> list[Row]:
  """Every row of one tree (see the module doc); the sharded column only with
  a ``mesh`` (else :func:`sharded_column_in_child` fills it).

  With ``draws`` > 1 the compressor, floor and bf16 times are taken again on
  fresh weights of the same shapes (:func:`redraw`), with the same compiled
  programs, and each row reports the medians over draws; the sharded column
  and the references use the first draw.
  """
  threshold = jnp.float32(1.0)
  floors, programs = {}, []
  for case in selected_cases(sparsity, only):
    args = (params, *case.extra)
    fn, compile_s = compiled(case.fn, args)
    _, masks = jax.eval_shape(case.fn, *args)
    # The floor reads the leaves this compressor prunes (N:M skips the stem).
    structure = tuple(
        m is None for m in jax.tree.leaves(masks, is_leaf=lambda m: m is None)
    )
    if structure not in floors:
      floors[structure], _ = compiled(floor_fn(masks), (params, threshold))
    bf16_fn, _ = compiled(case.fn, (to_bf16(params), *case.extra))
    programs.append((case, fn, floors[structure], bf16_fn, compile_s))
  times = {case.key: [] for case, *_ in programs}
  for seed in range(draws):
    # One draw alive at a time (BERT-base: 340 MB of float32 weights a draw).
    weights = params if seed == 0 else redraw(params, seed)
    bf16 = to_bf16(weights)
    for case, fn, floor, bf16_fn, _ in programs:
      times[case.key].append(
          in_turns(
              {
                  "float32": (fn, (weights, *case.extra)),
                  "floor": (floor, (weights, threshold)),
                  "bfloat16": (bf16_fn, (bf16, *case.extra)),
              },
              repeats,
          )
      )
    del weights, bf16
  rows, measured = [], {}
  for case, fn, _, _, compile_s in programs:
    per_draw = times[case.key]
    seconds, floor_seconds = (
        statistics.median(t[key] for t in per_draw)
        for key in ("float32", "floor")
    )
    row = Row(tree, case.name, case.kind, seconds, floor_seconds, compile_s)
    row.bf16_ratio = statistics.median(
        t["bfloat16"] / t["float32"] for t in per_draw
    )
    if draws > 1:
      row.draw_ratios = tuple(t["float32"] / t["floor"] for t in per_draw)
    if mesh is not None:
      row.sharded_ratio, row.sharded_collectives = sharded_entry(
          case, params, fn, mesh, repeats
      )
    rows.append(row)
    measured[case.key] = row, fn
  if references and {"global", "n_of_m"} <= measured.keys():
    rows += reference_rows(
        tree, params, repeats, measured["global"], measured["n_of_m"], sparsity
    )
  return rows


def reference_rows(
    tree: str,
    params: Any,
    repeats: int,
    ours_global: tuple[Row, Any],
    ours_nm: tuple[Row, Any],
    sparsity: float,
) -> list[Row]:
  """The sort / top_k / double-argsort masks, checked equal to ours first.

  ``ours_global``, ``ours_nm``: (row, compiled compressor) of ours.
  """
  (ours_global, global_fn), (ours_nm, nm_fn) = ours_global, ours_nm
  global_floor, nm_floor = ours_global.floor_seconds, ours_nm.floor_seconds
  global_masks = jax.tree.leaves(global_fn(params)[1])
  nm_masks = jax.tree.leaves(nm_fn(params)[1], is_leaf=lambda m: m is None)
  by_sort = jax.jit(lambda p: sort_threshold_masks(p, sparsity))
  by_top_k = jax.jit(lambda p: top_k_masks(p, sparsity))
  by_argsort = jax.jit(double_argsort_nm)
  # Same masks before timing anything: a fast wrong answer is no answer.
  _same_masks(by_sort(params), global_masks, "jnp.sort threshold")
  _same_masks(by_top_k(params), global_masks, "lax.top_k threshold")
  _same_masks(by_argsort(params), nm_masks, "double argsort 2:4")
  return [
      Row(
          tree,
          "global magnitude, jnp.sort threshold (reference)",
          None,
          median_seconds(by_sort, (params,), repeats),
          global_floor,
          versus=ours_global.name,
      ),
      Row(
          tree,
          "global magnitude, lax.top_k threshold (reference)",
          None,
          median_seconds(by_top_k, (params,), repeats),
          global_floor,
          versus=ours_global.name,
      ),
      Row(
          tree,
          "2:4, double argsort (reference)",
          None,
          median_seconds(by_argsort, (params,), repeats),
          nm_floor,
          versus=ours_nm.name,
      ),
  ]


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
  return "-" if value is None else f"{value:{spec}}{suffix}"


def markdown(rows: Sequence[Row]) -> str:
  """The results as one Markdown table."""
  lines = [
      "| tree | compressor | median (ms) | one-read floor (ms) | vs floor "
      "| vs floor, each draw | compile (s) | bf16 / f32 | sharded / unsharded "
      "| parameter-sized collectives (sharded) |",
      "|---|---|---:|---:|---:|---|---:|---:|---:|---:|",
  ]
  for r in rows:
    each = " ".join(f"{x:.1f}" for x in r.draw_ratios) or "-"
    lines.append(
        f"| {r.tree} | {r.name} | {1e3 * r.seconds:.1f} "
        f"| {1e3 * r.floor_seconds:.1f} | {r.floor_ratio:.1f}x | {each} "
        f"| {_fmt(r.compile_seconds, '.2f')} | {_fmt(r.bf16_ratio, '.2f', 'x')} "
        f"| {_fmt(r.sharded_ratio, '.2f', 'x')} "
        f"| {_fmt(r.sharded_collectives, 'd')} |"
    )
  return "\n".join(lines)


def targets(rows: Sequence[Row]) -> list[tuple[bool, str]]:
  """``(met, description)`` for every target of every measured compressor."""
  checks = []
  for r in rows:
    if r.kind is None:
      continue
    where = f"{r.tree}, {r.name}"
    limit = TARGET_FLOOR[r.kind]
    over = f", median of {len(r.draw_ratios)} draws" if r.draw_ratios else ""
    checks.append(
        (
            r.floor_ratio <= limit,
            f"{where}: {r.floor_ratio:.1f}x the one-read floor{over} "
            f"(<= {limit:g}x)",
        )
    )
    checks.append(
        (
            r.bf16_ratio <= TARGET_BF16,
            f"{where}: bf16 takes {r.bf16_ratio:.2f}x float32 "
            f"(<= {TARGET_BF16:g}x)",
        )
    )
    checks.append(
        (
            r.compile_seconds <= TARGET_COMPILE_S,
            f"{where}: compiles in {r.compile_seconds:.2f} s "
            f"(<= {TARGET_COMPILE_S:g} s)",
        )
    )
    if r.sharded_collectives is not None:
      checks.append(
          (
              r.sharded_collectives == 0,
              f"{where}: {r.sharded_collectives} parameter-sized collectives "
              f"sharded {SHARDS} ways (0)",
          )
      )
  by_name = {(r.tree, r.name): r for r in rows}
  for r in rows:
    if r.versus is not None:  # a reference: ours should be >= 10x faster
      ours = by_name[r.tree, r.versus]
      speedup = r.seconds / ours.seconds
      checks.append(
          (
              speedup >= 10,
              f"{r.tree}, {ours.name}: {speedup:.1f}x faster than the "
              f"{r.name} (>= 10x)",
          )
      )
  return checks


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--sparsity", type=float, default=0.9)
  parser.add_argument(
      "--draws",
      type=int,
      default=None,
      help="draws of the weights timed, medians reported (default 3; 1 with "
      "--quick)",
  )
  parser.add_argument(
      "--trees", nargs="+", choices=sorted(TREES), default=["resnet50", "bert"]
  )
  parser.add_argument(
      "--quick", action="store_true", help="2 repeats, ResNet-50 only"
  )
  parser.add_argument(
      "--only",
      nargs="+",
      choices=[c.key for c in cases()],
      help="measure only these compressors (the references need global and "
      "n_of_m)",
  )
  parser.add_argument(
      "--no-sharded", action="store_true", help="skip the sharded column"
  )
  parser.add_argument(
      "--sharded-column",
      action="store_true",
      help="only the sharded column, as one line of JSON (the child process "
      "this script starts when it has fewer than 8 devices)",
  )
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error(f"--repeats must be >= 1, got {args.repeats}")
  if not 0.0 <= args.sparsity < 1.0:
    parser.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
  if args.draws is None:
    args.draws = 1 if args.quick else 3
  if args.draws < 1:
    parser.error(f"--draws must be >= 1, got {args.draws}")
  if args.quick:
    args.repeats, args.trees = min(args.repeats, 2), ["resnet50"]
  return args


def run(
    args: argparse.Namespace, trees: dict[str, Any] | None = None
) -> tuple[list[Row], list[tuple[bool, str]]]:
  """Measures ``trees`` (default: the ones ``args.trees`` names) and prints."""
  named = trees is None
  if named:
    trees = {name: make_params(TREES[name]()) for name in args.trees}
  mesh, child_columns = None, None
  if not args.no_sharded:
    if jax.device_count() >= SHARDS:
      mesh = the_mesh()
      where = f"on {SHARDS} of this process' devices"
    elif named:
      print(f"the sharded column: a child process on {SHARDS} CPU devices")
      child_columns = sharded_column_in_child(
          list(trees), args.repeats, args.sparsity, args.only
      )
      where = f"in a child process on {SHARDS} simulated CPU devices"
    else:
      raise RuntimeError(
          f"masks.py: the sharded column of trees given to run() needs "
          f"{SHARDS} devices, JAX has {jax.device_count()}; pass --no-sharded"
      )
  print(
      f"backend {jax.default_backend()}, {jax.device_count()} device(s); "
      f"median of {args.repeats}, the calls of each ratio taken in turns; "
      f"{args.draws} draw(s) of the weights"
      + ("" if args.no_sharded else f"; sharded column {where}")
      + f"; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}"
  )
  rows = []
  for name, params in trees.items():
    leaves = jax.tree.leaves(params)
    print(
        f"{name}: {len(leaves)} kernels, "
        f"{sum(math.prod(x.shape) for x in leaves):,} weights"
    )
    rows += measure_tree(
        name,
        params,
        args.repeats,
        mesh=mesh,
        references=name == "resnet50" or name not in TREES,
        sparsity=args.sparsity,
        only=args.only,
        draws=args.draws,
    )
  if child_columns is not None:
    names = {c.name: c.key for c in cases(args.sparsity)}
    for row in rows:
      if row.kind is not None:
        column = child_columns[row.tree][names[row.name]]
        row.sharded_ratio, row.sharded_collectives = column
  print()
  print(markdown(rows))
  checks = targets(rows)
  print()
  for met, text in checks:
    print(f"{'PASS' if met else 'FAIL'} {text}")
  return rows, checks


def _restart_with_kept_memory(argv: Sequence[str] | None) -> None:
  """Runs this script again with :data:`MALLOC_TUNABLES` under glibc (see the
  module doc); returns at once elsewhere or when GLIBC_TUNABLES is set."""
  if "GLIBC_TUNABLES" in os.environ or not hasattr(os, "confstr"):
    return
  try:
    if not os.confstr("CS_GNU_LIBC_VERSION"):
      return
  except (ValueError, OSError):
    return
  env = {**os.environ, "GLIBC_TUNABLES": MALLOC_TUNABLES}
  argv = list(sys.argv[1:] if argv is None else argv)
  script = str(pathlib.Path(__file__).resolve())
  sys.stdout.flush()
  os.execve(sys.executable, [sys.executable, script, *argv], env)


def main(argv: Sequence[str] | None = None) -> None:
  _restart_with_kept_memory(argv)
  # Progress lines show up at once when the output goes to a file or a pipe.
  sys.stdout.reconfigure(line_buffering=True)
  args = parse_args(argv)
  if args.sharded_column:
    if jax.device_count() < SHARDS:
      raise SystemExit(
          f"masks.py --sharded-column: needs {SHARDS} devices, JAX has "
          f"{jax.device_count()}"
      )
    found = {
        tree: sharded_column(
            make_params(TREES[tree]()),
            args.repeats,
            the_mesh(),
            args.sparsity,
            args.only,
        )
        for tree in args.trees
    }
    print(json.dumps(found))
    return
  run(args)


if __name__ == "__main__":
  main()

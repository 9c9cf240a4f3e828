"""Device time of the two magnitude-mask schedules ("search", "digits") side by side.

For each tree (ResNet-50 and BERT-base kernel trees, as in ``masks.py``) and
dtype (float32, bfloat16), times the global (0.9) and layer-wise (0.9) masks
under ``schedule="search"`` and ``schedule="digits"`` next to the one-read
floor. Each timed program runs ``--calls`` calls inside one jitted
``lax.scan`` (every call's inputs scaled by a carried 1.0 so that none is
hoisted, every call's outputs stacked), so the host's per-call overheads
(on a GPU about 15-30 us per output array: ``masks.py`` measured a floor of
0.8-2.3 ms per call where the device needs 0.5) are paid once per program.
The masks of the two schedules are checked equal first; the calls are taken
in turns (``masks.in_turns``).

  python benchmarks/schedules.py [--trees resnet50 bert] [--calls 10]
      [--repeats 7] [--dtypes float32 bfloat16]

Meant for GPUs, where ``schedule="auto"`` picks the digits. On a CPU the
digit schedule takes seconds per call on these trees: use ``--calls 1``.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import masks as masks_benchmark  # noqa: E402  (trees, floor, compile, in_turns)

from cram_jax import compress  # noqa: E402

SCHEDULES = ("search", "digits")
KINDS = {
    "global": compress.global_magnitude,
    "layerwise": compress.layerwise_magnitude,
}


def scanned(fn: Callable[[Any], Any], calls: int) -> Callable[[Any], Any]:
  """``calls`` calls of ``fn(params)`` in one ``lax.scan``, outputs stacked."""

  def run(params):
    def body(scale, _):
      out = fn(jax.tree.map(lambda x: x * scale.astype(x.dtype), params))
      # A carried 1.0 that depends on the outputs: nothing can be hoisted.
      first = jax.tree.leaves(out)[0]
      scale = scale + 0 * first.ravel()[0].astype(jnp.float32)
      return scale, out

    return lax.scan(body, jnp.float32(1), None, length=calls)[1]

  return run


def measure(
    params: Any, calls: int, repeats: int, sparsity: float = 0.9
) -> list[tuple[str, float, float]]:
  """``[(name, seconds per call, compile seconds)]``, floor first."""
  flat = np.concatenate(
      [
          np.abs(np.asarray(x, np.float32)).ravel()
          for x in jax.tree.leaves(params)
      ]
  )
  threshold = jnp.float32(np.sort(flat)[round(sparsity * flat.size)])
  programs = {}
  for kind, make in KINDS.items():
    masks = {}
    for schedule in SCHEDULES:
      fn = make(sparsity, schedule=schedule)
      masks[schedule] = jax.jit(fn)(params)[1]
      programs[f"{kind}, {schedule}"] = fn
    for a, b in zip(*(jax.tree.leaves(masks[s]) for s in SCHEDULES)):
      if not np.array_equal(np.asarray(a), np.asarray(b)):
        raise AssertionError(f"{kind}: the schedules' masks differ")
  # The floor of masks.py, producing the same outputs from a known threshold.
  floor = masks_benchmark.floor_fn(masks["search"])
  programs = {"one-read floor": lambda p: floor(p, threshold), **programs}
  calls_in_turns, compile_s = {}, {}
  for name, fn in programs.items():
    exe, compile_s[name] = masks_benchmark.compiled(
        scanned(fn, calls), [params]
    )
    calls_in_turns[name] = (exe, [params])
  seconds = masks_benchmark.in_turns(calls_in_turns, repeats)
  return [(n, seconds[n] / calls, compile_s[n]) for n in programs]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--trees",
      nargs="+",
      choices=sorted(masks_benchmark.TREES),
      default=["resnet50", "bert"],
  )
  parser.add_argument(
      "--dtypes",
      nargs="+",
      choices=["float32", "bfloat16"],
      default=["float32", "bfloat16"],
  )
  parser.add_argument(
      "--calls", type=int, default=10, help="calls per scanned program"
  )
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args(argv)
  if args.calls < 1 or args.repeats < 1:
    parser.error(
        f"--calls and --repeats must be >= 1, got {args.calls}, {args.repeats}"
    )
  return args


def run(
    args: argparse.Namespace, trees: dict[str, Any] | None = None
) -> list[tuple[str, str, str, float, float]]:
  """Measures and prints; returns ``[(tree, dtype, program, s/call, compile s)]``."""
  if trees is None:
    trees = {
        n: masks_benchmark.make_params(masks_benchmark.TREES[n]())
        for n in args.trees
    }
  print(
      f"jax {jax.__version__}, backend {jax.default_backend()} "
      f"({jax.devices()[0].device_kind}); {args.calls} calls per scanned "
      f"program, median of {args.repeats}, programs taken in turns"
  )
  print(
      "\n| tree | dtype | program | ms per call | vs floor | compile, "
      "scanned (s) |\n|---|---|---|---:|---:|---:|"
  )
  table = []
  for tree_name, params in trees.items():
    for dtype in args.dtypes:
      cast = jax.tree.map(functools.partial(jnp.asarray, dtype=dtype), params)
      rows = measure(cast, args.calls, args.repeats)
      floor_s = rows[0][1]
      for name, per_call, compile_s in rows:
        print(
            f"| {tree_name} | {dtype} | {name} | {per_call * 1e3:.3f} | "
            f"{per_call / floor_s:.2f}x | {compile_s:.2f} |"
        )
        table.append((tree_name, dtype, name, per_call, compile_s))
  return table


if __name__ == "__main__":
  run(parse_args())

"""SparseGPT pruning time and peak memory on ResNet-50 and BERT-base kernels.

Random normal kernels and random SPD Hessians ``X^T X / n`` of random normal
``X`` with ``2 * d_in`` rows. One Hessian is drawn per distinct ``d_in`` and
shared by the layers of that width: the pruning cost does not depend on the
values, and drawing 54 ResNet-50 Hessians would cost more than pruning.

  python benchmarks/sparsegpt_pruning.py [--model resnet50|bert|both]
      [--quick] [--sparsity 0.5] [--nm 2:4] [--block-size 128] [--warm]

``--quick`` prunes a small tree (a few layers of each model) instead. Each
tree is pruned once cold (compilation included: one compilation per distinct
kernel shape) and, with ``--warm``, once more. Peak memory is the process's
peak resident set (``ru_maxrss``, CPU) or the device allocator's peak (GPU).
"""

from __future__ import annotations

import argparse
import math
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from masks import resnet50_kernel_shapes  # sibling script in benchmarks/

from cram_jax import sparsegpt


def bert_base_kernel_shapes() -> dict[str, tuple[int, ...]]:
  """The 73 dense kernels of BERT-base: 12 layers of 6, and the pooler."""
  shapes = {}
  for i in range(12):
    for name in ("query", "key", "value", "out"):
      shapes[f"layer_{i}/attention/{name}"] = (768, 768)
    shapes[f"layer_{i}/intermediate"] = (768, 3072)
    shapes[f"layer_{i}/output"] = (3072, 768)
  shapes["pooler"] = (768, 768)
  return shapes


def quick(shapes: dict[str, tuple[int, ...]], n: int) -> dict[str, tuple]:
  return dict(list(shapes.items())[:n])


def make_tree(shapes, seed=0):
  """(params, hessians) with one shared random SPD Hessian per input width."""
  rng = np.random.default_rng(seed)
  params, hessians, by_width = {}, {}, {}
  for name, shape in shapes.items():
    d_in = math.prod(shape[:-1])
    if d_in not in by_width:
      x = jnp.asarray(rng.standard_normal((2 * d_in, d_in), np.float32))
      by_width[d_in] = jnp.matmul(
          x.T, x, precision=jax.lax.Precision.HIGHEST
      ) / (2 * d_in)
    params[name] = {
        "kernel": jnp.asarray(rng.standard_normal(shape, np.float32))
    }
    hessians[f"{name}/kernel"] = by_width[d_in]
  return params, hessians


def peak_memory_mib() -> tuple[str, float]:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return "device peak", stats["peak_bytes_in_use"] / 2**20
  return (
      "process peak RSS",
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  )


def run(label, shapes, args):
  params, hessians = make_tree(shapes)
  jax.block_until_ready(hessians)
  weights = sum(math.prod(s) for s in shapes.values())
  widest = max(math.prod(s[:-1]) for s in shapes.values())
  kinds = len({tuple(s) for s in shapes.values()})
  nm = tuple(int(v) for v in args.nm.split(":")) if args.nm else None
  sparsity = None if nm else args.sparsity

  def prune():
    out, masks = sparsegpt.sparsegpt_prune(
        params, hessians, sparsity, nm=nm, block_size=args.block_size
    )
    return jax.block_until_ready((out, masks))

  start = time.perf_counter()
  _, masks = prune()
  cold = time.perf_counter() - start
  warm = None
  if args.warm:
    start = time.perf_counter()
    prune()
    warm = time.perf_counter() - start
  kept = sum(int(m.sum()) for m in jax.tree.leaves(masks))
  what, mib = peak_memory_mib()
  print(
      f"| {label} | {len(shapes)} ({kinds} shapes) | {weights / 1e6:.1f}M | "
      f"{widest} | {1 - kept / weights:.3f} | {cold:.1f} | "
      f"{'-' if warm is None else f'{warm:.1f}'} | {mib:,.0f} ({what}) |"
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--model", choices=("resnet50", "bert", "both"), default="both"
  )
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--sparsity", type=float, default=0.5)
  parser.add_argument("--nm", default="", help="e.g. 2:4 (then no sparsity)")
  parser.add_argument("--block-size", type=int, default=128)
  parser.add_argument("--warm", action="store_true", help="time a 2nd run")
  args = parser.parse_args()

  print(
      f"backend {jax.default_backend()}, block size {args.block_size}, "
      + (f"{args.nm}" if args.nm else f"sparsity {args.sparsity}")
  )
  print(
      "\n| tree | kernels | weights | widest d_in | sparsity | cold (s) | "
      "warm (s) | peak MiB |\n|---|---:|---:|---:|---:|---:|---:|---:|"
  )
  trees = []
  if args.model in ("resnet50", "both"):
    shapes = resnet50_kernel_shapes()
    if args.nm:  # the RGB stem has 3 inputs: no N:M
      shapes.pop("conv_init")
    trees.append(("ResNet-50", quick(shapes, 5) if args.quick else shapes))
  if args.model in ("bert", "both"):
    shapes = bert_base_kernel_shapes()
    trees.append(("BERT-base", quick(shapes, 6) if args.quick else shapes))
  for label, shapes in trees:
    run(label + (" (quick)" if args.quick else ""), shapes, args)


if __name__ == "__main__":
  main()

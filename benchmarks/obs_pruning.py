"""OBS pruning (cram_jax.obs) on CPU: block inverses and whole-tree time/memory.

1. Block inverses, side by side on the same gradients: batched Cholesky vs m
   Sherman-Morrison rank-1 updates, time per block and error against float64
   numpy.linalg.inv.
2. ``obs_prune`` on a kernel tree (global, 90%), each config in a fresh
   subprocess: wall time and peak RSS (``resource.getrusage``), the RSS after
   building params and random gradients being reported apart, since the m
   gradients (m * d float32) are the caller's and dominate.

Trees: ``quick`` (a few small kernels), ``resnet50`` (benchmarks/masks.py's
54 kernels, 25.5M weights), ``bert_layer`` (one BERT-base encoder layer:
4 x 768x768, 768x3072, 3072x768) and ``bert`` (12 layers + pooler, 85M
weights; its m = 64 float32 gradients alone are 22 GB).

  python benchmarks/obs_pruning.py --quick
  python benchmarks/obs_pruning.py --tree resnet50 --grads-dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

B = 128
M = 64


def bert_shapes(layers: int = 12, pooler: bool = True) -> dict:
  shapes = {}
  for i in range(layers):
    for name in ("query", "key", "value", "out"):
      shapes[f"layer{i}/{name}"] = (768, 768)
    shapes[f"layer{i}/ffn_in"] = (768, 3072)
    shapes[f"layer{i}/ffn_out"] = (3072, 768)
  if pooler:
    shapes["pooler"] = (768, 768)
  return shapes


def tree_shapes(tree: str) -> dict:
  if tree == "quick":
    return {"a": (64, 64), "b": (3, 3, 16, 32), "c": (200, 10)}
  if tree == "resnet50":
    sys.path.insert(0, "benchmarks")
    from masks import resnet50_kernel_shapes  # noqa: PLC0415

    return resnet50_kernel_shapes()
  if tree == "bert_layer":
    return bert_shapes(1, pooler=False)
  if tree == "bert":
    return bert_shapes()
  raise ValueError(f"obs_pruning: unknown --tree {tree!r}")


def _rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> None:
  """One obs_prune run; prints a JSON line."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from cram_jax import obs  # noqa: PLC0415

  shapes = tree_shapes(args.tree)
  keys = jax.random.split(jax.random.key(0), 2 * len(shapes))
  dtype = jnp.dtype(args.grads_dtype)
  params, grads = {}, {}
  for i, (name, shape) in enumerate(shapes.items()):
    params[name] = jax.random.normal(keys[2 * i], shape, jnp.float32)
    grads[name] = jax.random.normal(keys[2 * i + 1], (M,) + shape, dtype)
  jax.block_until_ready(grads)
  before = _rss_mib()
  start = time.perf_counter()
  pruned, _ = obs.obs_prune(
      params, grads, 0.9, block_size=B, method=args.method
  )
  jax.block_until_ready(pruned)
  seconds = time.perf_counter() - start
  weights = sum(int(np.prod(s)) for s in shapes.values())
  print(
      json.dumps(
          {
              "tree": args.tree,
              "method": args.method,
              "weights": weights,
              "blocks": sum(-(-int(np.prod(s)) // B) for s in shapes.values()),
              "seconds": round(seconds, 2),
              "rss_inputs_mib": round(before),
              "rss_peak_mib": round(_rss_mib()),
          }
      )
  )


def inverse_bench(blocks: int, repeats: int) -> None:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from cram_jax import obs  # noqa: PLC0415

  rng = np.random.default_rng(0)
  g = jnp.asarray(rng.standard_normal((M, blocks, B)), jnp.float32)
  lam = 1e-2  # damp 1e-2 relative to a mean Fisher diagonal of 1
  pad = jnp.zeros((blocks, B), jnp.float32)
  g64 = np.asarray(g, np.float64)
  for method in obs.METHODS:
    f = obs._inverse(g, lam, pad, method)  # compile
    jax.block_until_ready(f)
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      jax.block_until_ready(obs._inverse(g, lam, pad, method))
      times.append(time.perf_counter() - t)
    f = np.asarray(f)
    err = 0.0
    for b in range(4):
      ref = np.linalg.inv(lam * np.eye(B) + g64[:, b].T @ g64[:, b] / M)
      err = max(err, np.abs(f[b] - ref).max() / np.abs(ref).max())
    print(
        f"inverse {method:17s} {blocks} blocks of {B}, m={M}: "
        f"median {np.median(times) * 1e3:8.1f} ms "
        f"({np.median(times) / blocks * 1e6:6.1f} us/block), "
        f"max rel error vs float64 {err:.1e}"
    )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small tree only")
  parser.add_argument(
      "--tree",
      default="resnet50",
      choices=["quick", "resnet50", "bert_layer", "bert"],
  )
  parser.add_argument("--method", default="cholesky")
  parser.add_argument("--grads-dtype", default="float32")
  parser.add_argument("--blocks", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args)
    return
  if args.quick:
    args.tree, args.blocks = "quick", 128
  inverse_bench(args.blocks, args.repeats)
  for method in ("cholesky", "sherman_morrison"):
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            "--tree",
            args.tree,
            "--method",
            method,
            "--grads-dtype",
            args.grads_dtype,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    print("obs_prune", out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
  main()

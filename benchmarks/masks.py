"""Mask speed on a ResNet-50-sized params tree (25.5M weights in 54 kernels).

Compares, in one run on the same arrays:
  * global magnitude mask (bit bisection, ours) vs a ``jnp.sort`` threshold and
    vs ``lax.top_k`` on the concatenated magnitudes;
  * 2:4 mask (all-pairs rank, ours) vs a double-argsort mask.
Prints medians and ratios; targets (>= 10x on a 2-core CPU) are checked at the end.

  python benchmarks/masks.py [--repeats 5] [--sparsity 0.9]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

from cram_jax import compress


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


def make_params(seed: int = 0) -> dict[str, dict[str, jax.Array]]:
  keys = jax.random.split(jax.random.key(seed), 64)
  return {
      name: {"kernel": jax.random.normal(k, shape, jnp.float32)}
      for k, (name, shape) in zip(keys, resnet50_kernel_shapes().items())
  }


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
    moved = jnp.moveaxis(jnp.abs(x), -2, -1)
    blocks = moved.reshape(moved.shape[:-1] + (-1, m))
    rank = jnp.argsort(
        jnp.argsort(-blocks, axis=-1, stable=True), axis=-1, stable=True
    )
    out.append(jnp.moveaxis((rank < n).reshape(moved.shape), -1, -2))
  return out


def median_seconds(fn, args, repeats):
  jax.block_until_ready(fn(*args))  # compile + warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--sparsity", type=float, default=0.9)
  args = parser.parse_args()

  params = make_params()
  leaves = jax.tree.leaves(params)
  total = sum(x.size for x in leaves)
  print(
      f"params: {len(leaves)} kernels, {total:,} weights; backend {jax.default_backend()}, "
      f"{jax.device_count()} device(s); median of {args.repeats}"
  )

  s = args.sparsity
  ours = jax.jit(lambda p: jax.tree.leaves(compress.global_magnitude(s)(p)[1]))
  by_sort = jax.jit(lambda p: sort_threshold_masks(p, s))
  by_top_k = jax.jit(lambda p: top_k_masks(p, s))
  # The stem has 3 input channels: not a multiple of 4, left dense in both.
  nm_params = {k: v for k, v in params.items() if k != "conv_init"}
  nm_ours = jax.jit(lambda p: jax.tree.leaves(compress.n_of_m(2, 4)(p)[1]))
  nm_argsort = jax.jit(double_argsort_nm)

  # Same masks before timing anything: a fast wrong answer is no answer.
  a, b = ours(params), by_sort(params)
  assert sum(int(m.sum()) for m in a) == round((1 - s) * total)
  assert all(
      bool(jnp.array_equal(x, y)) for x, y in zip(a, b)
  ), "global masks differ"
  assert all(
      bool(jnp.array_equal(x, y))
      for x, y in zip(nm_ours(nm_params), nm_argsort(nm_params))
  )

  rows = [
      (
          "global magnitude, bit bisection (ours)",
          median_seconds(ours, (params,), args.repeats),
      ),
      (
          "global magnitude, jnp.sort threshold",
          median_seconds(by_sort, (params,), args.repeats),
      ),
      (
          "global magnitude, lax.top_k threshold",
          median_seconds(by_top_k, (params,), args.repeats),
      ),
      (
          "2:4, all-pairs rank (ours)",
          median_seconds(nm_ours, (nm_params,), args.repeats),
      ),
      (
          "2:4, double argsort",
          median_seconds(nm_argsort, (nm_params,), args.repeats),
      ),
  ]
  print("\n| mask | median (s) | vs ours |\n|---|---:|---:|")
  for name, t in rows:
    ref = rows[0][1] if name.startswith("global") else rows[3][1]
    print(f"| {name} | {t:.4f} | {t / ref:.1f}x |")
  sort_ratio, top_k_ratio = rows[1][1] / rows[0][1], rows[2][1] / rows[0][1]
  nm_ratio = rows[4][1] / rows[3][1]
  print(
      f"\ntargets: global >= 10x faster than sort: {sort_ratio:.1f}x "
      f"({'met' if sort_ratio >= 10 else 'MISSED'}); than top_k: {top_k_ratio:.1f}x; "
      f"2:4 >= 10x faster than double argsort: {nm_ratio:.1f}x "
      f"({'met' if nm_ratio >= 10 else 'MISSED'})"
  )


if __name__ == "__main__":
  main()

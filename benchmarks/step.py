"""Train-step cost of CrAM+-Multi next to SGD and SAM: ResNet-20 or ResNet-50, any backend.

One process, one machine, the same random batch (fixed seed) for all three optimisers:

  * SGD:  chain(add_decayed_weights(5e-4), sgd(0.1, momentum=0.9)), one forward/backward;
  * SAM:  optax.contrib.sam(SGD, chain(normalize(), sgd(0.05)), sync_period=2,
          opaque_mode=True), ``grad_fn(params, i)``;
  * CrAM+-Multi: cram_jax.cram(SGD, global_magnitude([.3, .4, .5, .6, .7, .8, .9]),
          rho=0.2) (plus=True), the same ``grad_fn(params, i)``: one train
          step serves all three.

BatchNorm is handled alike (README quick start): the clean pass's batch statistics are
kept, the second pass runs in train mode and its statistics are dropped. Each step is
compiled once (params, batch_stats and optimizer state donated) and timed in
interleaved rounds (SGD, SAM, CrAM+, SGD, ...), so background load hits all three alike.
On a shared 2-core machine step times are bimodal (a step that meets a burst of other
work takes up to 2x longer), so the time target is checked two ways: on the median of
per-round wall ratios (neighbours in time share the load) and on process CPU time per
step (the work done, much less sensitive to other jobs); ratios of wall medians and of
the fastest steps are printed too.
Peak memory comes from the compiled executables' ``memory_analysis()``, and, where
``/proc/self/clear_refs`` lets us reset the process high-water mark, from peak RSS
growth during each timed step. The compression alone (the jitted global-magnitude mask
on the model's params) is timed too.

  .venv/bin/python benchmarks/step.py [--repeats 15] [--warmup 3] [--batch-size 128] [--seed 0]
      [--model resnet20|resnet50] [--dtype float32|bfloat16]

``--model resnet20`` (default) takes a CIFAR-shaped batch (32x32x3, 10 classes);
``resnet50`` an ImageNet-shaped one (224x224x3, 1000 classes). ``--dtype`` is the
compute dtype of the convolutions, BatchNorm and head (mixed precision: parameters,
optimizer state and the masks stay float32). On a GPU, for example:
``--model resnet50 --dtype bfloat16 --batch-size 256``.

About 2.5 minutes on a 2-core CPU with the defaults (longer when other jobs share it).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cram_jax
from cram_jax import compress
from cram_jax.models import ResNet20, ResNet50

# --model: (constructor, image side, classes).
MODELS = {"resnet20": (ResNet20, 32, 10), "resnet50": (ResNet50, 224, 1000)}

SPARSITIES = [
    0.3,
    0.4,
    0.5,
    0.6,
    0.7,
    0.8,
    0.9,
]  # docs/method.md section 7, ResNet-20 Multi run
CRAM_RHO = 0.2
SAM_RHO = 0.05
METHODS = ("SGD", "SAM", "CrAM+-Multi")
TIME_TARGET = 1.05  # CrAM+ step time <= 1.05x SAM's
MEM_TARGET_COPIES = 1.0  # CrAM+ peak <= SAM peak + one parameter copy
MiB = 2.0**20
RSS_ROUNDS = 3
RSS_PAUSE_S = 0.3


# --------------------------------------------------------------------------- memory probes


def _proc_status_kib(field: str) -> int | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def _reset_peak_rss() -> bool:
  """Resets the process high-water mark (VmHWM) to the current RSS (Linux >= 4.0)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


# --------------------------------------------------------------------------- the three steps


def base_optimizer() -> optax.GradientTransformation:
  return optax.chain(
      optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9)
  )


def build_steps(
    model: Any,
) -> dict[str, tuple[optax.GradientTransformation, Callable]]:
  """``{name: (tx, step)}``; ``step(params, batch_stats, opt_state, x, y)``."""

  def loss_fn(params, batch_stats, images, labels):
    logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats},
        images,
        train=True,
        mutable=["batch_stats"],
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, labels
    ).mean()
    return loss, updates["batch_stats"]

  def second_pass_grad(params, batch_stats, images, labels):
    # Train-mode BatchNorm, statistics of this pass thrown away.
    return jax.grad(loss_fn, has_aux=True)(params, batch_stats, images, labels)[
        0
    ]

  sgd = optax.with_extra_args_support(base_optimizer())
  sam = optax.contrib.sam(
      base_optimizer(),
      optax.chain(optax.contrib.normalize(), optax.sgd(SAM_RHO)),
      sync_period=2,
      opaque_mode=True,
  )
  cram = cram_jax.cram(
      base_optimizer(), compress.global_magnitude(SPARSITIES), rho=CRAM_RHO
  )

  def make(tx):
    def step(params, batch_stats, opt_state, images, labels):
      # Clean pass: its BatchNorm statistics are the ones kept, in every method.
      (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, batch_stats, images, labels
      )
      # One call for every method: SAM and CrAM share optax's opaque-mode
      # contract, grad_fn(params, i); SGD ignores grad_fn.
      updates, opt_state = tx.update(
          grads,
          opt_state,
          params,
          grad_fn=lambda p, _: second_pass_grad(p, batch_stats, images, labels),
      )
      return optax.apply_updates(params, updates), new_stats, opt_state, loss

    return step

  return {
      "SGD": (sgd, make(sgd)),
      "SAM": (sam, make(sam)),
      "CrAM+-Multi": (cram, make(cram)),
  }


def tree_bytes(tree: Any) -> int:
  return sum(
      int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
      for x in jax.tree.leaves(tree)
  )


def fresh_copy(tree: Any) -> Any:
  """Own buffers for each method: donation invalidates the arrays passed in."""
  return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


def xla_peak(stats: Any) -> dict[str, int]:
  """Bytes resident while the executable runs: ``argument + output - alias + temp``.

  Arguments (params, batch_stats, optimizer state, batch) live for the whole call.
  Outputs are new buffers except those written into donated arguments: ``alias``
  bytes are counted in both ``argument`` and ``output``, so they are subtracted once.
  ``temp`` is XLA's scratch arena, the high-water mark of the buffer assignment's heap
  simulation over all intermediates (saved activations, gradients, the perturbed and
  compressed weights, masks); it is what differs between the methods.
  """
  arg = stats.argument_size_in_bytes
  out = stats.output_size_in_bytes
  alias = stats.alias_size_in_bytes
  temp = stats.temp_size_in_bytes
  return {
      "argument": arg,
      "output": out,
      "alias": alias,
      "temp": temp,
      "peak": arg + out - alias + temp,
  }


def median_time(fn: Callable[[int], Any], repeats: int, warmup: int) -> float:
  for i in range(warmup):
    jax.block_until_ready(fn(i))
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(warmup + i))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


# --------------------------------------------------------------------------- main


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--repeats", type=int, default=15, help="timed steps per method"
  )
  parser.add_argument(
      "--warmup", type=int, default=3, help="untimed steps per method first"
  )
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument(
      "--seed", type=int, default=0, help="seed of the random batch and init"
  )
  parser.add_argument("--model", choices=sorted(MODELS), default="resnet20")
  parser.add_argument(
      "--dtype",
      choices=["float32", "bfloat16"],
      default="float32",
      help="compute dtype (parameters stay float32)",
  )
  args = parser.parse_args()
  if args.repeats < 1 or args.warmup < 0 or args.batch_size < 1:
    parser.error("need --repeats >= 1, --warmup >= 0, --batch-size >= 1")
  t_start = time.perf_counter()
  load_start = os.getloadavg()[0]

  make_model, side, classes = MODELS[args.model]
  rng = np.random.default_rng(args.seed)
  images = jnp.asarray(
      rng.standard_normal((args.batch_size, side, side, 3), dtype=np.float32)
  )
  labels = jnp.asarray(rng.integers(0, classes, args.batch_size), jnp.int32)
  model = make_model(num_classes=classes, dtype=jnp.dtype(args.dtype))
  variables = model.init(jax.random.key(args.seed), images[:1], train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  param_bytes = tree_bytes(params)
  n_params = sum(x.size for x in jax.tree.leaves(params))

  print(
      f"{args.model}, {args.dtype} compute, batch {args.batch_size}x{side}x{side}x3, "
      f"{classes} classes, random data (seed "
      f"{args.seed}); {n_params:,} params, one copy = {param_bytes:,} B "
      f"({param_bytes / MiB:.2f} MiB)"
  )
  print(
      f"jax {jax.__version__}, backend {jax.default_backend()} "
      f"({jax.devices()[0].device_kind}), {os.cpu_count()} CPU(s) "
      f"({platform.processor() or platform.machine()}); load average at start "
      f"{load_start:.2f}; {args.warmup} warm-up + {args.repeats} timed steps per "
      f"method, interleaved in rounds"
  )

  # Compile each step once; the timed calls go straight to these executables.
  steps = build_steps(model)
  compiled, memory, state, compile_s = {}, {}, {}, {}
  for name in METHODS:
    tx, step = steps[name]
    opt_state = tx.init(params)
    start = time.perf_counter()
    exe = (
        jax.jit(step, donate_argnums=(0, 1, 2))
        .lower(params, batch_stats, opt_state, images, labels)
        .compile()
    )
    compile_s[name] = time.perf_counter() - start
    compiled[name] = exe
    memory[name] = xla_peak(exe.memory_analysis())
    state[name] = (
        fresh_copy(params),
        fresh_copy(batch_stats),
        fresh_copy(opt_state),
    )

  wall = {n: [] for n in METHODS}
  cpu = {n: [] for n in METHODS}
  losses = {n: [] for n in METHODS}
  for r in range(args.warmup + args.repeats):
    for name in METHODS:
      w0, c0 = time.perf_counter(), time.process_time()
      out = jax.block_until_ready(compiled[name](*state[name], images, labels))
      w1, c1 = time.perf_counter(), time.process_time()
      state[name] = out[:3]
      losses[name].append(float(out[3]))
      if r >= args.warmup:
        wall[name].append(w1 - w0)
        cpu[name].append(c1 - c0)

  # Peak RSS growth during one step, after the timed rounds (so the pauses it needs do
  # not touch the timings): XLA's CPU runtime frees a step's temp buffer a little after
  # the outputs are ready, so wait, reset the high-water mark, read RSS, run one step,
  # read the high-water mark again.
  rss = {n: [] for n in METHODS}
  if _reset_peak_rss() and _proc_status_kib("VmHWM") is not None:
    for _ in range(RSS_ROUNDS):
      for name in METHODS:
        time.sleep(RSS_PAUSE_S)
        _reset_peak_rss()
        before = _proc_status_kib("VmRSS")
        out = jax.block_until_ready(
            compiled[name](*state[name], images, labels)
        )
        rss[name].append((_proc_status_kib("VmHWM") - before) * 1024)
        state[name] = out[:3]

  # The compression alone: the mask CrAM+ computes every step, on the same params.
  compressor = compress.global_magnitude(SPARSITIES)
  compress_exe = jax.jit(compressor).lower(params, jax.random.key(0)).compile()
  keys = jax.random.split(jax.random.key(1), 64)
  compress_s = median_time(
      lambda i: compress_exe(params, keys[i % len(keys)]),
      2 * args.repeats + 5,
      args.warmup + 5,
  )

  for name in METHODS:
    assert all(
        np.isfinite(losses[name])
    ), f"{name}: non-finite loss {losses[name]}"

  med = {n: statistics.median(wall[n]) for n in METHODS}
  cpu_med = {n: statistics.median(cpu[n]) for n in METHODS}
  rss_med = {n: statistics.median(rss[n]) if rss[n] else None for n in METHODS}

  print(
      "\n| method | step median (s) | min-max (s) | CPU s/step | vs SGD | temp (MiB) | "
      "XLA peak (MiB) | peak RSS growth (MiB) | compile (s) |"
  )
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  for name in METHODS:
    m = memory[name]
    rss_cell = (
        f"{rss_med[name] / MiB:.1f}" if rss_med[name] is not None else "n/a"
    )
    print(
        f"| {name} | {med[name]:.3f} | {min(wall[name]):.3f}-{max(wall[name]):.3f} | "
        f"{cpu_med[name]:.2f} | {med[name] / med['SGD']:.2f}x | {m['temp'] / MiB:.2f} | "
        f"{m['peak'] / MiB:.2f} | {rss_cell} | {compile_s[name]:.1f} |"
    )
  print(
      f"| compression alone (global_magnitude mask, jitted) | {compress_s:.4f} | | | "
      f"{compress_s / med['SGD']:.3f}x | | | | |"
  )

  print(
      "\nXLA peak = argument + output - alias + temp (bytes; alias = outputs written into "
      "the donated params/batch_stats/opt_state, counted in both argument and output):"
  )
  for name in METHODS:
    m = memory[name]
    print(
        f"  {name:12s} {m['argument']:>11,} + {m['output']:>10,} - {m['alias']:>10,} + "
        f"{m['temp']:>12,} = {m['peak']:>12,}"
    )

  cram_name = "CrAM+-Multi"
  mem_copies = (memory[cram_name]["peak"] - memory["SAM"]["peak"]) / param_bytes

  def paired(
      a, b
  ):  # median over rounds of a/b; the steps of one round are neighbours in time
    return statistics.median(x / y for x, y in zip(wall[a], wall[b]))

  print(
      "\n| ratio | per-round wall ratio, median | ratio of wall medians | "
      "ratio of fastest steps | ratio of CPU-time medians |\n|---|---:|---:|---:|---:|"
  )
  for a, b in ((cram_name, "SAM"), (cram_name, "SGD"), ("SAM", "SGD")):
    print(
        f"| {a.split('-')[0]} / {b} step | {paired(a, b):.3f}x | {med[a] / med[b]:.3f}x | "
        f"{min(wall[a]) / min(wall[b]):.3f}x | {cpu_med[a] / cpu_med[b]:.3f}x |"
    )
  print(
      f"| compression / CrAM+ step | {compress_s / med[cram_name]:.2%} | | | |"
  )
  print(
      f"\nCrAM+ peak - SAM peak: XLA {memory[cram_name]['peak'] - memory['SAM']['peak']:+,} B "
      f"= {mem_copies:+.3f} parameter copies",
      end="",
  )
  if rss_med[cram_name] is not None:
    rss_copies = (rss_med[cram_name] - rss_med["SAM"]) / param_bytes
    print(
        f"; RSS growth {rss_med[cram_name] - rss_med['SAM']:+,.0f} B = {rss_copies:+.2f} "
        f"copies (page-granular, allocator-dependent: informative only)"
    )
  else:
    print("; RSS: /proc/self/clear_refs not writable here, not measured")

  t_wall = paired(cram_name, "SAM")
  t_cpu = cpu_med[cram_name] / cpu_med["SAM"]

  def verdict(ok):
    return "met" if ok else "MISSED"

  # Off the CPU backend, process CPU time is the host's dispatch work, not the
  # step's: it is printed in the table but judges nothing.
  cpu_verdict = (
      f"; process CPU time (ratio of medians): {t_cpu:.3f}x "
      f"({verdict(t_cpu <= TIME_TARGET)})"
      if jax.default_backend() == "cpu"
      else ""
  )
  print(
      f"\ntargets:\n  CrAM+ step time <= {TIME_TARGET:.2f}x SAM's, wall (median of per-round "
      f"ratios): {t_wall:.3f}x ({verdict(t_wall <= TIME_TARGET)}){cpu_verdict}"
  )
  print(
      f"  CrAM+ peak <= SAM peak + {MEM_TARGET_COPIES:g} parameter copy (XLA): "
      f"{mem_copies:+.3f} copies ({verdict(mem_copies <= MEM_TARGET_COPIES)})"
  )
  load = max(load_start, os.getloadavg()[0])
  if load > (os.cpu_count() or 1):
    print(
        f"  note: load average up to {load:.1f} on {os.cpu_count()} CPU(s): other jobs shared "
        f"the cores, so wall-clock ratios carry a few % of noise here (CPU time much less); "
        f"rerun on an idle machine to settle a wall-clock ratio near the target"
    )
  print(
      f"load average at end {os.getloadavg()[0]:.2f}; "
      f"total {time.perf_counter() - t_start:.0f} s"
  )


if __name__ == "__main__":
  main()

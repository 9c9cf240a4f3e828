"""One-shot pruning sweep: load trained runs, prune once, re-estimate BatchNorm, evaluate.

  python experiments/oneshot.py --workdir runs/rn20_sgd --workdir runs/rn20_cram --out runs/oneshot

For each run (its newest intact checkpoint and its config.json): global and layer-wise
magnitude pruning at `config.oneshot.sparsities` and N:M at `config.oneshot.nm_patterns`,
BatchNorm statistics re-estimated on 1000 random training images (100 batches of 128,
training augmentation; skipped for models without BatchNorm), then the task's
evaluation. Writes `oneshot.md` (the table), `oneshot.csv` and `oneshot.png`
(metric vs sparsity, one line per run and pruning kind) to `--out`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

if __package__ in (None, ""):  # run as a script: make `experiments` importable
  sys.path.insert(
      0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  )

import ml_collections
import numpy as np

import cram_jax
from cram_jax import compress
from cram_jax import data as data_lib
from experiments import train as train_lib


@dataclasses.dataclass(frozen=True)
class Result:
  method: str
  compression: str  # 'dense', 'global 90%', 'uniform 90%', '2:4'
  kind: str  # 'dense' | 'global' | 'uniform' | 'n:m'
  target: float  # the requested sparsity (N:M: 1 - n/m)
  prunable_sparsity: float
  total_sparsity: float
  metrics: dict[str, float]


class Subset:
  """A random-access view of some records of a source."""

  def __init__(self, source, indices):
    self.source, self.indices = source, np.asarray(indices)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]


_COMPRESSORS: dict[Any, Any] = {}


def compressions(
    config: ml_collections.ConfigDict, task
) -> list[tuple[str, str, float, Any, dict[str, int]]]:
  """The sweep: (label, kind, target sparsity, compressor, its call kwargs).

  One compressor per kind serves every sparsity through ``level=i``, and compressors
  are shared between runs, so each kind compiles once per sweep.
  """
  sparsities = tuple(float(s) for s in config.oneshot.sparsities)
  patterns = tuple((int(n), int(m)) for n, m in config.oneshot.nm_patterns)
  cache_key = (sparsities, patterns, task.select, task.uniform_select)
  if cache_key not in _COMPRESSORS:
    _COMPRESSORS[cache_key] = (
        compress.global_magnitude(list(sparsities), select=task.select),
        compress.layerwise_magnitude(
            list(sparsities), select=task.uniform_select
        ),
        [
            compress.n_of_m(n, m, on_indivisible="skip", select=task.select)
            for n, m in patterns
        ],
    )
  global_all, uniform_all, nm = _COMPRESSORS[cache_key]
  out = []
  for kind, compressor in (("global", global_all), ("uniform", uniform_all)):
    for i, s in enumerate(sparsities):
      out.append(
          (f"{kind} {round(100 * s)}%", kind, s, compressor, {"level": i})
      )
  for (n, m), compressor in zip(patterns, nm):
    out.append((f"{n}:{m}", "n:m", 1 - n / m, compressor, {}))
  return out


def calibration_images(run: train_lib.Run) -> list[Any]:
  """docs/method.md section 5: batches from 1000 random training images, training augmentation."""
  config = run.config
  source = data_lib.open_source(
      config.dataset, config.train_split, data_dir=config.data_dir
  )
  rng = np.random.default_rng(config.seed)
  chosen = rng.choice(
      len(source),
      size=min(config.oneshot.bn_images, len(source)),
      replace=False,
  )
  batch_size = min(config.oneshot.bn_batch_size, len(chosen))
  iterator = data_lib.make_pipeline(
      config.dataset,
      config.train_split,
      source=Subset(source, chosen),
      batch_size=batch_size,
      train=True,
      seed=config.seed,
      **dict(config.data_options),
  )
  inputs = []
  for _ in range(config.oneshot.bn_batches):
    batch = next(iterator)
    inputs.append(run.task.model_inputs(batch))
  return inputs


def sweep(
    workdir: str, *, override: dict[str, Any] | None = None
) -> list[Result]:
  """Evaluates one trained run under every compression of its `config.oneshot`."""
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.parallel = (
      "jit"  # evaluation is the same either way; BN re-estimation needs no axis
  )
  config.cram.local_perturbation = False  # a pmap-only training option
  for key, value in (override or {}).items():
    config.oneshot[key] = value
  run, state = train_lib.load_final(workdir, config)
  method = train_lib.method_label(config)
  eval_fn = run.parallel.compile_eval(run.task.eval_outputs)
  variables = train_lib.variables_of(state)

  def evaluate(variables):
    return train_lib.evaluate(run, eval_fn, run.parallel.place_state(variables))

  dense = cram_jax.sparsity_report(variables["params"], select=run.task.select)
  results = [
      Result(
          method,
          "dense",
          "dense",
          0.0,
          dense.prunable_sparsity,
          dense.total_sparsity,
          evaluate(variables),
      )
  ]
  bn_inputs = calibration_images(run) if run.task.has_batch_stats else None
  for label, kind, target, compressor, kwargs in compressions(config, run.task):
    pruned, masks = cram_jax.prune(variables["params"], compressor, **kwargs)
    report = cram_jax.sparsity_report(pruned, masks)
    candidate = {**variables, "params": pruned}
    if bn_inputs is not None:
      candidate = cram_jax.recalibrate_batch_stats(
          run.task.model, candidate, bn_inputs
      )
    results.append(
        Result(
            method,
            label,
            kind,
            target,
            report.prunable_sparsity,
            report.total_sparsity,
            evaluate(candidate),
        )
    )
  return results


def markdown_table(results: Sequence[Result], metric: str) -> str:
  labels = list(dict.fromkeys(r.compression for r in results))
  methods = list(dict.fromkeys(r.method for r in results))
  value = {
      (r.method, r.compression): r.metrics.get(metric, float("nan"))
      for r in results
  }
  lines = [
      "| method | " + " | ".join(labels) + " |",
      "|---|" + "---:|" * len(labels),
  ]
  for m in methods:
    lines.append(
        f"| {m} | "
        + " | ".join(
            f"{100 * value.get((m, lab), math.nan):.2f}" for lab in labels
        )
        + " |"
    )
  return "\n".join(lines)


def write_csv(results: Sequence[Result], path: str) -> None:
  names = sorted({k for r in results for k in r.metrics})
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(
        [
            "method",
            "compression",
            "kind",
            "target_sparsity",
            "prunable_sparsity",
            "total_sparsity",
            *names,
        ]
    )
    for r in results:
      writer.writerow(
          [
              r.method,
              r.compression,
              r.kind,
              r.target,
              f"{r.prunable_sparsity:.6f}",
              f"{r.total_sparsity:.6f}",
              *(r.metrics.get(n, "") for n in names),
          ]
      )


def plot(results: Sequence[Result], metric: str, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
  methods = list(dict.fromkeys(r.method for r in results))
  colors = dict(
      zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4)
  )
  for m in methods:
    dense = [r for r in results if r.method == m and r.kind == "dense"]
    for kind, style in (("global", "-o"), ("uniform", "--s")):
      rows = dense + sorted(
          (r for r in results if r.method == m and r.kind == kind),
          key=lambda r: r.target,
      )
      ax.plot(
          [r.prunable_sparsity for r in rows],
          [100 * r.metrics[metric] for r in rows],
          style,
          color=colors[m],
          label=f"{m}, {kind}",
          markersize=4,
      )
    for j, r in enumerate(
        r for r in results if r.method == m and r.kind == "n:m"
    ):
      ax.plot(
          [r.prunable_sparsity],
          [100 * r.metrics[metric]],
          "*",
          color=colors[m],
          markersize=11,
      )
      ax.annotate(
          r.compression,
          (r.prunable_sparsity, 100 * r.metrics[metric]),
          textcoords="offset points",
          xytext=(6, -10 - 9 * j),
          fontsize=7,
          color=colors[m],
      )
  ax.set_xlabel("sparsity of the prunable weights (one-shot, BN re-estimated)")
  ax.set_ylabel(f"{metric} (%)")
  ax.set_title("One-shot pruning without retraining")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def write_outputs(
    results: Sequence[Result], metric: str, out: str
) -> dict[str, str]:
  os.makedirs(out, exist_ok=True)
  paths = {
      "table": os.path.join(out, "oneshot.md"),
      "csv": os.path.join(out, "oneshot.csv"),
      "plot": os.path.join(out, "oneshot.png"),
  }
  table = markdown_table(results, metric)
  with open(paths["table"], "w") as f:
    f.write(f"{metric} (%) after one-shot pruning\n\n{table}\n")
  write_csv(results, paths["csv"])
  plot(results, metric, paths["plot"])
  return paths


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--workdir",
      action="append",
      required=True,
      help="a training run's directory; repeat for several methods",
  )
  parser.add_argument(
      "--out", required=True, help="where the table, CSV and plot go"
  )
  parser.add_argument("--sparsities", type=float, nargs="*", default=None)
  parser.add_argument("--bn-batches", type=int, default=None)
  args = parser.parse_args(argv)
  override = {}
  if args.sparsities is not None:
    override["sparsities"] = tuple(args.sparsities)
  if args.bn_batches is not None:
    override["bn_batches"] = args.bn_batches
  results: list[Result] = []
  metric = None
  for workdir in args.workdir:
    rows = sweep(workdir, override=override)
    results.extend(rows)
    with open(os.path.join(workdir, "config.json")) as f:
      task = json.load(f)["task"]
    metric = metric or {"vision": "accuracy", "squad": "f1"}[task]
  paths = write_outputs(results, metric, args.out)
  print(
      f"\n{metric} (%) after one-shot pruning (BatchNorm re-estimated where present):\n"
  )
  print(markdown_table(results, metric))
  print(f"\nwritten: {paths['table']}, {paths['csv']}, {paths['plot']}")
  return paths


if __name__ == "__main__":
  main()

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
import time
from collections.abc import Callable, Sequence
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
from experiments import cli
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
  model: str = ""  # e.g. 'ResNet8', 'BERT-base': for the plot's title
  dataset: str = ""  # e.g. 'digits', 'cifar10'
  split: str = ""  # the evaluation split, e.g. 'test'
  bn_reestimated: bool = False


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


def model_and_dataset(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """What a reader calls the run's model and data, e.g. ('ResNet8', 'digits')."""
  if config.task == "squad":
    return f"BERT-{config.bert.size}", config.dataset
  return config.model, config.dataset


def _print(line: str) -> None:
  print(line, flush=True)


def sweep(
    workdir: str,
    *,
    override: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = _print,
) -> list[Result]:
  """Evaluates one trained run under every compression of its `config.oneshot`.

  Args:
    workdir: a training run's directory (its `config.json` and checkpoints).
    override: `config.oneshot` fields to replace, e.g. `{"bn_batches": 10}`.
    log: called with one line per evaluated configuration, as it finishes
      (e.g. `sgd [3/13] global 70%: accuracy 98.89% (BN re-estimated, 2.1 s)`);
      None for silence.
  """
  log = log or (lambda line: None)
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.parallel = (
      "jit"  # evaluation is the same either way; BN re-estimation needs no axis
  )
  config.cram.local_perturbation = False  # a pmap-only training option
  for key, value in (override or {}).items():
    config.oneshot[key] = value
  start = time.perf_counter()
  run, state = train_lib.load_final(workdir, config)
  method = train_lib.method_label(config)
  model, dataset = model_and_dataset(config)
  metric = run.task.metric
  eval_fn = run.parallel.compile_eval(run.task.eval_outputs)
  variables = train_lib.variables_of(state)
  sweep_list = compressions(config, run.task)
  total = len(sweep_list) + 1  # and dense
  log(
      f"{method}: {model} on {dataset} from {workdir} (step "
      f"{int(state['step'])}), {total} configurations"
  )

  def evaluate(variables):
    return train_lib.evaluate(run, eval_fn, run.parallel.place_state(variables))

  def finish(label, kind, target, report, metrics, note, seconds):
    results.append(
        Result(
            method,
            label,
            kind,
            target,
            report.prunable_sparsity,
            report.total_sparsity,
            metrics,
            model,
            dataset,
            split=config.eval_split,
            bn_reestimated=bool(note),
        )
    )
    log(
        f"{method} [{len(results)}/{total}] {label}: {metric} "
        f"{100 * metrics.get(metric, math.nan):.2f}% ({note}{seconds:.1f} s)"
    )

  results: list[Result] = []
  dense = cram_jax.sparsity_report(variables["params"], select=run.task.select)
  finish(
      "dense",
      "dense",
      0.0,
      dense,
      evaluate(variables),
      "",
      time.perf_counter() - start,
  )
  bn_inputs = None
  if run.task.has_batch_stats:
    tick = time.perf_counter()
    bn_inputs = calibration_images(run)
    log(
        f"{method}: {len(bn_inputs)} batches of training images for BatchNorm "
        f"re-estimation ({time.perf_counter() - tick:.1f} s)"
    )
  note = "BN re-estimated, " if bn_inputs is not None else ""
  for label, kind, target, compressor, kwargs in sweep_list:
    tick = time.perf_counter()
    pruned, masks = cram_jax.prune(variables["params"], compressor, **kwargs)
    report = cram_jax.sparsity_report(pruned, masks)
    candidate = {**variables, "params": pruned}
    if bn_inputs is not None:
      candidate = cram_jax.recalibrate_batch_stats(
          run.task.model, candidate, bn_inputs
      )
    metrics = evaluate(candidate)
    finish(
        label,
        kind,
        target,
        report,
        metrics,
        note,
        time.perf_counter() - tick,
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


KIND_NAMES = {"global": "global", "uniform": "layer-wise"}


def _title(results: Sequence[Result]) -> str:
  """'ResNet8 on digits'; several models or data sets are listed."""
  models = ", ".join(dict.fromkeys(r.model for r in results if r.model))
  datasets = ", ".join(dict.fromkeys(r.dataset for r in results if r.dataset))
  if models and datasets:
    return f"{models} on {datasets}"
  return models or datasets


def plot(results: Sequence[Result], metric: str, path: str) -> None:
  """Two panels sharing the metric axis, one colour per method.

  Left: the metric against the measured sparsity of the prunable weights, global
  (solid) and layer-wise (dashed) magnitude pruning, the unpruned model as a
  dotted line. Right: N:M patterns as bars grouped by method, values printed.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from matplotlib.lines import Line2D  # pylint: disable=import-outside-toplevel
  from matplotlib.patches import Patch  # pylint: disable=import-outside-toplevel

  methods = list(dict.fromkeys(r.method for r in results))
  colors = dict(
      zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4)
  )
  patterns = list(
      dict.fromkeys(r.compression for r in results if r.kind == "n:m")
  )
  has_nm = bool(patterns)
  fig, axes = plt.subplots(
      1,
      2 if has_nm else 1,
      figsize=(10, 4.6) if has_nm else (7, 4.6),
      dpi=120,
      sharey=True,
      squeeze=False,
      gridspec_kw={"width_ratios": [2.2, 1]} if has_nm else None,
  )
  ax = axes[0, 0]

  def value(r):
    return 100 * r.metrics.get(metric, math.nan)

  def dense_value(m):
    rows = [r for r in results if r.method == m and r.kind == "dense"]
    return value(rows[0]) if rows else None

  # Left: unstructured sparsity.
  styles = {"global": ("-", "o"), "uniform": ("--", "s")}
  xs = []
  for m in methods:
    dense = dense_value(m)
    if dense is not None:
      ax.axhline(dense, color=colors[m], linestyle=":", linewidth=1.2)
    for kind, (line, marker) in styles.items():
      rows = sorted(
          (r for r in results if r.method == m and r.kind == kind),
          key=lambda r: r.prunable_sparsity,
      )
      xs += [100 * r.prunable_sparsity for r in rows]
      ax.plot(
          [100 * r.prunable_sparsity for r in rows],
          [value(r) for r in rows],
          linestyle=line,
          marker=marker,
          color=colors[m],
          markersize=5,
      )
  if xs:
    ticks = sorted({round(x) for x in xs})
    ax.set_xticks(ticks, [f"{t}%" for t in ticks])
    pad = 0.03 * max(max(xs) - min(xs), 1.0)
    ax.set_xlim(min(xs) - pad, max(xs) + pad)
  ax.set_xlabel("sparsity of the prunable weights (magnitude pruning)")
  ax.set_ylabel(f"{metric} (%)")
  ax.set_title("unstructured", fontsize=10)
  ax.grid(alpha=0.3)

  def method_label(m):
    dense = dense_value(m)
    return m if dense is None else f"{m} (dense {dense:.1f}%)"

  handles = [Patch(color=colors[m], label=method_label(m)) for m in methods] + [
      Line2D([], [], color="0.3", linestyle="-", marker="o", label="global"),
      Line2D(
          [],
          [],
          color="0.3",
          linestyle="--",
          marker="s",
          label="layer-wise (uniform)",
      ),
      Line2D([], [], color="0.3", linestyle=":", label="dense (unpruned)"),
  ]

  # Right: N:M, one group of bars per method.
  if has_nm:
    bx = axes[0, 1]
    width = 0.8 / len(patterns)
    hatches = ["", "//", "xx", ".."]
    for i, m in enumerate(methods):
      for j, pattern in enumerate(patterns):
        rows = [
            r for r in results if r.method == m and r.compression == pattern
        ]
        if not rows:
          continue
        x = i + (j - (len(patterns) - 1) / 2) * width
        height = value(rows[0])
        bx.bar(
            x,
            height,
            width * 0.92,
            color=colors[m],
            hatch=hatches[j % len(hatches)],
            edgecolor="white",
        )
        # The value inside the bar's top: bars of 97 and 99 look alike.
        bx.text(
            x,
            height - 2,
            f"{height:.1f}",
            rotation=90,
            ha="center",
            va="top",
            color="white",
            fontsize=8,
            fontweight="bold",
            bbox={"facecolor": colors[m], "edgecolor": "none", "pad": 1},
        )
      dense = dense_value(m)
      if dense is not None:
        bx.hlines(
            dense,
            i - 0.45,
            i + 0.45,
            colors=colors[m],
            linestyles=":",
            linewidth=1.2,
        )
    bx.set_xticks(range(len(methods)), methods)
    bx.set_title("N:M (n of every m inputs kept)", fontsize=10)
    bx.grid(alpha=0.3, axis="y")
    handles += [
        Patch(
            facecolor="0.6",
            edgecolor="white",
            hatch=hatches[j % len(hatches)],
            label=pattern,
        )
        for j, pattern in enumerate(patterns)
    ]
  lows = [value(r) for r in results if math.isfinite(value(r))]
  if lows:
    ax.set_ylim(max(0.0, min(lows) - 8), min(105.0, max(lows) + 5))
  what = _title(results)
  splits = "/".join(dict.fromkeys(r.split for r in results if r.split))
  splits = splits or "evaluation"
  fig.suptitle(
      "One-shot pruning without retraining"
      + (f": {what}" if what else "")
      + f"\n{metric} on the {splits} split"
      + (
          ", BatchNorm re-estimated after pruning"
          if any(r.bn_reestimated for r in results)
          else ""
      ),
      fontsize=11,
  )
  # Two rows under the panels: the methods, then what lines and bars mean.
  rows = (handles[: len(methods)], handles[len(methods) :])
  for y, row in zip((0.055, 0.0), rows):
    fig.legend(
        handles=row,
        loc="lower center",
        bbox_to_anchor=(0.5, y),
        ncol=len(row),
        fontsize=8,
        frameon=False,
    )
  fig.tight_layout(rect=(0, 0.11, 1, 1))
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


def _check_workdir(workdir: str) -> None:
  """A workdir must hold a finished or checkpointed training run."""
  if not os.path.isdir(workdir):
    raise cli.UsageError(f"--workdir {workdir}: no such directory")
  if not os.path.isfile(os.path.join(workdir, "config.json")):
    raise cli.UsageError(
        f"--workdir {workdir}: no config.json there; is it a train.py workdir?"
    )


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
  parser.add_argument(
      "-v",
      "--verbose",
      action="store_true",
      help="keep absl/orbax INFO logging (WARNING by default)",
  )
  args = parser.parse_args(argv)
  cli.quiet_logging(verbosity_set=args.verbose)
  with cli.exit_on_usage_error("oneshot.py"):
    return _run(args)


def _run(args: argparse.Namespace) -> dict[str, str]:
  override = {}
  if args.sparsities is not None:
    for s in args.sparsities:
      if not 0.0 <= s < 1.0:
        raise cli.UsageError(f"--sparsities: {s} is not a sparsity in [0, 1)")
    override["sparsities"] = tuple(args.sparsities)
  if args.bn_batches is not None:
    if args.bn_batches < 1:
      raise cli.UsageError(
          f"--bn-batches must be a positive int, got {args.bn_batches}"
      )
    override["bn_batches"] = args.bn_batches
  for workdir in args.workdir:
    _check_workdir(workdir)
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

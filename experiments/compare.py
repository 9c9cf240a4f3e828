"""The digits comparison: seven training methods x three one-shot pruners and two quantisers.

Trains a ResNet-8 on the bundled digits (experiments/configs/digits.py) with SGD,
SAM, CrAM+-Multi, GMP to 80% and 90% and AC/DC at 80% and 90% (the runner's
presets), then compresses each trained run once (experiments/oneshot.py):
magnitude, OBS and SparseGPT pruning at 50/70/80/90/95% (global for magnitude and
OBS; layer-wise for SparseGPT, which prunes layer by layer; layer-wise magnitude
too, its like-for-like baseline) and 2:4, plus int8 and int4 quantisation
(round-to-nearest and GPTQ, per output channel), BatchNorm re-estimated after every compression. Writes
`compare.md` (rows: training methods; columns: pruner x compression; test
accuracy in %), `compare.csv` and `compare.png` to `--out`. Fixed seeds: a second
run prints the same table.

  python experiments/compare.py [--out outputs/compare] [--epochs 30] [--resume]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

if __package__ in (None, ""):  # run as a script: make `experiments` importable
  sys.path.insert(
      0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  )

from experiments import cli, oneshot, train
from experiments.configs import digits

METHODS = (
    "sgd",
    "sam",
    "cram+-multi",
    "gmp-80",
    "gmp-90",
    "acdc-80",
    "acdc-90",
)
# The sweep, as `config.oneshot` fields over digits.py's (its BatchNorm
# re-estimation: 100 batches of 128 from 1000 training images).
ONESHOT = {
    "sparsities": (0.5, 0.7, 0.8, 0.9, 0.95),
    "nm_patterns": ((2, 4),),
    "pruners": oneshot.PRUNERS,
    "quantizers": (8, 4),
    "quantize_methods": ("rtn", "gptq"),
}
HEADING = (
    "{metric} (%) after one-shot compression (BatchNorm re-estimated after"
    " each); rows: training method, columns: pruner and compression"
)


def workdir_name(method: str) -> str:
  """'cram+-multi' -> 'cramplus-multi': a directory name without '+'."""
  return method.replace("+", "plus")


def compare(
    out: str,
    *,
    methods: Sequence[str] = METHODS,
    epochs: int = 30,
    resume: bool = False,
    config_override: Mapping[str, Any] | None = None,
    oneshot_override: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = oneshot._print,  # pylint: disable=protected-access
) -> dict[str, str]:
  """Trains `methods` on digits into `out/<method>`, sweeps them, writes `out/compare.*`.

  Args:
    out: the output directory (runs, the prepared digits under `tfds/`, and
      compare.md, compare.csv, compare.png).
    methods: presets of experiments/configs/digits.py.
    epochs: training epochs of every method.
    resume: keep finished or interrupted runs in `out` instead of starting over.
    config_override: top-level config fields set on every run after the
      method's preset (for tests, e.g. `{"num_train_steps": 3}`).
    oneshot_override: `config.oneshot` fields over ONESHOT.
    log: called with each progress line.

  Returns:
    The paths written: {'table', 'csv', 'plot'}.

  Raises:
    ValueError: an unknown method or a bad `config.oneshot` field, before any
      training.
  """
  sweep_fields = {**ONESHOT, **dict(oneshot_override or {})}
  configs = []
  for method in methods:  # every mistake is reported before hours of work
    config = digits.get_config(method)
    config.data_dir = os.path.join(out, "tfds")
    config.num_epochs = epochs
    config.log_every_steps = 5 * 22  # every 5 epochs
    for key, value in (config_override or {}).items():
      config[key] = value
    oneshot.set_fields(config, sweep_fields)
    oneshot.options(config)
    configs.append(config)

  start = time.perf_counter()
  workdirs = []
  for method, config in zip(methods, configs):
    workdir = os.path.join(out, workdir_name(method))
    if not resume and os.path.exists(workdir):
      shutil.rmtree(workdir)
    log(f"\n== training {method} -> {workdir}")
    tick = time.perf_counter()
    train.train_and_evaluate(config, workdir)
    log(f"== {method} trained ({time.perf_counter() - tick:.0f} s)")
    workdirs.append(workdir)

  log(
      "\n== one-shot sweep: "
      + ", ".join(oneshot.PRUNER_NAMES[p] for p in sweep_fields["pruners"])
      + " pruning"
      + "".join(
          f", {oneshot.PRUNER_NAMES[q]} int{b}"
          for q in sweep_fields["quantize_methods"]
          for b in sweep_fields["quantizers"]
      )
      + " (BatchNorm re-estimated after each)"
  )
  results = []
  for workdir in workdirs:
    tick = time.perf_counter()
    results.extend(oneshot.sweep(workdir, override=sweep_fields, log=log))
    log(f"== {workdir} swept ({time.perf_counter() - tick:.0f} s)")
  metric = "accuracy"
  paths = oneshot.write_outputs(
      results,
      metric,
      out,
      name="compare",
      heading=HEADING.format(metric=metric),
  )
  log("\n" + HEADING.format(metric=metric) + ":\n")
  log(oneshot.markdown_table(results, metric))
  log(
      f"\nDone in {time.perf_counter() - start:.0f} s. Outputs in {out}/: "
      "compare.md (table), compare.csv, compare.png (plot); each run's "
      f"metrics and checkpoints under {out}/<method>/."
  )
  return paths


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join("outputs", "compare"))
  parser.add_argument("--epochs", type=int, default=30)
  parser.add_argument(
      "--resume",
      action="store_true",
      help="keep finished or interrupted runs in --out instead of starting over",
  )
  parser.add_argument(
      "--methods",
      nargs="+",
      default=list(METHODS),
      help=f"training presets of configs/digits.py (default: {' '.join(METHODS)})",
  )
  parser.add_argument(
      "-v",
      "--verbose",
      action="store_true",
      help="keep absl/orbax INFO logging (WARNING by default)",
  )
  args = parser.parse_args(argv)
  cli.quiet_logging(verbosity_set=args.verbose)
  with cli.exit_on_usage_error("compare.py"):
    if args.epochs < 1:
      raise cli.UsageError(
          f"--epochs must be a positive int, got {args.epochs}"
      )
    for method in args.methods:
      try:
        digits.get_config(method)
      except ValueError as e:
        raise cli.UsageError(f"--methods: {e}") from None
    return compare(
        args.out, methods=args.methods, epochs=args.epochs, resume=args.resume
    )


if __name__ == "__main__":
  main()

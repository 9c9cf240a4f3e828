"""The main job: does CrAM make a network survive one-shot pruning?

Trains a ResNet-8 from the zoo on the bundled handwritten digits (1797 real 8x8
images from scikit-learn, prepared offline as a TFDS dataset) three times, with SGD,
SAM and CrAM+-Multi, through the experiment runner (experiments/train.py, config
experiments/configs/digits.py); then runs the one-shot sweep (experiments/oneshot.py):
global and layer-wise magnitude pruning at 50-95% and 2:4 / 4:8, BatchNorm
re-estimated, test accuracy of each, one progress line per configuration. Prints the
table and writes it with a CSV and a plot (left: accuracy vs unstructured sparsity;
right: 2:4 and 4:8). Fixed seeds; about 3-4 minutes on 2 CPU cores.

  python experiments/demo.py [--out outputs/demo] [--epochs 30] [--resume]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
import warnings

if __package__ in (None, ""):  # run as a script: make `experiments` importable
  sys.path.insert(
      0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  )

from absl import logging as absl_logging

from experiments import oneshot, train
from experiments.configs import digits

METHODS = ("sgd", "sam", "cram+-multi")


def main(argv=None) -> dict[str, str]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join("outputs", "demo"))
  parser.add_argument("--epochs", type=int, default=30)
  parser.add_argument(
      "--resume",
      action="store_true",
      help="keep finished or interrupted runs in --out instead of starting over",
  )
  args = parser.parse_args(argv)
  absl_logging.set_verbosity(absl_logging.ERROR)  # TFDS is chatty
  logging.getLogger("absl").setLevel(logging.ERROR)
  warnings.filterwarnings("ignore", module="tensorflow_datasets")

  data_dir = os.path.join(args.out, "tfds")
  workdirs = []
  start = time.perf_counter()
  for method in METHODS:
    config = digits.get_config(method)
    config.data_dir = data_dir
    config.num_epochs = args.epochs
    config.log_every_steps = 5 * 22  # every 5 epochs
    workdir = os.path.join(args.out, method.replace("+", "plus"))
    if not args.resume and os.path.exists(workdir):
      shutil.rmtree(workdir)
    print(f"\n== training {method} -> {workdir}")
    train.train_and_evaluate(config, workdir)
    workdirs.append(workdir)

  print("\n== one-shot sweep (BatchNorm re-estimated on 1000 training images)")
  sweep_args = sum((["--workdir", w] for w in workdirs), []) + [
      "--out",
      args.out,
  ]
  paths = oneshot.main(sweep_args)
  print(
      f"\nDone in {time.perf_counter() - start:.0f} s. Outputs in {args.out}/: "
      f"oneshot.md (table), oneshot.csv, oneshot.png (plot); per-run metrics.jsonl, "
      f"metrics.csv, summary.json and checkpoints/ under {', '.join(workdirs)}."
  )
  return paths


if __name__ == "__main__":
  main()

"""Kill-and-resume: a preempted run continues exactly where it stopped.

Runs `experiments/train.py` as a real process (CrAM+-Multi, ResNet-8 on digits, one
CPU device): once without interruption, once stopped with SIGTERM and restarted,
once killed with SIGKILL and restarted. All three end with bitwise-equal params,
optimiser state (including CrAM's PRNG key) and BatchNorm statistics. A corrupted
newest checkpoint is skipped with a warning. The resumed runs' metrics files hold
each (step, split) once, with the uninterrupted run's values, and absl/orbax
INFO logs stay off unless asked for.
"""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import compile_cache
import jax
import ml_collections
import numpy as np
import pytest

from cram_jax.data import prepare_digits
from experiments import train
from experiments.metrics import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 60, 10


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  prepare_digits(str(path))
  return str(path)


def command(workdir, data_dir):
  return [
      sys.executable,
      os.path.join(ROOT, "experiments", "train.py"),
      "--config",
      os.path.join(ROOT, "experiments", "configs", "digits.py")
      + ":cram+-multi",
      "--workdir",
      workdir,
      f"--config.data_dir={data_dir}",
      f"--config.num_train_steps={STEPS}",
      f"--config.checkpoint_every_steps={EVERY}",
      "--config.log_every_steps=1",
      "--config.progress=False",
  ]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """A persistent compilation cache shared by this module's runs."""
  return str(tmp_path_factory.mktemp("jax_cache"))


def environment(cache_dir):
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
      "--xla_force_host_platform_device_count=1"  # one device, fast compile
  )
  env["PYTHONUNBUFFERED"] = "1"
  # The five sessions compile the same programs: once is enough.
  env.update(compile_cache.subprocess_env(cache_dir))
  return env


def last_logged_step(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    steps = [
        json.loads(line)["step"] for line in f if line.strip().endswith("}")
    ]
  return max(steps, default=0)


def run_to_completion(workdir, data_dir, cache_dir):
  done = subprocess.run(
      command(workdir, data_dir),
      env=environment(cache_dir),
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  # absl's INFO lines look like `I1122 09:01:07.429953 ...`; WARNING and up only.
  assert not re.search(r"^I\d{4} ", done.stderr, re.MULTILINE), done.stderr
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["status"] == "completed" and summary["step"] == STEPS


def interrupt(workdir, data_dir, cache_dir, sig, after_step):
  """Starts a run, sends `sig` once it has logged `after_step`, returns the exit code."""
  process = subprocess.Popen(
      command(workdir, data_dir),
      env=environment(cache_dir),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
  )
  deadline = time.monotonic() + 240
  while last_logged_step(workdir) < after_step:
    assert process.poll() is None, process.stderr.read()[-3000:]
    assert time.monotonic() < deadline, "the run did not reach the step in time"
    time.sleep(0.02)
  process.send_signal(sig)
  code = process.wait(timeout=120)
  assert last_logged_step(workdir) < STEPS, "killed too late to be mid-run"
  return code


def final_state(workdir):
  """The newest intact checkpoint, restored in this process."""
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.num_devices = 1
  return train.load_final(workdir, config)[1]


def assert_same_state(a, b):
  assert int(a["step"]) == int(b["step"]) == STEPS
  jax.tree.map(np.testing.assert_array_equal, a, b)


# Wall-clock rates differ between runs; every other value is the same program's.
RATES = ("steps_per_second", "examples_per_second")


def metric_rows(workdir):
  """JSONL rows and long CSV rows, as {(step, split): {name: value}} each;
  fails if a (step, split) or (step, split, name) repeats."""
  jsonl = {}
  for row in read_jsonl(os.path.join(workdir, "metrics.jsonl")):
    key = (row.pop("step"), row.pop("split"))
    assert key not in jsonl, f"metrics.jsonl repeats {key}"
    jsonl[key] = {k: v for k, v in row.items() if k not in RATES}
  long = {}
  with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
    for row in csv.DictReader(f):
      key = (int(row["step"]), row["split"])
      values = long.setdefault(key, {})
      assert row["name"] not in values, f"metrics.csv repeats {key} {row}"
      if row["name"] not in RATES:
        values[row["name"]] = float(row["value"])
  return jsonl, long


def assert_same_metrics(workdir, reference):
  jsonl, long = metric_rows(workdir)
  expected_jsonl, expected_long = metric_rows(reference)
  expected_keys = {(s, "train") for s in range(1, STEPS + 1)} | {
      (s, "eval") for s in (22, 44, STEPS)
  }
  assert set(expected_jsonl) == set(expected_long) == expected_keys
  assert jsonl == expected_jsonl
  assert long == expected_long


@pytest.fixture(scope="module")
def uninterrupted(digits_dir, cache_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  run_to_completion(workdir, digits_dir, cache_dir)
  return workdir


def test_sigterm_saves_exits_and_resumes_identically(
    digits_dir, cache_dir, uninterrupted, tmp_path
):
  workdir = str(tmp_path / "run")
  code = interrupt(
      workdir, digits_dir, cache_dir, signal.SIGTERM, after_step=15
  )
  assert code == 0  # a clean exit after saving
  saved = sorted(
      int(d)
      for d in os.listdir(os.path.join(workdir, "checkpoints"))
      if d.isdigit()
  )
  assert (
      saved and 15 <= saved[-1] < STEPS
  )  # the off-cadence preemption checkpoint
  run_to_completion(workdir, digits_dir, cache_dir)
  assert_same_state(final_state(workdir), final_state(uninterrupted))
  assert_same_metrics(workdir, uninterrupted)


def test_sigkill_resumes_from_the_last_checkpoint_identically(
    digits_dir, cache_dir, uninterrupted, tmp_path
):
  workdir = str(tmp_path / "run")
  code = interrupt(
      workdir, digits_dir, cache_dir, signal.SIGKILL, after_step=25
  )
  assert code == -signal.SIGKILL
  run_to_completion(workdir, digits_dir, cache_dir)
  assert_same_state(final_state(workdir), final_state(uninterrupted))
  assert_same_metrics(workdir, uninterrupted)


def test_corrupted_newest_checkpoint_falls_back_to_the_previous(
    uninterrupted, tmp_path
):
  workdir = str(tmp_path / "copy")
  shutil.copytree(uninterrupted, workdir)
  newest = os.path.join(workdir, "checkpoints", str(STEPS))
  # Flip bytes in the largest array file: shapes stay valid, values do not.
  files = [os.path.join(d, f) for d, _, fs in os.walk(newest) for f in fs]
  target = max(files, key=os.path.getsize)
  with open(target, "r+b") as f:
    f.seek(os.path.getsize(target) // 2)
    chunk = f.read(64)
    f.seek(os.path.getsize(target) // 2)
    f.write(bytes(b ^ 0xFF for b in chunk))
  with pytest.warns(RuntimeWarning, match=str(STEPS)):
    state = final_state(workdir)
  assert int(state["step"]) == STEPS - EVERY

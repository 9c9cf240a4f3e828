"""The runner's workdir contract and its command-line behaviour.

A workdir holds one run: rerunning another method or model into it is refused
in one line with nothing written; rerunning a finished run is a no-op that keeps
its summary; a resumed run's metrics hold each (step, split) once. Config errors
are one line with exit status 2, raised before anything is compiled. Progress
reports compile time once and keeps it (and evaluations) out of its rates.

A tiny SGD run (ResNet-8 on the bundled digits, one device, 4 steps) is trained
once in this process and copied for each test that changes it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys

import pytest

from cram_jax.data import prepare_digits
from experiments import cli, metrics, train
from experiments.configs import (
    bert_squad,
    digits,
    resnet18_cifar10,
    resnet20_cifar10,
    resnet50_imagenet,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  prepare_digits(str(path))
  return str(path)


def tiny_config(data_dir, method="sgd"):
  config = digits.get_config(method)
  config.data_dir = data_dir
  config.num_train_steps = STEPS
  config.checkpoint_every_steps = config.log_every_steps = 2
  config.num_devices = 1  # conftest gives 8 CPU devices; one compiles faster
  config.progress = False
  return config


@pytest.fixture(scope="module")
def finished(digits_dir, tmp_path_factory):
  """A completed run's workdir; tests copy it before changing anything."""
  workdir = str(tmp_path_factory.mktemp("finished") / "run")
  summary = train.train_and_evaluate(tiny_config(digits_dir), workdir)
  assert summary["status"] == "completed" and summary["step"] == STEPS
  return workdir


def tree_digest(root):
  """sha256 of every file under `root`, by relative path, and every directory."""
  out = {}
  for directory, subdirs, files in os.walk(root):
    for name in subdirs:
      out[os.path.relpath(os.path.join(directory, name), root) + "/"] = "dir"
    for name in files:
      path = os.path.join(directory, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def train_command(workdir, data_dir, method, *overrides):
  return [
      sys.executable,
      os.path.join(ROOT, "experiments", "train.py"),
      "--config",
      os.path.join(ROOT, "experiments", "configs", "digits.py") + f":{method}",
      "--workdir",
      workdir,
      f"--config.data_dir={data_dir}",
      f"--config.num_train_steps={STEPS}",
      "--config.checkpoint_every_steps=2",
      "--config.log_every_steps=2",
      "--config.num_devices=1",
      *overrides,
  ]


def run_command(args):
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run(
      args, env=env, capture_output=True, text=True, timeout=300
  )


# ----------------------------------------------------------------------------
# A workdir holds one run.


def test_another_method_is_refused_in_one_line_and_nothing_changes(
    finished, digits_dir
):
  before = tree_digest(finished)
  done = run_command(train_command(finished, digits_dir, "sam"))
  assert done.returncode == 2, done.stderr[-3000:]
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1, done.stderr
  assert lines[0].startswith(
      f"train.py: error: workdir {finished} holds a different run ("
  )
  assert "name: 'sgd' there, 'sam' here" in lines[0]
  assert "optimizer.wrapper: 'none' there, 'sam' here" in lines[0]
  assert tree_digest(finished) == before


def test_another_model_is_refused_and_nothing_changes(finished, digits_dir):
  before = tree_digest(finished)
  config = tiny_config(digits_dir)
  config.model = "ResNet20"
  with pytest.raises(
      cli.UsageError, match=r"model: 'ResNet8' there, 'ResNet20' here"
  ):
    train.train_and_evaluate(config, finished)
  config = tiny_config(digits_dir, "cram+-multi")
  config.cram.sparsities = (0.5, 0.9)
  with pytest.raises(
      cli.UsageError, match=r"optimizer.wrapper: 'none' there, 'cram' here"
  ):
    train.train_and_evaluate(config, finished)
  assert tree_digest(finished) == before


def test_a_finished_run_reruns_as_a_noop(finished, digits_dir, capsys):
  before = tree_digest(finished)
  with open(os.path.join(finished, "summary.json")) as f:
    stored = json.load(f)
  assert stored["eval"]["examples"] == 360  # the digits test split, an int
  config = tiny_config(digits_dir)
  config.log_every_steps = 1  # may change on resume: still the same run
  config.eval_batch_size = 40
  capsys.readouterr()
  assert train.train_and_evaluate(config, finished) == stored
  out = capsys.readouterr().out.strip().splitlines()
  assert out == [
      f"{finished} holds a finished run (step {STEPS}/{STEPS}; "
      f"{metrics.format_metrics(stored['eval'])}): nothing to do, "
      "summary.json kept"
  ]
  assert tree_digest(finished) == before


def test_workdir_with_checkpoints_but_no_config_is_refused(
    finished, digits_dir, tmp_path
):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir)
  os.remove(os.path.join(workdir, "config.json"))
  before = tree_digest(workdir)
  with pytest.raises(cli.UsageError, match="no config.json"):
    train.train_and_evaluate(tiny_config(digits_dir), workdir)
  assert tree_digest(workdir) == before


def test_check_workdir_compares_values_not_spellings(tmp_path):
  config = digits.get_config("sgd")
  saved = train.config_json(config)
  saved["warmup_epochs"] = 0  # JSON written as an int, read back as one
  saved["cram"]["sparsities"] = list(saved["cram"]["sparsities"])
  saved["num_epochs"] = 7  # may change on resume
  (tmp_path / "config.json").write_text(json.dumps(saved))
  train.check_workdir(config, str(tmp_path))  # the same run
  saved["seed"] = 1
  saved["model_kwargs"] = {"width": 2}
  (tmp_path / "config.json").write_text(json.dumps(saved))
  with pytest.raises(cli.UsageError) as raised:
    train.check_workdir(config, str(tmp_path))
  assert (
      "(model_kwargs.width: 2 there, unset here; seed: 1 there, 0 here)"
      in str(raised.value)
  )


def test_killed_before_the_summary_finishes_without_a_second_row(
    finished, digits_dir, tmp_path
):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir)
  with open(os.path.join(workdir, "summary.json")) as f:
    stored = json.load(f)
  os.remove(os.path.join(workdir, "summary.json"))
  summary = train.train_and_evaluate(tiny_config(digits_dir), workdir)
  assert summary["status"] == "completed" and summary["step"] == STEPS
  # The same params through the same evaluation program.
  assert summary["eval"] == pytest.approx(stored["eval"], rel=1e-6)
  rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  keys = [(r["step"], r["split"]) for r in rows]
  assert sorted(keys) == sorted(set(keys))
  assert keys.count((STEPS, "eval")) == 1


def test_a_longer_run_extends_the_finished_one(finished, digits_dir, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir)
  config = tiny_config(digits_dir)
  config.num_train_steps = STEPS + 2
  summary = train.train_and_evaluate(config, workdir)
  assert summary["status"] == "completed" and summary["step"] == STEPS + 2
  rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [(r["step"], r["split"]) for r in rows if r["split"] == "train"] == [
      (2, "train"),
      (4, "train"),
      (6, "train"),
  ]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["num_train_steps"] == STEPS + 2  # what it holds now
  # Shorter than what is on disk, and no summary says it finished: refused.
  os.remove(os.path.join(workdir, "summary.json"))
  config.num_train_steps = STEPS
  with pytest.raises(cli.ConfigError, match=r"checkpoint at step 6, past"):
    train.train_and_evaluate(config, workdir)


# ----------------------------------------------------------------------------
# Metrics after a kill: each (step, split) once.


def test_metrics_writer_drops_rows_past_the_restored_step_and_torn_lines(
    tmp_path,
):
  workdir = str(tmp_path)
  writer = metrics.MetricsWriter(workdir)
  for step in (1, 2, 3, 4):
    writer.write(step, "train", {"loss": 1.0 / step})
  writer.write(2, "eval", {"accuracy": 0.5, "examples": 360})
  # A kill mid-write tears the last line of each file.
  with open(writer.jsonl_path, "a") as f:
    f.write('{"step": 5, "split": "tr')
  with open(writer.csv_path, "a") as f:
    f.write("5,train,lo")

  resumed = metrics.MetricsWriter(workdir, keep_up_to_step=2)
  assert set(resumed.rows) == {(1, "train"), (2, "train"), (2, "eval")}
  resumed.write(3, "train", {"loss": 0.25})
  assert metrics.read_jsonl(writer.jsonl_path) == [
      {"step": 1, "split": "train", "loss": 1.0},
      {"step": 2, "split": "train", "loss": 0.5},
      {"step": 2, "split": "eval", "accuracy": 0.5, "examples": 360},
      {"step": 3, "split": "train", "loss": 0.25},
  ]
  with open(writer.csv_path) as f:
    assert f.read().splitlines() == [
        "step,split,name,value",
        "1,train,loss,1.0",
        "2,train,loss,0.5",
        "2,eval,accuracy,0.5",
        "2,eval,examples,360",
        "3,train,loss,0.25",
    ]
  # A fresh start (nothing restored) keeps no rows, only the CSV header.
  metrics.MetricsWriter(workdir, keep_up_to_step=0)
  assert metrics.read_jsonl(writer.jsonl_path) == []
  with open(writer.csv_path) as f:
    assert f.read().splitlines() == ["step,split,name,value"]


# ----------------------------------------------------------------------------
# Config errors: one line, exit 2, before anything is compiled.


def test_config_error_is_one_line_with_exit_code_2(digits_dir, tmp_path):
  workdir = str(tmp_path / "run")
  done = run_command(
      train_command(workdir, digits_dir, "sgd", "--config.num_epochs=-3")
  )
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [
      "train.py: error: config.num_epochs must be a positive int, got -3"
  ]
  assert not os.path.exists(workdir)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--config.num_epoch=3"],
            "train.py: error: --config.num_epoch: the config has no such field "
            "(did you mean 'num_epochs'?)",
        ),
        (
            ["--config.cram.rhoo=0.1"],
            "train.py: error: --config.cram.rhoo: the config has no such field "
            "(did you mean 'rho'?)",
        ),
        (
            ["--config", "experiments/configs/nope.py"],
            "train.py: error: --config: no such file: experiments/configs/nope.py",
        ),
    ],
)
def test_flag_mistakes_are_one_line_with_exit_code_2(args, message, tmp_path):
  command = [
      sys.executable,
      os.path.join(ROOT, "experiments", "train.py"),
      "--config",
      "experiments/configs/digits.py:sgd",
      "--workdir",
      str(tmp_path / "run"),
      *args,
  ]
  env = dict(os.environ, PYTHONPATH=ROOT)
  done = subprocess.run(
      command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [message]
  assert not os.path.exists(tmp_path / "run")


def config_with(**fields):
  config = digits.get_config("cram+-multi")
  config.unlock()
  for name, value in fields.items():
    target = config
    *parents, leaf = name.split("__")
    for parent in parents:
      target = target[parent]
    # Bypass ml_collections' type casting: a bad type must reach the check.
    target._fields[leaf] = value  # pylint: disable=protected-access
  return config


@pytest.mark.parametrize(
    "fields, error, message",
    [
        ({"num_epochs": -3}, ValueError, "config.num_epochs must be a positive int, got -3"),
        ({"num_epochs": 0}, ValueError, "config.num_epochs must be a positive int, got 0"),
        ({"num_epochs": 2.5}, TypeError, "config.num_epochs must be a positive int, got 2.5"),
        ({"num_train_steps": -1}, ValueError, "config.num_train_steps must be a non-negative int, got -1"),
        ({"batch_size": 12.5}, TypeError, "config.batch_size must be a positive int, got 12.5"),
        ({"batch_size": 0}, ValueError, "config.batch_size must be a positive int, got 0"),
        ({"eval_batch_size": 0}, ValueError, "config.eval_batch_size must be a positive int, got 0"),
        ({"eval_batch_size": "64"}, TypeError, "config.eval_batch_size must be a positive int, got '64'"),
        ({"log_every_steps": 0}, ValueError, "config.log_every_steps must be a positive int, got 0"),
        ({"checkpoint_every_steps": -5}, ValueError, "config.checkpoint_every_steps must be a positive int, got -5"),
        ({"keep_checkpoints": 0}, ValueError, "config.keep_checkpoints must be a positive int, got 0"),
        ({"prefetch": 0}, ValueError, "config.prefetch must be a positive int, got 0"),
        ({"optimizer__learning_rate": 0.0}, ValueError, "config.optimizer.learning_rate must be a number in (0, inf), got 0.0"),
        ({"optimizer__learning_rate": float("inf")}, ValueError, "config.optimizer.learning_rate must be a number in (0, inf), got inf"),
        ({"optimizer__learning_rate": "0.1"}, TypeError, "config.optimizer.learning_rate must be a number in (0, inf), got '0.1'"),
        ({"optimizer__weight_decay": -1e-4}, ValueError, "config.optimizer.weight_decay must be a number in [0, inf), got -0.0001"),
        ({"optimizer__momentum": 1.0}, ValueError, "config.optimizer.momentum must be a number in [0, 1), got 1.0"),
        ({"optimizer__base": "adamw", "optimizer__b2": 1.5}, ValueError, "config.optimizer.b2 must be a number in [0, 1), got 1.5"),
        ({"optimizer__base": "adamw", "optimizer__eps": -1.0}, ValueError, "config.optimizer.eps must be a number in [0, inf), got -1.0"),
        ({"cram__rho": -0.1}, ValueError, "config.cram.rho must be a number in [0, inf), got -0.1"),
        ({"optimizer__wrapper": "sam", "sam__rho": float("nan")}, ValueError, "config.sam.rho must be a number in [0, inf), got nan"),
        ({"cram__plus": 1}, TypeError, "config.cram.plus must be True or False, got 1"),
        ({"cram__compressor": "topk"}, ValueError, "config.cram.compressor must be one of ('global', 'layerwise', 'nm', 'quantize'), got 'topk'"),
        ({"cram__compressor": "quantize", "cram__bits": (8, 1)}, ValueError, "config.cram.bits[1] must be an int in [2, 16], got 1"),
        ({"warmup_epochs": 31.0}, ValueError, "config.warmup_epochs=31.0 is longer than config.num_epochs=30"),
        ({"parallel": "pjit"}, ValueError, "config.parallel must be one of ('jit', 'pmap'), got 'pjit'"),
        ({"num_devices": -1}, ValueError, "config.num_devices must be a non-negative int, got -1"),
        ({"optimizer__wrapper": "lookahead"}, ValueError, "config.optimizer.wrapper must be one of ('none', 'sam', 'cram', 'gmp', 'acdc'), got 'lookahead'"),
        ({"optimizer__base": "lamb"}, ValueError, "config.optimizer.base must be one of ('sgd', 'adamw'), got 'lamb'"),
        ({"cram__sparsities": (0.5, 1.0)}, ValueError, "config.cram.sparsities[1] must be a sparsity in [0, 1), got 1.0"),
        ({"cram__sparsities": (-0.1,)}, ValueError, "config.cram.sparsities[0] must be a sparsity in [0, 1), got -0.1"),
        ({"cram__sparsities": ()}, ValueError, "config.cram.sparsities must be a non-empty sequence of sparsities in [0, 1), got ()"),
        ({"cram__compressor": "layerwise", "cram__sparsities": (1.5,)}, ValueError, "config.cram.sparsities[0] must be a sparsity in [0, 1), got 1.5"),
        ({"cram__compressor": "nm", "cram__nm_patterns": ((4, 2),)}, ValueError, "config.cram.nm_patterns[0] must be a pair of ints (n, m) with 1 <= n <= m, got (4, 2)"),
        ({"cram__local_perturbation": True}, ValueError, "config.cram.local_perturbation=True needs config.optimizer.wrapper='cram' and config.parallel='pmap', got wrapper='cram', parallel='jit'"),
        ({"optimizer__wrapper": "sam", "parallel": "pmap", "cram__local_perturbation": True}, ValueError, "config.cram.local_perturbation=True needs config.optimizer.wrapper='cram' and config.parallel='pmap', got wrapper='sam', parallel='pmap'"),
        ({"optimizer": "sgd"}, ValueError, "config.optimizer.base is missing"),
        ({"model": "ResNet7"}, ValueError, "config.model must name a model of cram_jax.models, got 'ResNet7'"),
        ({"task": "detection"}, ValueError, "config.task must be one of ('squad', 'vision'), got 'detection'"),
        ({"dtype": "float16"}, ValueError, "config.dtype must be one of ('bfloat16', 'float32'), got 'float16'"),
        ({"progress": "yes"}, TypeError, "config.progress must be True or False, got 'yes'"),
    ],
)  # fmt: skip
def test_validate_config_names_the_field_and_value(fields, error, message):
  with pytest.raises(error) as raised:
    train.validate_config(config_with(**fields))
  assert isinstance(raised.value, cli.ConfigError)
  assert str(raised.value) == message


@pytest.mark.parametrize(
    "module, methods",
    [
        (digits, ("sgd", "sam", "cram+-multi")),
        (resnet20_cifar10, resnet20_cifar10.METHODS),
        (resnet18_cifar10, ("cram+-k95", "sgd")),
        (resnet50_imagenet, ("cram+-multi", "cram+-nm", "sgd")),
        (bert_squad, ("adamw", "cram+-multi")),
    ],
)
def test_every_shipped_config_is_valid(module, methods):
  for method in methods:
    train.validate_config(module.get_config(method))


def test_train_and_evaluate_validates_before_touching_the_workdir(tmp_path):
  config = digits.get_config("sgd")
  config.log_every_steps = 0
  with pytest.raises(cli.ConfigError, match="log_every_steps"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"batch_size": 4000},
            r"config.dataset='digits' \(split 'train', data_dir .*\): "
            r"batch_size=4000 is larger than the 1437 training examples",
        ),
        (
            {"train_split": "bogus"},
            r"config.dataset='digits' \(split 'bogus', .*split='bogus' is "
            "not valid",
        ),
        (
            {"eval_split": "validation"},
            r"config.dataset='digits' \(split 'validation', .*"
            "split='validation' is not valid",
        ),
        (
            {"num_devices": 8, "eval_batch_size": 100},
            "config.eval_batch_size=100: 100 per process is not a multiple "
            "of the 8 local devices",
        ),
        (
            {"num_devices": 9},
            "config.num_devices=9 but only 8 devices exist",
        ),
    ],
)
def test_config_errors_found_when_building_touch_nothing(
    fields, message, digits_dir, tmp_path
):
  config = tiny_config(digits_dir)
  for name, value in fields.items():
    config[name] = value
  with pytest.raises(cli.ConfigError, match=message):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


# ----------------------------------------------------------------------------
# Progress.


class FakeClock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_progress_reports_compile_once_and_keeps_it_out_of_the_rates():
  clock, stream = FakeClock(), io.StringIO()
  progress = metrics.Progress(100, 8, start_step=0, stream=stream, clock=clock)
  clock.now += 12.0  # step 1 compiles
  progress.compiled("train step", 12.0, 1)
  assert progress.update(1, {"loss": 2.5}) == {}  # nothing timed yet
  clock.now += 4.0  # steps 2..11: 2 s of training, 2 s of evaluation
  progress.exclude(2.0)
  rates = progress.update(11, {"loss": 1.25, "examples": 360})
  assert rates == {"steps_per_second": 5.0, "examples_per_second": 40.0}
  lines = stream.getvalue().splitlines()
  assert lines[0] == "compiled train step in 12.0 s"
  assert lines[1] == (
      "step 1/100 [  1%] -- step/s elapsed 0:00:12 eta ? | loss 2.5000"
  )
  # ETA: 4 s for the 10 steps since compilation, 89 steps to go.
  assert lines[2] == (
      "step 11/100 [ 11%] 5.00 step/s 40 ex/s elapsed 0:00:16 eta 0:00:36 "
      "| loss 1.2500 examples 360"
  )


def test_format_helpers():
  assert metrics.format_metrics({"accuracy": 0.5, "examples": 360}) == (
      "accuracy 0.5000 examples 360"
  )
  assert metrics.format_duration(3725.4) == "1:02:05"
  assert metrics.format_duration(2 * 86400 + 5) == "2 days, 0:00:05"
  assert metrics.format_duration(None) == "?"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workdir", "{missing}"], "no such directory"),
        (["--workdir", "{empty}"], "no config.json there"),
        (
            ["--workdir", "{empty}", "--sparsities", "1.5"],
            "1.5 is not a sparsity",
        ),
        (["--workdir", "{empty}", "--bn-batches", "0"], "--bn-batches must be"),
    ],
)
def test_oneshot_mistakes_are_one_line_with_exit_code_2(
    args, message, tmp_path, capsys
):
  from experiments import oneshot  # pylint: disable=import-outside-toplevel

  (tmp_path / "empty").mkdir()
  paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty"}
  argv = [a.format(**paths) for a in args] + ["--out", str(tmp_path / "out")]
  with pytest.raises(SystemExit) as exit_info:
    oneshot.main(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  assert err.startswith("oneshot.py: error: ") and message in err
  assert not (tmp_path / "out").exists()

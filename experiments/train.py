r"""Train a model from a config, data-parallel, with preemption-safe checkpoints.

  python experiments/train.py \
      --config experiments/configs/resnet20_cifar10.py:cram+-multi \
      --workdir runs/rn20_cram [--config.num_epochs=10 --config.parallel=pmap ...]
      [--verbosity=0: show absl/orbax INFO logs]

Everything a run needs to continue lives in `workdir/checkpoints` (params,
optimizer state, BatchNorm statistics, RNG, data-iterator position): run the same
command again after a preemption and it resumes exactly where it stopped. Metrics
go to `workdir/metrics.jsonl` and `workdir/metrics.csv`, a summary to
`workdir/summary.json`, the config to `workdir/config.json`.

A workdir holds one run. Rerunning into it resumes that run only if every field
that defines the run is the same (see `MUTABLE_FIELDS` for those that may change:
length, cadences, paths, parallelism); anything else is refused with one line
before a file is touched. Rerunning a finished run changes nothing. A config
value the runner cannot use is reported in one line (exit status 2) before
anything is compiled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

if __package__ in (None, ""):  # run as a script: make `experiments` importable
  sys.path.insert(
      0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  )

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cram_jax import data as data_lib
from cram_jax import models
from experiments import cli, optimizers, tasks
from experiments import parallel as parallel_lib
from experiments.checkpointing import Checkpointer
from experiments.metrics import (
    MetricsWriter,
    Progress,
    format_duration,
    format_metrics,
)

State = dict[str, Any]


# ------------------------------------------------------------------ config checks


def _value(config: ml_collections.ConfigDict, name: str) -> Any:
  value = config
  for part in name.split("."):
    if part not in value:
      raise cli.ConfigError(f"config.{name} is missing")
    value = value[part]
  return value


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_int(config, name: str, minimum: int) -> None:
  value = _value(config, name)
  what = {0: "a non-negative int", 1: "a positive int"}.get(
      minimum, f"an int >= {minimum}"
  )
  if not _is_int(value):
    raise cli.ConfigTypeError(f"config.{name} must be {what}, got {value!r}")
  if value < minimum:
    raise cli.ConfigError(f"config.{name} must be {what}, got {value!r}")


def _check_number(
    config,
    name: str,
    *,
    low: float,
    high: float = math.inf,
    open_low=False,
    open_high=True,
) -> None:
  """A finite real number in [low, high) (ends open or closed as asked)."""
  value = _value(config, name)
  interval = (
      f"{'(' if open_low else '['}{low:g}, "
      f"{'inf' if high == math.inf else f'{high:g}'}{')' if open_high else ']'}"
  )
  if not _is_number(value):
    raise cli.ConfigTypeError(
        f"config.{name} must be a number in {interval}, got {value!r}"
    )
  inside = (
      math.isfinite(value)
      and (value > low if open_low else value >= low)
      and (value < high if open_high else value <= high)
  )
  if not inside:
    raise cli.ConfigError(
        f"config.{name} must be a number in {interval}, got {value!r}"
    )


def _check_choice(config, name: str, choices: Sequence[Any]) -> None:
  value = _value(config, name)
  if value not in choices:
    raise cli.ConfigError(
        f"config.{name} must be one of {tuple(choices)}, got {value!r}"
    )


def _check_bool(config, name: str) -> None:
  value = _value(config, name)
  if not isinstance(value, bool):
    raise cli.ConfigTypeError(
        f"config.{name} must be True or False, got {value!r}"
    )


def _check_sparsity(name: str, value: Any) -> None:
  if not _is_number(value):
    raise cli.ConfigTypeError(
        f"config.{name} must be a sparsity in [0, 1), got {value!r}"
    )
  if not 0 <= value < 1:
    raise cli.ConfigError(
        f"config.{name} must be a sparsity in [0, 1), got {value!r}"
    )


def _check_sequence(config, name: str, what: str) -> Sequence[Any]:
  value = _value(config, name)
  if isinstance(value, str) or not isinstance(value, Sequence) or not value:
    raise cli.ConfigError(
        f"config.{name} must be a non-empty sequence of {what}, got {value!r}"
    )
  return value


def _check_cram(config) -> None:
  _check_number(config, "cram.rho", low=0.0)
  _check_bool(config, "cram.plus")
  _check_choice(config, "cram.compressor", optimizers.COMPRESSORS)
  kind = config.cram.compressor
  if kind in ("global", "layerwise"):
    levels = _check_sequence(config, "cram.sparsities", "sparsities in [0, 1)")
    for i, level in enumerate(levels):
      _check_sparsity(f"cram.sparsities[{i}]", level)
  elif kind == "nm":
    patterns = _check_sequence(config, "cram.nm_patterns", "(n, m) pairs")
    for i, pattern in enumerate(patterns):
      if not (
          isinstance(pattern, Sequence)
          and len(pattern) == 2
          and all(_is_int(v) for v in pattern)
          and 1 <= pattern[0] <= pattern[1]
      ):
        raise cli.ConfigError(
            f"config.cram.nm_patterns[{i}] must be a pair of ints (n, m) with "
            f"1 <= n <= m, got {pattern!r}"
        )
  else:
    for i, bits in enumerate(_check_sequence(config, "cram.bits", "ints")):
      if not _is_int(bits) or not 2 <= bits <= 16:
        raise cli.ConfigError(
            f"config.cram.bits[{i}] must be an int in [2, 16], got {bits!r}"
        )


def _check_gmp(config) -> None:
  _check_choice(config, "gmp.compressor", optimizers.PRUNING_COMPRESSORS)
  for name in ("gmp.initial_sparsity", "gmp.final_sparsity"):
    _check_sparsity(name, _value(config, name))
  g = config.gmp
  if g.initial_sparsity > g.final_sparsity:
    raise cli.ConfigError(
        f"config.gmp.initial_sparsity={g.initial_sparsity!r} is above "
        f"config.gmp.final_sparsity={g.final_sparsity!r} (pruned weights never "
        "come back)"
    )
  _check_number(config, "gmp.begin_epoch", low=0.0)
  _check_number(config, "gmp.end_epoch", low=0.0, open_low=True)
  _check_number(config, "gmp.frequency_epochs", low=0.0, open_low=True)
  _check_number(config, "gmp.power", low=0.0, open_low=True)
  if not g.begin_epoch < g.end_epoch <= config.num_epochs:
    raise cli.ConfigError(
        "config.gmp needs begin_epoch < end_epoch <= num_epochs, got "
        f"begin_epoch={g.begin_epoch!r}, end_epoch={g.end_epoch!r}, "
        f"num_epochs={config.num_epochs!r}"
    )


def _check_acdc(config) -> None:
  _check_choice(config, "acdc.compressor", optimizers.PRUNING_COMPRESSORS)
  _check_sparsity("acdc.sparsity", _value(config, "acdc.sparsity"))
  _check_number(config, "acdc.warmup_epochs", low=0.0)
  _check_number(config, "acdc.phase_epochs", low=0.0, open_low=True)
  _check_number(config, "acdc.final_epochs", low=0.0, open_low=True)
  _check_bool(config, "acdc.reset_momentum")
  a = config.acdc
  if a.warmup_epochs + a.final_epochs > config.num_epochs:
    raise cli.ConfigError(
        f"config.acdc.warmup_epochs={a.warmup_epochs!r} plus "
        f"final_epochs={a.final_epochs!r} exceed "
        f"config.num_epochs={config.num_epochs!r}"
    )


def _check_distill(config) -> None:
  if "distill" not in config:  # a config saved before the field existed
    return
  path = _value(config, "distill.teacher_checkpoint")
  if not isinstance(path, str):
    raise cli.ConfigTypeError(
        f"config.distill.teacher_checkpoint must be a path or '', got {path!r}"
    )
  if not path:
    return
  if config.task != "squad":
    raise cli.ConfigError(
        "config.distill.teacher_checkpoint is for task 'squad' (BERT), got "
        f"config.task={config.task!r}"
    )
  _check_number(config, "distill.weight", low=0.0, high=1.0, open_high=False)
  _check_number(config, "distill.temperature", low=0.0, open_low=True)
  try:
    tasks.check_teacher_checkpoint(path)
  except (FileNotFoundError, ValueError, TypeError) as e:
    raise cli.ConfigError(str(e)) from None


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every field the runner reads, before anything is built or compiled.

  Raises:
    cli.ConfigError: (a ValueError) naming the field and its value, e.g.
      ``config.num_epochs must be a positive int, got -3``;
      cli.ConfigTypeError (also a TypeError) for a value of the wrong type.
  """
  _check_choice(config, "task", sorted(tasks.TASKS))
  if config.task == "vision":
    model = _value(config, "model")
    if not isinstance(model, str) or not callable(getattr(models, model, None)):
      raise cli.ConfigError(
          f"config.model must name a model of cram_jax.models, got {model!r}"
      )
    _check_int(config, "num_classes", 1)
  else:
    size = _value(config, "bert.size")
    if not isinstance(size, str) or not callable(
        getattr(models.BertConfig, size, None)
    ):
      raise cli.ConfigError(
          f"config.bert.size must name a models.BertConfig preset "
          f"('tiny', 'base', ...), got {size!r}"
      )
  _check_choice(config, "dtype", sorted(tasks.DTYPES))
  for name in ("dataset", "train_split", "eval_split"):
    value = _value(config, name)
    if not isinstance(value, str) or not value:
      raise cli.ConfigError(
          f"config.{name} must be a non-empty string, got {value!r}"
      )

  # The method and its hyperparameters (experiments/optimizers.py).
  _check_choice(config, "optimizer.base", optimizers.BASES)
  _check_choice(config, "optimizer.wrapper", optimizers.WRAPPERS)
  _check_number(config, "optimizer.learning_rate", low=0.0, open_low=True)
  _check_number(config, "optimizer.weight_decay", low=0.0)
  if config.optimizer.base == "sgd":
    _check_number(config, "optimizer.momentum", low=0.0, high=1.0)
  else:
    _check_number(config, "optimizer.b1", low=0.0, high=1.0)
    _check_number(config, "optimizer.b2", low=0.0, high=1.0)
    _check_number(config, "optimizer.eps", low=0.0)
  wrapper = config.optimizer.wrapper
  if wrapper == "sam":
    _check_number(config, "sam.rho", low=0.0)
  if wrapper == "cram":
    _check_cram(config)
  if wrapper == "gmp":
    _check_gmp(config)
  if wrapper == "acdc":
    _check_acdc(config)
  _check_bool(config, "cram.local_perturbation")
  if config.cram.local_perturbation and (
      wrapper != "cram" or config.parallel != "pmap"
  ):
    raise cli.ConfigError(
        "config.cram.local_perturbation=True needs "
        "config.optimizer.wrapper='cram' and config.parallel='pmap', got "
        f"wrapper={wrapper!r}, parallel={config.parallel!r}"
    )

  _check_distill(config)

  # Length and batches.
  _check_int(config, "num_epochs", 1)
  _check_int(config, "num_train_steps", 0)
  _check_number(config, "warmup_epochs", low=0.0)
  if config.warmup_epochs > config.num_epochs:
    raise cli.ConfigError(
        f"config.warmup_epochs={config.warmup_epochs!r} is longer than "
        f"config.num_epochs={config.num_epochs!r}"
    )
  _check_bool(config, "schedule_per_epoch")
  _check_int(config, "batch_size", 1)
  _check_int(config, "eval_batch_size", 1)
  _check_int(config, "seed", 0)

  # How it runs.
  _check_choice(config, "parallel", ("jit", "pmap"))
  _check_int(config, "num_devices", 0)
  _check_int(config, "checkpoint_every_steps", 1)
  _check_int(config, "keep_checkpoints", 1)
  _check_int(config, "log_every_steps", 1)
  _check_int(config, "prefetch", 1)
  _check_int(config, "data_threads", 0)
  _check_bool(config, "progress")


def method_label(config: ml_collections.ConfigDict) -> str:
  """The method's preset name, else a description from its fields."""
  if config.name:
    return config.name
  opt = config.optimizer
  if opt.wrapper == "none":
    return opt.base
  if opt.wrapper == "sam":
    return f"sam({opt.base})"
  if opt.wrapper == "gmp":
    return (
        f"gmp-{config.gmp.compressor}-{config.gmp.final_sparsity:g}({opt.base})"
    )
  if opt.wrapper == "acdc":
    return f"acdc-{config.acdc.compressor}-{config.acdc.sparsity:g}({opt.base})"
  return f"cram{'+' if config.cram.plus else ''}-{config.cram.compressor}({opt.base})"


# ------------------------------------------------------------------ the workdir

# Config fields that may differ when a workdir's run is resumed: its length (the
# learning-rate schedule follows the new length from the resumed step on), the
# logging and checkpoint cadence, paths, and how the work is spread over devices
# and hosts (which does not change the numbers). Every other field defines the
# run: resuming with another value is refused.
MUTABLE_FIELDS = (
    "num_epochs",
    "num_train_steps",
    "log_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "eval_batch_size",
    "progress",
    "prefetch",
    "data_threads",
    "data_dir",
    "init_checkpoint",
    "parallel",
    "num_devices",
    "distributed",
    "oneshot",
)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def run_identity(config_json: dict[str, Any]) -> dict[str, Any]:
  """The fields of a config (as its JSON dict) that define the run, flattened."""
  return {
      k: v
      for k, v in _flatten(config_json).items()
      if k.split(".")[0] not in MUTABLE_FIELDS
  }


def config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a workdir that holds another run; reads files, writes nothing.

  Raises:
    cli.UsageError: if `workdir` is not a directory, has checkpoints but no
      `config.json`, or its `config.json` differs from `config` in a field that
      defines the run (any field not in `MUTABLE_FIELDS`).
  """
  if not os.path.exists(workdir):
    return
  if not os.path.isdir(workdir):
    raise cli.UsageError(f"--workdir {workdir} exists and is not a directory")
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    checkpoints = os.path.join(workdir, "checkpoints")
    if os.path.isdir(checkpoints) and any(
        name.isdigit() for name in os.listdir(checkpoints)
    ):
      raise cli.UsageError(
          f"workdir {workdir} has checkpoints but no config.json, so which run "
          "it holds is unknown; nothing was changed: use another --workdir"
      )
    return
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise cli.UsageError(
        f"workdir {workdir}: cannot read config.json ({e}); nothing was "
        "changed: use another --workdir"
    ) from e
  there, here = run_identity(saved), run_identity(config_json(config))

  unset = object()

  def shown(value):
    return "unset" if value is unset else repr(value)

  # `==`, so that an int and an equal float (0 and 0.0) are the same value.
  diffs = [
      f"{key}: {shown(there.get(key, unset))} there, "
      f"{shown(here.get(key, unset))} here"
      for key in sorted(set(there) | set(here))
      if there.get(key, unset) != here.get(key, unset)
  ]
  if diffs:
    more = f" and {len(diffs) - 4} more" if len(diffs) > 4 else ""
    raise cli.UsageError(
        f"workdir {workdir} holds a different run ({'; '.join(diffs[:4])}"
        f"{more}); nothing was changed: use another --workdir"
    )


def finished_summary(workdir: str, total_steps: int) -> dict[str, Any] | None:
  """The workdir's summary if its run completed at least `total_steps` steps."""
  try:
    with open(os.path.join(workdir, "summary.json")) as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return None
  if (
      isinstance(summary, dict)
      and summary.get("status") == "completed"
      and _is_int(summary.get("step"))
      and summary["step"] >= total_steps
  ):
    return summary
  return None


def _write_json_atomically(path: str, payload: str) -> None:
  """Writes `payload` to `path` via a temporary file and a rename: never torn."""
  temporary = f"{path}.tmp"
  with open(temporary, "w") as f:
    f.write(payload)
    f.flush()
    os.fsync(f.fileno())
  os.replace(temporary, path)


# ------------------------------------------------------------------ set-up


@dataclasses.dataclass
class Run:
  """Everything built from a config, shared by training and one-shot evaluation."""

  config: ml_collections.ConfigDict
  parallel: Any
  task: tasks.Task
  steps_per_epoch: int
  total_steps: int
  process_batch_size: int
  tx: optax.GradientTransformation


def train_data_kwargs(
    config: ml_collections.ConfigDict, batch_size: int
) -> dict[str, Any]:
  return dict(
      batch_size=batch_size,
      train=True,
      seed=config.seed,
      data_dir=config.data_dir,
      shard_index=jax.process_index(),
      shard_count=jax.process_count(),
      **dict(config.data_options),
  )


def build(config: ml_collections.ConfigDict) -> Run:
  parallel = parallel_lib.make_parallel(config)
  task = tasks.make_task(config, parallel.axis_name)
  local_devices = max(parallel.num_replicas // jax.process_count(), 1)
  for name in ("batch_size", "eval_batch_size"):
    size = config[name]
    if size % jax.process_count():
      raise cli.ConfigError(
          f"config.{name}={size} does not divide over "
          f"{jax.process_count()} processes"
      )
    if (size // jax.process_count()) % local_devices:
      raise cli.ConfigError(
          f"config.{name}={size}: {size // jax.process_count()} per process "
          f"is not a multiple of the {local_devices} local devices"
      )
  process_batch = config.batch_size // jax.process_count()
  split = config.train_split
  try:
    one_epoch = data_lib.make_dataset(
        config.dataset,
        split,
        num_epochs=1,
        **train_data_kwargs(config, process_batch),
    )
    split = config.eval_split  # opened now, not at the end of the first epoch
    data_lib.open_source(config.dataset, split, data_dir=config.data_dir)
  except (ValueError, FileNotFoundError) as e:
    # cram_jax.data checks its arguments (batch size against the split, data
    # options, the dataset's presence): here they come from the config.
    raise cli.ConfigError(
        f"config.dataset={config.dataset!r} (split {split!r}, "
        f"data_dir {config.data_dir!r}): {e}"
    ) from e
  steps_per_epoch = len(one_epoch)
  total = config.num_train_steps or config.num_epochs * steps_per_epoch
  tx = optimizers.make_optimizer(
      config,
      steps_per_epoch,
      select=task.select,
      batch_axis_name=parallel.axis_name,
  )
  return Run(
      config, parallel, task, steps_per_epoch, int(total), process_batch, tx
  )


def fresh_state(run: Run, sample_batch: dict[str, Any]) -> State:
  """A new training state (pure: jit it, or `jax.eval_shape` it for the structure)."""
  config = run.config
  variables = run.task.init(jax.random.key(config.seed), sample_batch)
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": variables["params"],
      "batch_stats": variables.get("batch_stats", {}),
      "opt_state": run.tx.init(variables["params"]),
      "rng": jax.random.key_data(jax.random.key(config.seed + 1)),
  }


def init_state(run: Run, sample_batch: dict[str, np.ndarray]) -> State:
  """Fresh state on the host: params (maybe pretrained), BN statistics, optimiser state."""
  # One compilation, instead of one per optimiser-state leaf.
  state = jax.jit(lambda b: fresh_state(run, b))(sample_batch)
  if run.config.init_checkpoint:
    state["params"] = tasks.load_pretrained(run.config, state["params"])
    state["opt_state"] = jax.jit(run.tx.init)(state["params"])
  return state


def state_structure(run: Run, sample_batch: dict[str, np.ndarray]) -> State:
  """Shapes and dtypes of the state, without computing (or compiling) anything."""
  return jax.eval_shape(lambda b: fresh_state(run, b), sample_batch)


def device_keys(
    task: tasks.Task, batch: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
  """The batch entries the compiled steps read (no host-only decoding keys)."""
  return {k: v for k, v in batch.items() if k not in tasks.HOST_EVAL_KEYS}


# ------------------------------------------------------------------ steps


def make_train_step(run: Run):
  """One pure train step for every method.

  SGD and AdamW ignore `grad_fn`; SAM and CrAM share the contract of
  `optax.contrib.sam(opaque_mode=True)`: the clean gradient averaged over
  replicas by the caller, `grad_fn(params, i)` averaged by the optimizer.
  With m-sharpness (`config.cram.local_perturbation`) the clean gradient stays local:
  CrAM perturbs with it and averages it itself.
  """
  task, tx, axis = run.task, run.tx, run.parallel.axis_name
  average_clean = axis is not None and not run.config.cram.local_perturbation

  def step(state: State, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(
        jax.random.wrap_key_data(state["rng"]), state["step"]
    )
    if axis is not None:  # own dropout masks per replica
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis))

    def loss_fn(params, batch_stats):
      return task.loss(params, batch_stats, batch, rng)

    (_, (batch_stats, metrics)), grads = jax.value_and_grad(
        loss_fn, has_aux=True
    )(state["params"], state["batch_stats"])
    if average_clean:
      grads = jax.lax.pmean(grads, axis)

    def grad_fn(params, _):
      # Same batch, train mode; this pass's BatchNorm statistics are dropped.
      return jax.grad(loss_fn, has_aux=True)(params, state["batch_stats"])[0]

    updates, opt_state = tx.update(
        grads, state["opt_state"], state["params"], grad_fn=grad_fn
    )
    new_state = {
        "step": state["step"] + 1,
        "params": optax.apply_updates(state["params"], updates),
        "batch_stats": batch_stats,
        "opt_state": opt_state,
        "rng": state["rng"],
    }
    return new_state, parallel_lib.mean_over_replicas(metrics, axis)

  return step


def evaluate(
    run: Run, eval_fn, variables: Any, *, split: str | None = None
) -> dict[str, float]:
  """Runs the task's evaluation over `split` (default `config.eval_split`)."""
  config = run.config
  batch_size = config.eval_batch_size // jax.process_count()
  iterator = data_lib.make_pipeline(
      config.dataset,
      split or config.eval_split,
      batch_size=batch_size,
      train=False,
      data_dir=config.data_dir,
      shard_index=jax.process_index(),
      shard_count=jax.process_count(),
      **dict(config.data_options),
  )
  outputs = []
  for batch in iterator:
    host = {k: batch[k] for k in tasks.HOST_EVAL_KEYS if k in batch}
    out = run.parallel.fetch(
        eval_fn(
            variables, run.parallel.place_batch(device_keys(run.task, batch))
        )
    )
    outputs.append({**jax.tree.map(np.asarray, out), **host})
  return run.task.summarise(outputs)


def variables_of(state: State) -> dict[str, Any]:
  out = {"params": state["params"]}
  if state["batch_stats"]:
    out["batch_stats"] = state["batch_stats"]
  return out


# ------------------------------------------------------------------ the loop


def _time_first_call(fn):
  """Wraps a compiled function; its first call blocks and records its seconds
  (compilation plus one execution) in `.seconds`."""

  def timed(*args):
    if timed.seconds is not None:
      return fn(*args)
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    timed.seconds = time.perf_counter() - start
    return out

  timed.seconds = None
  return timed


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the final summary.

  A finished run is not touched: its stored summary is returned.

  Raises:
    cli.ConfigError: a config value the runner cannot use (before anything
      is compiled).
    cli.UsageError: `workdir` holds a different run (nothing is written).
  """
  validate_config(config)
  check_workdir(config, workdir)
  parallel_lib.initialize_distributed(config)
  run = build(config)
  primary = jax.process_index() == 0
  finished = finished_summary(workdir, run.total_steps)
  if finished is not None:
    if primary:
      print(
          f"{workdir} holds a finished run (step {finished['step']}/"
          f"{run.total_steps}; {format_metrics(finished.get('eval', {}))}): "
          "nothing to do, summary.json kept",
          flush=True,
      )
    return finished
  os.makedirs(workdir, exist_ok=True)

  kwargs = train_data_kwargs(config, run.process_batch_size)
  train_iter = data_lib.make_pipeline(
      config.dataset,
      config.train_split,
      num_threads=config.data_threads,
      **kwargs,
  )
  sample = device_keys(
      run.task,
      data_lib.make_dataset(
          config.dataset, config.train_split, num_epochs=1, **kwargs
      )[0],
  )
  checkpointer = Checkpointer(
      os.path.join(workdir, "checkpoints"),
      every_steps=config.checkpoint_every_steps,
      keep=config.keep_checkpoints,
  )
  try:
    restored = checkpointer.restore_latest(state_structure(run, sample))
  except BaseException:
    checkpointer.close()
    raise
  start_step = 0
  if restored is not None:
    start_step, state, extra = restored
    if start_step > run.total_steps:
      checkpointer.close()
      raise cli.ConfigError(
          f"workdir {workdir} holds a checkpoint at step {start_step}, past the "
          f"{run.total_steps} steps this config asks for; raise "
          "config.num_epochs or config.num_train_steps"
      )
    train_iter.set_state(extra["data"])
    logging.info("resumed from step %d", start_step)
  else:
    state = init_state(run, sample)
  if primary:
    # Now that the run is known to be this one: record it (with the values of the
    # fields that may change on resume, as this session uses them).
    _write_json_atomically(
        os.path.join(workdir, "config.json"),
        config.to_json_best_effort(indent=2),
    )
  state = run.parallel.place_state(state)

  step_fn = _time_first_call(run.parallel.compile_step(make_train_step(run)))
  eval_fn = _time_first_call(run.parallel.compile_eval(run.task.eval_outputs))
  # Rows past the restored step were written after its checkpoint (a kill, or a
  # corrupted newer checkpoint): they are dropped, so each (step, split) is once.
  writer = MetricsWriter(workdir, enabled=primary, keep_up_to_step=start_step)
  progress = Progress(
      run.total_steps,
      config.batch_size,
      start_step=start_step,
      enabled=primary and config.progress,
  )
  progress.message(
      f"{method_label(config)}: {run.total_steps} steps "
      f"({run.steps_per_epoch}/epoch) on {run.parallel.num_replicas} device(s), "
      f"{type(run.parallel).__name__}"
      + (f", resumed at step {start_step}" if start_step else "")
  )
  prefetcher = parallel_lib.DevicePrefetcher(
      train_iter,
      lambda b: run.parallel.place_batch(device_keys(run.task, b)),
      size=config.prefetch,
  )
  pending: list[Any] = []
  last_eval: dict[str, float] = {}
  status, start_time = "completed", time.perf_counter()
  step = start_step

  def evaluate_now(log: bool = True):
    started = time.perf_counter()
    first = eval_fn.seconds is None
    metrics = evaluate(run, eval_fn, variables_of(state))
    if first:
      progress.message(f"compiled eval step in {eval_fn.seconds:.1f} s")
    seconds = time.perf_counter() - started
    progress.exclude(seconds)
    if log:
      writer.write(step, "eval", metrics)
    progress.message(
        f"eval at step {step} (epoch {step / run.steps_per_epoch:.2f}, "
        f"{seconds:.1f} s): {format_metrics(metrics, digits=4)}"
    )
    return metrics

  try:
    while step < run.total_steps:
      batch, data_state = next(prefetcher)
      state, metrics = step_fn(state, batch)
      pending.append(metrics)  # stays on device: no host sync per step
      step += 1
      if step == start_step + 1:
        progress.compiled("train step", step_fn.seconds, step)
      if step % config.log_every_steps == 0 or step == run.total_steps:
        means = {
            k: float(np.mean(v))
            for k, v in jax.tree.map(
                lambda *x: np.stack(x), *jax.device_get(pending)
            ).items()
        }
        pending.clear()
        rates = progress.update(step, means)
        writer.write(
            step,
            "train",
            {**means, **rates, "epoch": step / run.steps_per_epoch},
        )
      if step % run.steps_per_epoch == 0 or step == run.total_steps:
        last_eval = evaluate_now()
      # The host copy of the state is built only when a save is due. A SIGTERM that
      # lands after `save_due` is handled at the next step.
      due = checkpointer.save_due(step, force=step == run.total_steps)
      if due:
        started = time.perf_counter()
        checkpointer.maybe_save(
            step,
            run.parallel.host_state(state),
            {"data": data_state},
            force=True,
        )
        progress.exclude(time.perf_counter() - started)
      if due and checkpointer.preempted:
        status = "preempted"
        progress.message(f"SIGTERM: checkpoint saved at step {step}; exiting")
        break
    if status == "completed" and not last_eval:
      # Resumed from the final checkpoint of a run killed before its summary.
      # Every process evaluates (the evaluation is collective); the row is
      # written unless it was logged before that checkpoint.
      last_eval = evaluate_now(log=(step, "eval") not in writer.rows)
  finally:
    prefetcher.close()
    checkpointer.close()

  summary = {
      "status": status,
      "step": step,
      "total_steps": run.total_steps,
      "seconds": time.perf_counter() - start_time,
      "eval": last_eval,
      "workdir": workdir,
  }
  if primary and status == "completed":
    _write_json_atomically(
        os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2)
    )
    progress.message(
        f"done in {format_duration(summary['seconds'])}: step {step}/"
        f"{run.total_steps}; eval {format_metrics(last_eval)}; summary in "
        f"{os.path.join(workdir, 'summary.json')}"
    )
  return summary


def load_final(
    workdir: str, config: ml_collections.ConfigDict | None = None
) -> tuple[Run, State]:
  """Rebuilds a run from `workdir/config.json` (or `config`) and restores its newest
  intact checkpoint to the host."""
  if config is None:
    with open(os.path.join(workdir, "config.json")) as f:
      config = ml_collections.ConfigDict(json.load(f))
  validate_config(config)
  run = build(config)
  kwargs = train_data_kwargs(config, run.process_batch_size)
  sample = data_lib.make_dataset(
      config.dataset, config.train_split, num_epochs=1, **kwargs
  )[0]
  checkpointer = Checkpointer(
      os.path.join(workdir, "checkpoints"),
      every_steps=1,
      keep=1 << 30,
      handle_sigterm=False,
  )
  try:
    restored = checkpointer.restore_latest(
        state_structure(run, device_keys(run.task, sample))
    )
  finally:
    checkpointer.close()
  if restored is None:
    raise FileNotFoundError(
        f"load_final: no checkpoint under {workdir}/checkpoints"
    )
  return run, restored[1]


def _flag_error_line(error: Exception) -> str:
  """absl's flag error in one line; a config file's own exception by its message."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if any(
      line.startswith("Traceback (most recent call last)") for line in lines
  ):
    # ml_collections embeds get_config's traceback: keep the flag and the error.
    head = lines[0].replace("Error whilst parsing config file:", "").strip()
    last = lines[-1]
    for prefix in ("ValueError: ", "TypeError: ", "KeyError: "):
      last = last.removeprefix(prefix)
    return f"{head} {last}"
  return " ".join(lines)


def _unknown_field_line(message: str, argv: Sequence[str]) -> str:
  """`--config.num_epoch: the config has no such field (did you mean
  'num_epochs'?)` from ml_collections' KeyError message."""
  name = re.search(r"'([^'\\]+)", message)
  name = name.group(1) if name else message
  flag = next(
      (
          arg.split("=", 1)[0]
          for arg in argv
          if re.fullmatch(rf"--config\.([\w.]+\.)?{re.escape(name)}(=.*)?", arg)
      ),
      f"--config.{name}",
  )
  hint = re.search(r'Did you mean "([^"]+)"', message)
  return f"{flag}: the config has no such field" + (
      f" (did you mean {hint.group(1)!r}?)" if hint else ""
  )


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every mistake as one line and exit status 2."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import (  # pylint: disable=import-outside-toplevel
      config_flags,
  )

  with cli.exit_on_usage_error("train.py"):
    try:
      rest = flags.FLAGS(argv)
    except flags.Error as e:
      raise cli.UsageError(_flag_error_line(e)) from None
    except (AttributeError, KeyError) as e:
      # ml_collections: a --config.FIELD override naming no field of the config.
      raise cli.UsageError(_unknown_field_line(str(e), argv)) from None
    # A missing config file is only reported when the config is first read.
    path = config_flags.get_config_filename(flags.FLAGS["config"])
    path = path.split(":", 1)[0]
    if not os.path.isfile(path):
      raise cli.UsageError(f"--config: no such file: {path}")
  return rest


def main(argv):
  from absl import flags  # pylint: disable=import-outside-toplevel

  cli.quiet_logging(cli.verbosity_given())
  with cli.exit_on_usage_error("train.py"):
    if len(argv) > 1:
      raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file(
      "config",
      None,
      "config file and method, e.g. experiments/configs/digits.py:sgd",
      lock_config=True,
  )
  flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics)")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=parse_flags)

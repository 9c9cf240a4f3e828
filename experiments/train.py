"""Train a model from a config, data-parallel, with preemption-safe checkpoints.

  python experiments/train.py --config experiments/configs/resnet20_cifar10_cram_multi.py \
      --workdir runs/rn20_cram [--config.num_epochs=10 --config.parallel=pmap ...]

Everything a run needs to continue lives in `workdir/checkpoints` (params, optimizer
state, BatchNorm statistics, RNG, data-iterator position): run the same command
again after a preemption and it resumes exactly where it stopped. Metrics go to
`workdir/metrics.jsonl` and `workdir/metrics.csv`, a summary to `workdir/summary.json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
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
from experiments import optimizers, tasks
from experiments import parallel as parallel_lib
from experiments.checkpointing import Checkpointer
from experiments.metrics import MetricsWriter, Progress

State = dict[str, Any]


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
      data_dir=config.get("data_dir"),
      shard_index=jax.process_index(),
      shard_count=jax.process_count(),
      **dict(config.get("data_options", {})),
  )


def build(config: ml_collections.ConfigDict) -> Run:
  parallel = parallel_lib.make_parallel(config)
  task = tasks.make_task(config, parallel.axis_name)
  if config.batch_size % jax.process_count():
    raise ValueError(
        f"config.batch_size={config.batch_size} does not divide over "
        f"{jax.process_count()} processes"
    )
  process_batch = config.batch_size // jax.process_count()
  local_devices = max(parallel.num_replicas // jax.process_count(), 1)
  if process_batch % local_devices:
    raise ValueError(
        f"config.batch_size={config.batch_size}: {process_batch} per process is "
        f"not a multiple of the {local_devices} local devices"
    )
  one_epoch = data_lib.make_dataset(
      config.dataset,
      config.train_split,
      num_epochs=1,
      **train_data_kwargs(config, process_batch),
  )
  steps_per_epoch = len(one_epoch)
  total = config.get("num_train_steps") or config.num_epochs * steps_per_epoch
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
  if run.config.get("init_checkpoint"):
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
  task, tx, axis = run.task, run.tx, run.parallel.axis_name
  name = run.config.optimizer
  second_gradient = optimizers.uses_second_gradient(name)
  averages_itself = name.startswith(
      "cram"
  )  # CrAM pmeans (or not: m-sharpness) inside

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
    if axis is not None and not averages_itself:
      grads = jax.lax.pmean(grads, axis)
    extra = {}
    if second_gradient:
      # Same batch, train mode, statistics from this pass dropped. `_` lets SAM pass
      # its step index; CrAM calls grad_fn(params).
      extra["grad_fn"] = lambda p, _=0: jax.grad(loss_fn, has_aux=True)(
          p, state["batch_stats"]
      )[0]
    updates, opt_state = tx.update(
        grads, state["opt_state"], state["params"], **extra
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
      data_dir=config.get("data_dir"),
      shard_index=jax.process_index(),
      shard_count=jax.process_count(),
      **dict(config.get("data_options", {})),
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


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the final summary."""
  parallel_lib.initialize_distributed(config)
  run = build(config)
  primary = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if primary:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  kwargs = train_data_kwargs(config, run.process_batch_size)
  train_iter = data_lib.make_pipeline(
      config.dataset,
      config.train_split,
      num_threads=config.get("data_threads", 0),
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
  restored = checkpointer.restore_latest(state_structure(run, sample))
  start_step = 0
  if restored is not None:
    start_step, state, extra = restored
    train_iter.set_state(extra["data"])
    logging.info("resumed from step %d", start_step)
  else:
    state = init_state(run, sample)
  state = run.parallel.place_state(state)

  step_fn = run.parallel.compile_step(make_train_step(run))
  eval_fn = run.parallel.compile_eval(run.task.eval_outputs)
  writer = MetricsWriter(workdir, enabled=primary)
  progress = Progress(
      run.total_steps,
      config.batch_size,
      start_step=start_step,
      enabled=primary and config.get("progress", True),
  )
  progress.message(
      f"{config.get('name', config.optimizer)}: {run.total_steps} steps "
      f"({run.steps_per_epoch}/epoch) on {run.parallel.num_replicas} device(s), "
      f"{type(run.parallel).__name__}"
      + (f", resumed at step {start_step}" if start_step else "")
  )
  prefetcher = parallel_lib.DevicePrefetcher(
      train_iter,
      lambda b: run.parallel.place_batch(device_keys(run.task, b)),
      size=config.get("prefetch", 2),
  )
  pending: list[Any] = []
  last_eval: dict[str, float] = {}
  status, start_time = "completed", time.perf_counter()
  step = start_step
  try:
    while step < run.total_steps:
      batch, data_state = next(prefetcher)
      state, metrics = step_fn(state, batch)
      pending.append(metrics)  # stays on device: no host sync per step
      step += 1
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
        last_eval = evaluate(run, eval_fn, variables_of(state))
        writer.write(step, "eval", last_eval)
        progress.message(
            f"eval at step {step} (epoch {step / run.steps_per_epoch:.2f}): "
            + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items())
        )
      # The host copy of the state is built only when a save is due. A SIGTERM that
      # lands after `save_due` is handled at the next step.
      due = checkpointer.save_due(step, force=step == run.total_steps)
      if due:
        checkpointer.maybe_save(
            step,
            run.parallel.host_state(state),
            {"data": data_state},
            force=True,
        )
      if due and checkpointer.preempted:
        status = "preempted"
        progress.message(f"SIGTERM: checkpoint saved at step {step}; exiting")
        break
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
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    progress.message(f"done: {json.dumps(summary)}")
  return summary


def load_final(
    workdir: str, config: ml_collections.ConfigDict | None = None
) -> tuple[Run, State]:
  """Rebuilds a run from `workdir/config.json` (or `config`) and restores its newest
  intact checkpoint to the host."""
  if config is None:
    with open(os.path.join(workdir, "config.json")) as f:
      config = ml_collections.ConfigDict(json.load(f))
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


def main(argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel

  config = flags.FLAGS.config
  train_and_evaluate(config, flags.FLAGS.workdir)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file(
      "config", None, "config file", lock_config=True
  )
  flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics)")
  flags.mark_flags_as_required(["config", "workdir"])
  logging.basicConfig(level=logging.WARNING)
  app.run(main)

"""One process of a multi-process run of the runner, for tests/test_multihost.py.

  python tests/multihost_worker.py '<json options>'

Options: `port`, `num_processes`, `process_id` (the `jax.distributed` start-up,
coordinator on 127.0.0.1), `local_devices` (simulated CPU devices of this
process), `workdir`, `data_dir`, `steps`, `parallel`, `method`, `result` (where this
process writes its JSON result) and `sigterm_at` (optional: this process sends
itself SIGTERM just before the runner checks for preemption at that step, so
the signal reaches one process only, at a known step).

The result holds what only this process knows: its index, the device count it
saw, the step it restored (None on a fresh start) and the summary
`train_and_evaluate` returned (the evaluation every process computed).
"""

import json
import os
import signal
import sys
import time


def make_config(options: dict):
  """The digits run both the processes and the 1-process reference train."""
  # pylint: disable=import-outside-toplevel
  from experiments.configs import digits

  config = digits.get_config(options.get("method", "cram+-multi"))
  config.data_dir = options["data_dir"]
  config.num_train_steps = options["steps"]
  config.parallel = options.get("parallel", "jit")
  config.optimizer.learning_rate = 0.01  # few steps, small lr: well-conditioned
  config.checkpoint_every_steps = 1000  # saves: on preemption and at the end
  config.log_every_steps = 1
  config.progress = False
  return config


def main(options: dict) -> None:
  # Before JAX is imported: this process's share of the simulated devices, and
  # a generous collective timeout (gloo's first connection waits for the other
  # process, which may still be compiling on a loaded machine).
  os.environ["XLA_FLAGS"] = (
      f"--xla_force_host_platform_device_count={options['local_devices']} "
      "--xla_cpu_collective_timeout_seconds=600"
  )
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  # Gloo is the default CPU collective in this JAX; set it so a change of default
  # shows here rather than as a hang.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # pylint: disable=import-outside-toplevel
  from experiments import checkpointing, parallel, train

  config = make_config(options)
  config.distributed.enabled = True
  config.distributed.coordinator_address = f"127.0.0.1:{options['port']}"
  config.distributed.num_processes = options["num_processes"]
  config.distributed.process_id = options["process_id"]

  restored = []
  restore_latest = checkpointing.Checkpointer.restore_latest

  def recording_restore(self, abstract_state):
    out = restore_latest(self, abstract_state)
    restored.append(None if out is None else out[0])
    return out

  checkpointing.Checkpointer.restore_latest = recording_restore

  sigterm_at = options.get("sigterm_at")
  save_due = checkpointing.Checkpointer.save_due
  if sigterm_at is not None:

    def signalling_save_due(self, step, **kwargs):
      if step == sigterm_at:
        os.kill(os.getpid(), signal.SIGTERM)
      return save_due(self, step, **kwargs)

    checkpointing.Checkpointer.save_due = signalling_save_due

  summary = train.train_and_evaluate(config, options["workdir"])

  # `fetch` of rows split over both processes: process p's row r holds
  # 100 p + r, so the whole array says which process's rows came back where.
  mesh = parallel.MeshParallel()
  local = 100 * jax.process_index() + np.arange(2 * jax.local_device_count())
  fetched = mesh.fetch({"rows": mesh.place_batch({"x": local})["x"]})["rows"]

  # The cost of the preemption vote alone: `save_due` at steps past any cadence.
  checkpointing.Checkpointer.save_due = save_due  # no more signals
  votes = checkpointing.Checkpointer(
      options["workdir"] + "-votes",  # one directory: orbax syncs its creation
      every_steps=1 << 30,
  )
  votes.save_due(1)  # compiles the vote
  started = time.perf_counter()
  for step in range(2, 52):
    votes.save_due(step)
  vote_seconds = (time.perf_counter() - started) / 50
  votes.close()

  result = {
      "process_index": jax.process_index(),
      "process_count": jax.process_count(),
      "device_count": jax.device_count(),
      "restored": restored,
      "summary": summary,
      "fetched_rows": fetched.tolist(),
      "vote_seconds": vote_seconds,
  }
  with open(options["result"], "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  main(json.loads(sys.argv[1]))

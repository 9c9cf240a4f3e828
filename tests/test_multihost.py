"""A real multi-host run: 2 processes x 4 CPU devices against 1 process x 8.

Two worker processes (tests/multihost_worker.py) start `jax.distributed` on a
free localhost port (gloo CPU collectives) and run the runner's
`train_and_evaluate` on the digits config (a few steps at a small
learning rate). Process 1 alone gets SIGTERM at step `SIGTERM_AT`: both processes
must stop at the same step with a checkpoint, which both restore when started
again, and the resumed run must end where a 1-process, 8-device run of the same
config (in this process) ends: params, optimiser state and BatchNorm statistics
close relative to their change (tests/parallel_checks.py: the two are different
programs), counters, PRNG key and pruning masks exactly, evaluation equal.
Metrics, summary and checkpoints are written once (not once per process), and
`MeshParallel.fetch` returns rows split over both processes whole, in order.
Once with `parallel='jit'` (replicated state), once with 'fsdp' (params and
optimiser state sharded over both processes' devices).
"""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from multihost_worker import make_config
from parallel_checks import LOSS_RTOL, assert_close_relative_to_change

from cram_jax.data import prepare_digits
from experiments import train
from experiments.metrics import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")
STEPS = 4
SIGTERM_AT = 1  # process 1 signals itself before step 1's preemption check
STOPPED_AT = (
    SIGTERM_AT + 1
)  # the vote is read one step later (checkpointing.py)
TIMEOUT = 600  # seconds for one 2-process run: generous for a loaded machine


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  prepare_digits(str(path))
  return str(path)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(tmp_path, name, workdir, options, sigterm_at=None):
  """Runs both processes to their end; returns their results, by process."""
  port = free_port()
  env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)  # the worker sets its own 4 devices
  processes, logs, results = [], [], []
  for i in range(2):
    process_options = {
        **options,
        "port": port,
        "num_processes": 2,
        "process_id": i,
        "local_devices": 4,
        "workdir": workdir,
        "result": str(tmp_path / f"{name}-{i}.json"),
        "sigterm_at": sigterm_at if i == 1 else None,
    }
    results.append(process_options["result"])
    logs.append(open(tmp_path / f"{name}-{i}.log", "w+"))
    processes.append(
        subprocess.Popen(
            [sys.executable, WORKER, json.dumps(process_options)],
            cwd=ROOT,
            env=env,
            stdout=logs[-1],
            stderr=subprocess.STDOUT,
        )
    )

  def tails():
    out = []
    for i, log in enumerate(logs):
      log.seek(0)
      lines = [
          line
          for line in log.read().splitlines()
          if not line.startswith("[Gloo]")
      ]
      out.append(f"--- process {i} ---\n" + "\n".join(lines[-40:]))
    return "\n".join(out)

  deadline = time.monotonic() + TIMEOUT
  try:
    while any(p.poll() is None for p in processes):
      failed = [p.returncode for p in processes if p.returncode]
      if failed or time.monotonic() > deadline:
        pytest.fail(
            f"{name}: exit codes {[p.returncode for p in processes]} "
            f"(timeout {TIMEOUT} s)\n{tails()}"
        )
      time.sleep(0.1)
    codes = [p.returncode for p in processes]
    assert codes == [0, 0], f"{name}: exit codes {codes}\n{tails()}"
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait()
    for log in logs:
      log.close()
  out = []
  for path in results:
    with open(path) as f:
      out.append(json.load(f))
  return out


def kernel_masks(params, sparsity):
  """Global magnitude mask over every kernel: the largest (1 - s) of all |w|."""
  flat = np.concatenate(
      [
          np.abs(np.asarray(x)).ravel()
          for path, x in jax.tree_util.tree_leaves_with_path(params)
          if "kernel" in jax.tree_util.keystr(path)
      ]
  )
  threshold = np.sort(flat)[int(sparsity * flat.size)]
  return flat >= threshold


# 'jit' (replicated state) with the paper's CrAM+-Multi; 'fsdp' (params and
# optimiser state sharded over both processes' devices, so checkpoints hold
# shards written by each process) with SGD, whose step compiles faster.
@pytest.mark.parametrize(
    "parallel, method", [("jit", "cram+-multi"), ("fsdp", "sgd")]
)
def test_two_processes_preempted_and_resumed_match_one(
    tmp_path, digits_dir, parallel, method
):
  options = {
      "data_dir": digits_dir,
      "steps": STEPS,
      "parallel": parallel,
      "method": method,
  }
  # The reference: one process, the 8 devices of tests/conftest.py.
  reference_dir = str(tmp_path / "reference")
  config = make_config(options)
  reference = train.train_and_evaluate(config, reference_dir)
  assert reference["status"] == "completed"

  workdir = str(tmp_path / "multi")
  stopped = launch(tmp_path, "stopped", workdir, options, SIGTERM_AT)
  for i, result in enumerate(stopped):
    assert result["process_index"] == i and result["process_count"] == 2
    assert result["device_count"] == 8
    assert result["restored"] == [None]
    # Process 0 got no signal: it stopped because process 1 did, at its step.
    assert result["summary"]["status"] == "preempted", (i, result)
    assert result["summary"]["step"] == STOPPED_AT, (i, result)
  checkpoints = os.path.join(workdir, "checkpoints")
  assert sorted(os.listdir(checkpoints)) == [str(STOPPED_AT)]
  assert not os.path.exists(os.path.join(workdir, "summary.json"))

  resumed = launch(tmp_path, "resumed", workdir, options)
  for i, result in enumerate(resumed):
    assert result["restored"] == [STOPPED_AT], (i, result)
    assert result["summary"]["status"] == "completed"
    assert result["summary"]["step"] == STEPS
    # Every process evaluates the whole split (the outputs are replicated).
    assert result["summary"]["eval"] == resumed[0]["summary"]["eval"]
    # `fetch` of rows split over the processes: all rows, in global order.
    assert result["fetched_rows"] == list(range(8)) + list(range(100, 108))
  votes = [r["vote_seconds"] for r in resumed]
  print(f"preemption vote per step: {votes} s")
  check_against_reference(workdir, reference_dir, reference, config)


def check_against_reference(workdir, reference_dir, reference, config):
  """The resumed 2-process run in `workdir` against the 1-process reference."""
  checkpoints = os.path.join(workdir, "checkpoints")
  # Written once, by the primary process: each row once, one summary, steps
  # once (orbax would fail on a second writer of the same step).
  assert sorted(os.listdir(checkpoints)) == [str(STOPPED_AT), str(STEPS)]
  rows = [
      (r["step"], r["split"])
      for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  ]
  assert rows == [(s, "train") for s in range(1, STEPS + 1)] + [(STEPS, "eval")]
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["status"] == "completed" and summary["step"] == STEPS

  # The same training as one process on 8 devices: the same global batches
  # (losses), the same state (relative to its change), the same masks.
  want_rows = {
      (r["step"], r["split"]): r
      for r in read_jsonl(os.path.join(reference_dir, "metrics.jsonl"))
  }
  for row in read_jsonl(os.path.join(workdir, "metrics.jsonl")):
    np.testing.assert_allclose(
        row["loss"],
        want_rows[row["step"], row["split"]]["loss"],
        rtol=LOSS_RTOL,
        err_msg=str((row["step"], row["split"])),
    )
  got_eval, want_eval = summary["eval"], reference["eval"]
  assert got_eval["examples"] == want_eval["examples"] == 360
  correct = [round(e["accuracy"] * 360) for e in (got_eval, want_eval)]
  assert correct[0] == correct[1]
  np.testing.assert_allclose(
      got_eval["loss"], want_eval["loss"], rtol=LOSS_RTOL
  )

  _, got = train.load_final(workdir, config)
  _, want = train.load_final(reference_dir, config)
  run = train.build(config)
  sample = train.data_lib.make_dataset(
      config.dataset,
      config.train_split,
      num_epochs=1,
      **train.train_data_kwargs(config, run.process_batch_size),
  )[0]
  initial = jax.device_get(
      train.init_state(run, train.device_keys(run.task, sample))
  )
  floats = {}
  for (path, w), g in zip(
      jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)
  ):
    name = jax.tree_util.keystr(path)
    w, g = np.asarray(w), np.asarray(g)
    assert w.shape == g.shape and w.dtype == g.dtype, name
    if np.issubdtype(w.dtype, np.floating):
      floats[name] = (g, w)
    else:  # step counters, schedule counts, PRNG key data: exactly
      np.testing.assert_array_equal(g, w, err_msg=name)
  initial_floats = {
      jax.tree_util.keystr(p): np.asarray(x)
      for p, x in jax.tree_util.tree_leaves_with_path(initial)
      if np.issubdtype(np.asarray(x).dtype, np.floating)
  }
  moved = {k for k, (_, w) in floats.items() if np.any(w != initial_floats[k])}
  for k in set(floats) - moved:  # still at its initial value: exactly there
    np.testing.assert_array_equal(floats[k][0], floats[k][1], err_msg=k)
  assert any("params" in k for k in moved) and any(
      "batch_stats" in k for k in moved
  )
  assert_close_relative_to_change(
      {k: floats[k][0] for k in sorted(moved)},
      {k: floats[k][1] for k in sorted(moved)},
      {k: initial_floats[k] for k in sorted(moved)},
      "2x4 vs 1x8 ",
  )
  for sparsity in config.cram.sparsities:
    got_mask = kernel_masks(got["params"], sparsity)
    want_mask = kernel_masks(want["params"], sparsity)
    differ = int(np.sum(got_mask != want_mask))
    assert differ == 0, f"{sparsity:.0%} masks: {differ} entries differ"


def test_pmap_is_refused_with_several_processes(monkeypatch):
  # pmap spans local devices only: a multi-host pmap run would train each
  # process's replicas apart from the others'.
  from experiments import cli
  from experiments import parallel as parallel_lib

  config = make_config({"data_dir": "unused", "steps": 1, "parallel": "pmap"})
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(
      cli.ConfigError, match="'pmap' runs on one process, got 2"
  ):
    parallel_lib.make_parallel(config)

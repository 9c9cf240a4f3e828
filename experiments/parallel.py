"""Data parallelism: `jit` over a device mesh (default) or `pmap`.

Both give the same numbers. With `jit`, the batch is one global array sharded over a
1-D mesh axis and params are replicated: BatchNorm and the loss see the global batch
and XLA inserts the all-reduces, so CrAM perturbs with the global gradient by
construction. With `pmap`, each device runs the step on its shard: gradients are
`pmean`-ed explicitly (SAM and CrAM take `batch_axis_name`) and BatchNorm averages its
batch statistics over the axis, which reproduces the global-batch computation.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from experiments.cli import ConfigError

AXIS = "batch"


def initialize_distributed(config) -> None:
  """Multi-host start-up: `jax.distributed.initialize()` when asked (TPU pods, SLURM, ...).

  On Cloud TPU and SLURM, JAX finds coordinator and process ids on its own; elsewhere
  set `config.distributed.coordinator_address`, `num_processes` and `process_id`.
  """
  dist = config.distributed
  if not dist.enabled:
    return
  kwargs = {
      k: dist[k]
      for k in ("coordinator_address", "num_processes", "process_id")
      if dist[k] is not None
  }
  jax.distributed.initialize(**kwargs)


class MeshParallel:
  """`jit` with the batch sharded over all devices and replicated state."""

  axis_name = None  # no named axis inside the step: XLA partitions it

  def __init__(self, devices=None):
    self.devices = list(devices if devices is not None else jax.devices())
    self.mesh = Mesh(np.asarray(self.devices), (AXIS,))
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(AXIS))

  @property
  def num_replicas(self) -> int:
    return len(self.devices)

  def place_state(self, state: Any) -> Any:
    return jax.device_put(state, self.replicated)

  def host_state(self, state: Any) -> Any:
    """One copy of the state in host memory, for checkpoints."""
    return jax.tree.map(_first_shard, state)

  def place_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    # Each process contributes its local rows; together they form the global batch.
    return {
        k: jax.make_array_from_process_local_data(
            self.batch_sharding, np.asarray(v)
        )
        for k, v in batch.items()
    }

  def compile_step(self, step: Callable[..., Any]) -> Callable[..., Any]:
    return jax.jit(step, donate_argnums=(0,))

  def compile_eval(self, fn: Callable[..., Any]) -> Callable[..., Any]:
    return jax.jit(fn)

  def fetch(self, tree: Any) -> Any:
    """Device outputs as NumPy, whole on every process.

    A leaf split over the devices of several processes (per-example outputs of
    a multi-host evaluation) is replicated first, by one all-gather program for
    the tree: no process can read the other processes' rows otherwise.
    """
    if any(
        isinstance(x, jax.Array)
        and not (x.is_fully_addressable or x.is_fully_replicated)
        for x in jax.tree.leaves(tree)
    ):
      tree = self._replicate(tree)
    return jax.device_get(tree)

  def _replicate(self, tree: Any) -> Any:
    if not hasattr(self, "_replicate_fn"):
      self._replicate_fn = jax.jit(lambda t: t, out_shardings=self.replicated)
    return self._replicate_fn(tree)


class PmapParallel:
  """`pmap` over local devices; the step body uses `AXIS` for its collectives."""

  axis_name = AXIS

  def __init__(self, devices=None):
    self.devices = list(devices if devices is not None else jax.local_devices())
    # pmap's own layout in this JAX: leading axis split over a 1-D mesh of its devices.
    self._stacked = NamedSharding(
        Mesh(np.asarray(self.devices), (AXIS,)), PartitionSpec(AXIS)
    )

  @property
  def num_replicas(self) -> int:
    return len(self.devices)

  def _sharding(self, shape):
    del shape
    return self._stacked

  def place_state(self, state: Any) -> Any:
    n = self.num_replicas

    def replicate(x):
      stacked = np.broadcast_to(np.asarray(x), (n,) + np.shape(x))
      return jax.device_put(stacked, self._sharding(stacked.shape))

    return jax.tree.map(replicate, state)

  def host_state(self, state: Any) -> Any:
    return jax.tree.map(lambda x: _first_shard(x)[0], state)

  def place_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    n = self.num_replicas
    out = {}
    for k, v in batch.items():
      v = np.asarray(v)
      if v.shape[0] % n:
        raise ValueError(
            f"pmap: batch key '{k}' has {v.shape[0]} rows, not a multiple of "
            f"{n} devices"
        )
      v = v.reshape((n, v.shape[0] // n) + v.shape[1:])
      out[k] = jax.device_put(v, self._sharding(v.shape))
    return out

  def compile_step(self, step: Callable[..., Any]) -> Callable[..., Any]:
    return jax.pmap(step, axis_name=AXIS, donate_argnums=(0,))

  def compile_eval(self, fn: Callable[..., Any]) -> Callable[..., Any]:
    return jax.pmap(fn, axis_name=AXIS)

  def fetch(self, tree: Any) -> Any:
    """Device outputs back to the host, per-replica rows flattened into the batch."""
    return jax.tree.map(
        lambda x: np.asarray(x).reshape((-1,) + x.shape[2:])
        if np.ndim(x) >= 2
        else np.asarray(x),
        jax.device_get(tree),
    )


def _first_shard(x: Any) -> np.ndarray:
  """This process's first shard of `x` as NumPy: the whole value when replicated,
  replica 0's row under pmap. Reading one shard avoids a slicing program per leaf.
  """
  if isinstance(x, jax.Array):
    return np.asarray(x.addressable_shards[0].data)
  return np.asarray(x)


def make_parallel(config) -> MeshParallel | PmapParallel:
  """`config.parallel` ('jit' or 'pmap') over `config.num_devices` devices (0: all)."""
  mode = config.parallel
  count = config.num_devices
  if mode == "jit":
    devices = jax.devices()
  elif mode == "pmap":
    devices = jax.local_devices()
  else:
    raise ConfigError(
        f"config.parallel={mode!r}; use 'jit' (device mesh) or 'pmap'"
    )
  if count:
    if count > len(devices):
      raise ConfigError(
          f"config.num_devices={count} but only {len(devices)} devices exist"
      )
    devices = devices[:count]
  if mode == "jit":
    return MeshParallel(devices)
  return PmapParallel(devices)


def mean_over_replicas(tree: Any, axis_name: str | None) -> Any:
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


class DevicePrefetcher:
  """Moves the next `size` batches to the devices on a background thread.

  Each item carries the data iterator's state *after* its batch, so a checkpoint
  taken after consuming it resumes with the next batch, however far the
  prefetcher has read ahead.
  """

  _DONE = object()

  def __init__(
      self,
      iterator: Iterator[dict[str, np.ndarray]],
      place: Callable[[dict[str, np.ndarray]], Any],
      size: int = 2,
  ):
    self._queue: queue.Queue = queue.Queue(maxsize=max(size, 1))
    self._stop = threading.Event()
    self._error: BaseException | None = None
    self._thread = threading.Thread(
        target=self._run, args=(iterator, place), daemon=True
    )
    self._thread.start()

  def _run(self, iterator, place):
    try:
      for batch in iterator:
        state = iterator.get_state() if hasattr(iterator, "get_state") else None
        item = (place(batch), state)
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if self._stop.is_set():
          return
    except BaseException as e:  # surfaced to the consumer
      self._error = e
    self._queue.put(self._DONE)

  def __iter__(self):
    return self

  def __next__(self) -> tuple[Any, Any]:
    item = self._queue.get()
    if item is self._DONE:
      if self._error is not None:
        raise self._error
      raise StopIteration
    return item

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=5)

"""Data parallelism: `jit` over a device mesh (default), `pmap`, or `fsdp`.

All give the same numbers. With `jit`, the batch is one global array sharded over a
1-D mesh axis and params are replicated: BatchNorm and the loss see the global batch
and XLA inserts the all-reduces, so CrAM perturbs with the global gradient by
construction. With `pmap`, each device runs the step on its shard: gradients are
`pmean`-ed explicitly (SAM and CrAM take `batch_axis_name`) and BatchNorm averages its
batch statistics over the axis, which reproduces the global-batch computation.
`fsdp` is `jit` with params and optimizer state sharded over the same axis as the
batch (ZeRO-3 style; the rule is `fsdp_spec`): XLA gathers each weight where it is
used, so every device holds about 1/devices of the state between steps.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
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
    """One copy of the state in host memory."""
    return jax.tree.map(_first_shard, state)

  def checkpoint_state(self, state: Any) -> Any:
    """What a checkpoint saves: the host copy (the state is replicated)."""
    return self.host_state(state)

  def abstract_state(self, structure: Any) -> Any:
    """The restore target: `structure` as is (restored to the host)."""
    return structure

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


class FsdpParallel(MeshParallel):
  """`jit` with params and optimizer state sharded (`fsdp_spec`), the batch
  sharded over the same axis, and the rest of the state (step, rng, BatchNorm
  statistics) replicated."""

  # Top-level state entries whose leaves are sharded; the rest are replicated.
  SHARDED = ("params", "opt_state")

  def state_sharding(self, state: Any) -> Any:
    """`NamedSharding`s for a state (arrays or `jax.ShapeDtypeStruct`s): the
    runner's state dict, or any pytree (then every leaf follows `fsdp_spec`)."""
    n = len(self.devices)

    def leaf(x):
      return NamedSharding(self.mesh, fsdp_spec(np.shape(x), n))

    def replicate(x):
      del x
      return self.replicated

    if isinstance(state, dict) and set(self.SHARDED) <= set(state):
      return {
          k: jax.tree.map(leaf if k in self.SHARDED else replicate, v)
          for k, v in state.items()
      }
    return jax.tree.map(leaf, state)

  def abstract_state(self, structure: Any) -> Any:
    """`structure` (ShapeDtypeStructs) with this mode's shardings: a checkpoint
    restores straight into them, with no full copy on the host or a device."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        structure,
        self.state_sharding(structure),
    )

  def place_state(self, state: Any) -> Any:
    shardings = self.state_sharding(state)
    # Host values are cut per device (no device holds the whole leaf); a
    # jax.Array already placed so is left as it is.
    return jax.tree.map(_put, state, shardings)

  def host_state(self, state: Any) -> Any:
    """The whole state in host memory (gathered: for tests and small models)."""

    def gather(x):
      if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
      return np.asarray(x)

    return jax.tree.map(gather, state)

  def checkpoint_state(self, state: Any) -> Any:
    """The sharded state itself: each process saves its own shards."""
    return state

  def compile_step(self, step: Callable[..., Any]) -> Callable[..., Any]:
    return _StepWithShardings(self, step)


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
  if isinstance(x, jax.Array):
    return jax.device_put(x, sharding)
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])


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

  def checkpoint_state(self, state: Any) -> Any:
    return self.host_state(state)

  def abstract_state(self, structure: Any) -> Any:
    return structure

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


# Leaves with fewer elements stay replicated under `fsdp`: splitting them saves
# little memory and costs a collective each.
FSDP_MIN_SIZE = 1024


def fsdp_spec(shape: tuple[int, ...], num_devices: int) -> PartitionSpec:
  """How `fsdp` places a params or optimizer-state leaf of `shape`.

  Split along its largest axis whose size is a multiple of `num_devices` (the
  last such axis on a tie: a kernel's output features, so that N:M groups along
  the input axis stay whole on a device); replicated when the leaf has fewer than
  `FSDP_MIN_SIZE` elements, is a scalar, or has no such axis.
  """
  if num_devices <= 1 or math.prod(shape) < FSDP_MIN_SIZE:
    return PartitionSpec()
  axes = [i for i, d in enumerate(shape) if d % num_devices == 0]
  if not axes:
    return PartitionSpec()
  axis = max(axes, key=lambda i: (shape[i], i))
  return PartitionSpec(*[AXIS if i == axis else None for i in range(axis + 1)])


class _StepWithShardings:
  """A train step jitted with in/out shardings fixed by the state it is first
  called with (`FsdpParallel.state_sharding` of it), the state donated.

  A state in other shardings is an error, not a silent reshard. `lower(state,
  batch)` gives the lowered step (e.g. for `.compile().memory_analysis()`).
  """

  def __init__(self, parallel: FsdpParallel, step: Callable[..., Any]):
    self._parallel = parallel
    self._step = step
    self._jitted = None

  def _jit(self, state):
    if self._jitted is None:
      shardings = self._parallel.state_sharding(state)
      _check_placed(state, shardings)
      self._jitted = jax.jit(
          self._step,
          in_shardings=(shardings, self._parallel.batch_sharding),
          out_shardings=(shardings, self._parallel.replicated),
          donate_argnums=(0,),
      )
    return self._jitted

  def __call__(self, state, batch):
    return self._jit(state)(state, batch)

  def lower(self, state, batch):
    return self._jit(state).lower(state, batch)


def _check_placed(state: Any, shardings: Any) -> None:
  """Raises ValueError naming the first leaf of `state` that is a jax.Array
  placed other than `shardings` say (host values are placed by the jit)."""
  for (path, x), want in zip(
      jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(shardings)
  ):
    if isinstance(x, jax.Array) and not x.sharding.is_equivalent_to(
        want, x.ndim
    ):
      name = jax.tree_util.keystr(path, simple=True, separator="/")
      got = x.sharding
      if isinstance(got, NamedSharding):
        got = got.spec
      raise ValueError(
          f"fsdp step: leaf '{name}' is placed as {got} over "
          f"{len(x.sharding.device_set)} devices, not as fsdp places it "
          f"({want.spec} over {len(want.device_set)} devices); pass the state "
          "through FsdpParallel.place_state first"
      )


def _first_shard(x: Any) -> np.ndarray:
  """This process's first shard of `x` as NumPy: the whole value when replicated,
  replica 0's row under pmap. Reading one shard avoids a slicing program per leaf.
  """
  if isinstance(x, jax.Array):
    return np.asarray(x.addressable_shards[0].data)
  return np.asarray(x)


MODES = ("jit", "pmap", "fsdp")


def make_parallel(config) -> MeshParallel | FsdpParallel | PmapParallel:
  """`config.parallel` (one of `MODES`) over `config.num_devices` devices (0: all)."""
  mode = config.parallel
  count = config.num_devices
  if mode in ("jit", "fsdp"):
    devices = jax.devices()
  elif mode == "pmap":
    if jax.process_count() > 1:
      # pmap here spans local devices only; multi-host runs are tested with
      # the mesh modes, whose arrays span every process.
      raise ConfigError(
          f"config.parallel='pmap' runs on one process, got "
          f"{jax.process_count()} processes; use 'jit' or 'fsdp' for "
          "multi-host runs"
      )
    devices = jax.local_devices()
  else:
    raise ConfigError(
        f"config.parallel={mode!r}; use 'jit' (device mesh), 'pmap' or 'fsdp'"
    )
  if count:
    if count > len(devices):
      raise ConfigError(
          f"config.num_devices={count} but only {len(devices)} devices exist"
      )
    devices = devices[:count]
  if mode == "jit":
    return MeshParallel(devices)
  if mode == "fsdp":
    return FsdpParallel(devices)
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

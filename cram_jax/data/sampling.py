"""Deterministic epoch order, sharding and batching on top of `grain`.

All pipelines in `cram_jax.data` share one recipe, so that determinism,
resumption and multi-host sharding are argued once:

1. The element at global position `i` of the stream is a pure function of
   `i`: epoch `e = i // per_epoch`, position `p = i % per_epoch` inside this
   process's shard of that epoch, record `r = order_e[shard_index + p *
   shard_count]`. In training `order_e` is a permutation drawn from
   `(seed, e)`, the same on every process, so the `shard_count` shards of an
   epoch are disjoint and cover it; in evaluation `order_e` is the identity.
2. The random transformation of record `r` in epoch `e` gets its own
   `np.random.Generator` seeded by `(seed, e, r)`: the augmentation does not
   depend on batch size, shard count, threads or where the run was resumed.
3. Training keeps `floor(N / shard_count / batch_size)` full batches per
   epoch (PyTorch's `drop_last=True`, as in the CrAM reference); the few
   records left over change from epoch to epoch. Evaluation keeps every
   record once and pads each shard to whole batches with zero examples whose
   `mask` is False and `index` is -1, so all batches have the same shape and
   every process runs the same number of steps.

The result is a `grain.MapDataset` of batches, so an iterator's state is just
the next batch number (`{'next_index': k}`): `get_state()`/`set_state()`
resume exactly.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

Example = dict[str, Any]
# transform(example, rng) -> dict of numpy arrays; rng is None in evaluation.
Transform = Callable[[Mapping[str, Any], np.random.Generator | None], Example]

# Distinct tags keep the shuffle stream and the augmentation stream of the
# same seed independent.
_SHUFFLE_TAG = 0x5EED0001
_AUGMENT_TAG = 0x5EED0002


def check_int(
    owner: str, name: str, value: Any, *, minimum: int | None = None
) -> int:
  """Returns `value` as an int, or raises naming `owner` and `name`.

  Raises:
    TypeError: `value` is not an integer (floats such as 32.0 and bools
      included: they are mistakes, not sizes).
    ValueError: `value < minimum`.
  """
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (int, np.integer)
  ):
    raise TypeError(
        f'{owner}: {name}={value!r} must be an int, not'
        f' {type(value).__name__}'
    )
  if minimum is not None and value < minimum:
    raise ValueError(f'{owner}: {name}={value!r} must be >= {minimum}')
  return int(value)


def check_bool(owner: str, name: str, value: Any) -> bool:
  """Returns `value` as a bool, or raises TypeError naming `owner` and `name`."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(
        f'{owner}: {name}={value!r} must be True or False, not'
        f' {type(value).__name__}'
    )
  return bool(value)


def check_sharding(
    shard_index: int, shard_count: int, owner: str = 'check_sharding'
) -> None:
  """Raises unless `shard_index` and `shard_count` are ints, `0 <= index < count`."""
  check_int(owner, 'shard_count', shard_count, minimum=1)
  check_int(owner, 'shard_index', shard_index)
  if not 0 <= shard_index < shard_count:
    raise ValueError(
        f'{owner}: shard_index={shard_index} must be in [0,'
        f' shard_count={shard_count})'
    )


def _examples_per_epoch(
    owner: str, num_records: int, batch_size: int, train: bool, shard_count: int
) -> int:
  check_int(owner, 'num_records', num_records, minimum=0)
  check_int(owner, 'batch_size', batch_size, minimum=1)
  check_bool(owner, 'train', train)
  check_int(owner, 'shard_count', shard_count, minimum=1)
  per_shard, rest = divmod(num_records, shard_count)
  if train:
    steps = per_shard // batch_size
    if steps == 0:
      raise ValueError(
          f'batch_size={batch_size} is larger than the {per_shard}'
          f' training examples of each of the shard_count={shard_count}'
          f' shards ({num_records} examples in all)'
      )
    return steps * batch_size
  per_shard += rest > 0
  return -(-per_shard // batch_size) * batch_size


def examples_per_epoch(
    num_records: int, *, batch_size: int, train: bool, shard_count: int = 1
) -> int:
  """Number of stream positions one process sees per epoch.

  Args:
    num_records: size of the split.
    batch_size: per-process batch size.
    train: training drops incomplete batches; evaluation pads them.
    shard_count: number of processes sharing the split.

  Returns:
    A multiple of `batch_size`.
  """
  return _examples_per_epoch(
      'examples_per_epoch', num_records, batch_size, train, shard_count
  )


def steps_per_epoch(
    num_records: int, *, batch_size: int, train: bool, shard_count: int = 1
) -> int:
  """Number of batches per epoch on each process (see module docstring).

  Raises:
    TypeError: an argument of the wrong type (e.g. `batch_size=32.0`).
    ValueError: `batch_size < 1`, `shard_count < 1`, `num_records < 0`, or
      (training) fewer records per shard than `batch_size`.
  """
  return (
      _examples_per_epoch(
          'steps_per_epoch', num_records, batch_size, train, shard_count
      )
      // batch_size
  )


@dataclasses.dataclass
class EpochOrder:
  """Maps a global stream position to `(epoch, record)`; record -1 = padding.

  Attributes:
    num_records: size of the split.
    per_epoch: stream positions per epoch for this shard.
    train: shuffle each epoch (True) or read in record order (False).
    seed: shuffle seed, shared by all shards.
    shard_index: this process's shard.
    shard_count: number of shards.
  """

  num_records: int
  per_epoch: int
  train: bool
  seed: int
  shard_index: int = 0
  shard_count: int = 1

  def __post_init__(self):
    self._orders: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def order(self, epoch: int) -> np.ndarray:
    """Returns the permutation of records for `epoch` (training)."""
    with self._lock:
      order = self._orders.get(epoch)
      if order is None:
        rng = np.random.default_rng([_SHUFFLE_TAG, self.seed, epoch])
        order = rng.permutation(self.num_records)
        # Two epochs suffice: the stream moves forward, and prefetch
        # threads only straddle one epoch boundary.
        self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
        self._orders[epoch] = order
      return order

  def __call__(self, position: int, unused_element: Any = None):
    epoch, p = divmod(int(position), self.per_epoch)
    slot = self.shard_index + p * self.shard_count
    if slot >= self.num_records:
      return epoch, -1
    if self.train:
      return epoch, int(self.order(epoch)[slot])
    return epoch, slot

  def __getstate__(self):
    state = dict(self.__dict__)
    del state['_orders'], state['_lock']
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self.__post_init__()


def zeros_like_example(example: Mapping[str, Any]) -> Example:
  """Returns an all-zero copy of a flat dict of arrays (padding element)."""
  return {k: np.zeros_like(np.asarray(v)) for k, v in example.items()}


@dataclasses.dataclass
class ReadAndTransform:
  """Reads record `r` and applies `transform` with the `(seed, epoch, r)` RNG.

  Attributes:
    source: random-access sequence of raw examples.
    transform: `transform(example, rng)`; `rng` is None unless `train`.
    seed: augmentation seed.
    train: whether to pass a random generator.
    padding: optional factory for the padding element; default: the
      transform of record 0, zeroed.
  """

  source: Sequence[Mapping[str, Any]]
  transform: Transform
  seed: int
  train: bool
  padding: Callable[[], Example] | None = None

  def __post_init__(self):
    self._padding_cache: Example | None = None

  def _padding(self) -> Example:
    if self._padding_cache is None:
      if self.padding is not None:
        pad = self.padding()
      else:
        pad = zeros_like_example(self.transform(self.source[0], None))
      pad['index'] = np.int32(-1)
      pad['mask'] = np.bool_(False)
      self._padding_cache = pad
    return self._padding_cache

  def __call__(self, ref: tuple[int, int]) -> Example:
    epoch, record = ref
    if record < 0:
      return dict(self._padding())
    rng = None
    if self.train:
      rng = np.random.default_rng([_AUGMENT_TAG, self.seed, epoch, record])
    out = dict(self.transform(self.source[record], rng))
    out['index'] = np.int32(record)
    out['mask'] = np.bool_(True)
    return out

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_padding_cache'] = None
    return state


def check_args(
    owner: str,
    *,
    batch_size: Any,
    train: Any,
    seed: Any,
    shard_index: Any,
    shard_count: Any,
    num_epochs: Any,
    source: Any,
) -> None:
  """Checks the arguments every pipeline shares; messages name `owner`.

  Raises:
    TypeError: an argument of the wrong type (`batch_size=32.0`, `train=None`,
      `num_epochs=1.5`, a `source` without `len` and indexing, ...).
    ValueError: an int out of range (`batch_size < 1`, `seed < 0`,
      `num_epochs < 1`, `shard_index` outside `[0, shard_count)`).
  """
  check_int(owner, 'batch_size', batch_size, minimum=1)
  check_bool(owner, 'train', train)
  if isinstance(seed, (bool, np.bool_)) or not isinstance(
      seed, (int, np.integer)
  ):
    raise TypeError(
        f'{owner}: seed={seed!r} must be a non-negative integer, not'
        f' {type(seed).__name__}'
    )
  if seed < 0:
    raise ValueError(f'{owner}: seed={seed!r} must be a non-negative integer')
  check_sharding(shard_index, shard_count, owner)
  if num_epochs is not None:
    check_int(owner, 'num_epochs', num_epochs, minimum=1)
  if source is not None and not (
      hasattr(source, '__len__') and hasattr(source, '__getitem__')
  ):
    raise TypeError(
        f'{owner}: source must be a random-access sequence of examples (with'
        f' len() and [i]), got {type(source).__name__}'
    )


def batched_dataset(
    source: Sequence[Mapping[str, Any]],
    transform: Transform,
    *,
    batch_size: int,
    train: bool,
    seed: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    padding: Callable[[], Example] | None = None,
) -> grain.MapDataset:
  """Builds the batched, sharded, deterministic dataset described above.

  Args:
    source: random-access sequence of raw examples (e.g. a TFDS
      `data_source`).
    transform: `transform(example, rng) -> dict of numpy arrays`; `rng` is a
      `np.random.Generator` in training and None in evaluation.
    batch_size: examples per batch on this process.
    train: shuffle per epoch, augment, drop incomplete batches; else read in
      order, no RNG, pad the last batch.
    seed: seed of the shuffle and of the augmentation; non-negative.
    shard_index: index of this process, in `[0, shard_count)`.
    shard_count: number of processes reading disjoint shards.
    num_epochs: epochs to produce; None means forever in training and one
      epoch in evaluation.
    padding: optional factory of the padding element (evaluation).

  Returns:
    A `grain.MapDataset` whose elements are dicts of stacked numpy arrays,
    each with `index` (int32 record index, -1 for padding) and `mask`
    (bool, False for padding).
  """
  check_args(
      'batched_dataset',
      batch_size=batch_size,
      train=train,
      seed=seed,
      shard_index=shard_index,
      shard_count=shard_count,
      num_epochs=num_epochs,
      source=source,
  )
  if num_epochs is None and not train:
    num_epochs = 1
  num_records = len(source)
  if num_records == 0:
    raise ValueError('batched_dataset: the source has no examples')
  per_epoch = _examples_per_epoch(
      'batched_dataset', num_records, batch_size, train, shard_count
  )
  order = EpochOrder(
      num_records=num_records,
      per_epoch=per_epoch,
      train=train,
      seed=int(seed),
      shard_index=shard_index,
      shard_count=shard_count,
  )
  ds = grain.MapDataset.range(per_epoch).repeat(num_epochs)
  ds = ds.map_with_index(order)
  ds = ds.map(
      ReadAndTransform(
          source=source,
          transform=transform,
          seed=int(seed),
          train=train,
          padding=padding,
      )
  )
  return ds.batch(batch_size, drop_remainder=True)


def check_iterator_args(
    owner: str,
    *,
    num_threads: Any,
    prefetch_buffer_size: Any,
    worker_count: Any,
) -> None:
  """Raises TypeError/ValueError unless the three are ints >= 0."""
  check_int(owner, 'num_threads', num_threads, minimum=0)
  check_int(owner, 'prefetch_buffer_size', prefetch_buffer_size, minimum=0)
  check_int(owner, 'worker_count', worker_count, minimum=0)


def to_iterator(
    dataset: grain.MapDataset,
    *,
    num_threads: int = 0,
    prefetch_buffer_size: int = 4,
    worker_count: int = 0,
) -> grain.DatasetIterator:
  """Returns a checkpointable iterator over a batched `MapDataset`.

  Args:
    dataset: e.g. from `batched_dataset`.
    num_threads: threads computing batches ahead (0: in the caller's
      thread). Output order does not depend on it.
    prefetch_buffer_size: batches computed ahead when `num_threads > 0`.
    worker_count: worker processes (`grain` multiprocessing prefetch); 0
      keeps everything in this process.

  Returns:
    A `grain.DatasetIterator`: `next(it)`, `it.get_state()`,
    `it.set_state(state)`.
  """
  check_iterator_args(
      'to_iterator',
      num_threads=num_threads,
      prefetch_buffer_size=prefetch_buffer_size,
      worker_count=worker_count,
  )
  read_options = grain.ReadOptions(
      num_threads=num_threads,
      prefetch_buffer_size=prefetch_buffer_size if num_threads else 0,
  )
  ds = dataset.to_iter_dataset(read_options)
  if worker_count:
    # grain's workers read absl flags, which only `absl.app.run` parses;
    # outside it, accept the defaults instead of failing.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(ds)

"""One entry point for every dataset: `make_pipeline` / `make_dataset`.

Example:
  >>> from cram_jax import data
  >>> it = data.make_pipeline('digits', 'train', batch_size=32, train=True,
  ...                         seed=10, data_dir='/tmp/tfds')
  >>> batch = next(it)            # {'image': (32, 8, 8, 1) float32, ...}
  >>> state = it.get_state()      # save with the model checkpoint
  >>> it.set_state(state)         # ... and resume exactly there
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain

from cram_jax.data import sampling, text, vision

# Dataset options (`**options`) each family accepts, for one clear error.
_VISION_OPTIONS = ('normalize',)
_IMAGENET_OPTIONS = ('normalize', 'image_size', 'resize_size', 'scale', 'ratio')
_TEXT_OPTIONS = (
    'vocab_file',
    'lowercase',
    'max_seq_length',
    'doc_stride',
    'max_query_length',
)


def _supported_names() -> str:
  return (
      f'{list(vision.VISION_DATASETS)},'
      f' {["glue/" + t for t in text.GLUE_TEXT_FIELDS]} or'
      " 'squad/v1.1'"
  )


def _family(owner: str, name: Any) -> str:
  """`'vision'` or `'text'` for a dataset name; raises on anything else."""
  if not isinstance(name, str):
    raise TypeError(
        f'{owner}: name={name!r} must be a dataset name string; use one of'
        f' {_supported_names()}'
    )
  base = name.split('/')[0].split(':')[0]
  if base in vision.VISION_DATASETS:
    return 'vision'
  config = name.split(':')[0].split('/')[1:]
  if base == 'glue' and len(config) == 1 and config[0] in text.GLUE_TEXT_FIELDS:
    return 'text'
  # SQuAD v2.0 has unanswerable questions, which the windows do not model.
  if base == 'squad' and config in ([], ['v1.1']):
    return 'text'
  raise ValueError(
      f'{owner}: name={name!r} is not supported; use one of'
      f' {_supported_names()}'
  )


def _build(
    owner: str,
    name: str,
    split: str,
    common: dict[str, Any],
    options: dict[str, Any],
) -> grain.MapDataset:
  """Checks every argument, then builds the dataset (nothing opened before)."""
  family = _family(owner, name)
  if not isinstance(split, str):
    raise TypeError(
        f'{owner}: split={split!r} must be a TFDS split string such as'
        " 'train', 'test' or 'validation[:10%]'"
    )
  sampling.check_args(
      owner,
      **{k: common[k] for k in common if k not in ('data_dir',)},
  )
  data_dir = common['data_dir']
  if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
    raise TypeError(
        f'{owner}: data_dir={data_dir!r} must be a path (str or'
        ' os.PathLike) or None'
    )
  base = name.split('/')[0].split(':')[0]
  if family == 'text':
    allowed = _TEXT_OPTIONS
  elif base == 'imagenet2012':
    allowed = _IMAGENET_OPTIONS
  else:
    allowed = _VISION_OPTIONS
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(
        f'{owner}: options {unknown} are not supported for name={name!r};'
        f' its options are {list(allowed)}'
    )
  if family == 'vision':
    return vision.make_vision_dataset(base, split, **common, **options)
  return text.make_text_dataset(name, split, **common, **options)


def make_dataset(
    name: str,
    split: str,
    *,
    batch_size: int,
    train: bool,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    source: Sequence[Mapping[str, Any]] | None = None,
    **options,
) -> grain.MapDataset:
  """Returns the batched `grain.MapDataset` of a dataset (random access).

  `len(ds)` is the number of batches when `num_epochs` is finite; `ds[k]` is
  batch `k`. Arguments and errors as in `make_pipeline`.
  """
  common = dict(
      batch_size=batch_size,
      train=train,
      seed=seed,
      data_dir=data_dir,
      shard_index=shard_index,
      shard_count=shard_count,
      num_epochs=num_epochs,
      source=source,
  )
  return _build('make_dataset', name, split, common, options)


def make_pipeline(
    name: str,
    split: str,
    *,
    batch_size: int,
    train: bool,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    num_threads: int = 0,
    prefetch_buffer_size: int = 4,
    worker_count: int = 0,
    source: Sequence[Mapping[str, Any]] | None = None,
    **options,
) -> grain.DatasetIterator:
  """Returns a deterministic, checkpointable iterator of numpy batches.

  Batches are dicts of numpy arrays with a leading `batch_size` axis. Every
  batch has `index` (int32 record index in the split, -1 for padding) and
  `mask` (bool, False for padding), plus, by dataset:

  - `cifar10`, `cifar100`, `digits`, `imagenet2012`: `image` (float32 NHWC,
    normalised; uint8 with `normalize=False`), `label` (int32).
  - `glue/<task>`: `input_ids`, `token_type_ids`, `attention_mask` (int32,
    `max_seq_length`), `label`.
  - `squad/v1.1`: the same inputs, `start_positions`, `end_positions`,
    `example_index`; evaluation adds `offsets`, `token_is_max_context`.

  Training (`train=True`) shuffles every epoch with `(seed, epoch)`,
  augments record `r` of epoch `e` with an RNG seeded by `(seed, e, r)`, and
  keeps whole batches only. Evaluation reads in order, once by default, and
  pads the last batch (`mask` False). See `cram_jax.data.sampling`.

  Args:
    name: `'cifar10'`, `'cifar100'`, `'imagenet2012'`, `'digits'`,
      `'glue/<task>'` (sst2, mnli, qnli, qqp, cola, mrpc, stsb, rte, wnli,
      ax) or `'squad/v1.1'`.
    split: TFDS split, e.g. `'train'`, `'test'`, `'validation'`,
      `'train[:90%]'`.
    batch_size: examples per batch on this process.
    train: training (shuffle, augment, drop remainder) or evaluation.
    seed: non-negative seed of the shuffle and the augmentation; the same on
      all processes.
    data_dir: TFDS data directory; default `$CRAM_JAX_DATA_DIR`,
      `$TFDS_DATA_DIR` or `~/tensorflow_datasets`.
    shard_index: this process's shard, e.g. `jax.process_index()`.
    shard_count: number of shards, e.g. `jax.process_count()`.
    num_epochs: number of passes; None: forever (train) or once (eval).
    num_threads: threads computing batches ahead (0: none).
    prefetch_buffer_size: batches computed ahead when `num_threads > 0`.
    worker_count: `grain` worker processes (0: none).
    source: random-access sequence of raw examples to use instead of
      opening TFDS (tests, benchmarks, custom data).
    **options: dataset options: `normalize` (vision); `image_size`,
      `resize_size`, `scale`, `ratio` (imagenet2012); `vocab_file`
      (required), `lowercase`, `max_seq_length`, `doc_stride`,
      `max_query_length` (text).

  Returns:
    A `grain.DatasetIterator` with `get_state()` / `set_state(state)`; a
    state restores into an iterator made with the same arguments (its
    layout depends on `worker_count`).

  Raises:
    FileNotFoundError: the dataset is not prepared in `data_dir` (the
      message says how to prepare it).
    TypeError: an argument of the wrong type, e.g. `name=None`,
      `batch_size=32.0`, `train=None`, `num_threads=1.5`. Checked before
      anything is opened or built.
    ValueError: an unknown name, split or option, or a value out of range
      (`batch_size=0`, `seed=-1`, `num_epochs=0`, `worker_count=-1`, ...).
  """
  sampling.check_iterator_args(
      'make_pipeline',
      num_threads=num_threads,
      prefetch_buffer_size=prefetch_buffer_size,
      worker_count=worker_count,
  )
  common = dict(
      batch_size=batch_size,
      train=train,
      seed=seed,
      data_dir=data_dir,
      shard_index=shard_index,
      shard_count=shard_count,
      num_epochs=num_epochs,
      source=source,
  )
  dataset = _build('make_pipeline', name, split, common, options)
  return sampling.to_iterator(
      dataset,
      num_threads=num_threads,
      prefetch_buffer_size=prefetch_buffer_size,
      worker_count=worker_count,
  )

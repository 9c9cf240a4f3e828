"""Opening tensorflow-datasets splits as random-access `data_source`s.

Every pipeline in `cram_jax.data` reads through `open_source`, which returns a
TFDS `ArrayRecordDataSource` (a `Sequence` of decoded example dicts) and turns
the many ways TFDS can fail on a missing or unprepared dataset into one
`FileNotFoundError` that says how to prepare it. TensorFlow is not needed to
read ArrayRecord data.

Where data lives: `data_dir` argument, else `$CRAM_JAX_DATA_DIR`, else
`$TFDS_DATA_DIR`, else `~/tensorflow_datasets` (see `default_data_dir`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds

DATA_DIR_ENV = 'CRAM_JAX_DATA_DIR'

# TFDS imports its legacy builder packages lazily, and `tfds.builder('glue')`
# does not trigger that import by itself: touch the class once before use.
_LAZY_BUILDERS = {
    'glue': lambda: tfds.text.Glue,
    'squad': lambda: tfds.question_answering.Squad,
}

_IMAGENET_HELP = (
    'ImageNet cannot be downloaded automatically: get ILSVRC2012_img_train.tar'
    ' and ILSVRC2012_img_val.tar from https://image-net.org (an account is'
    ' needed), put them in a manual_dir, then run\n'
    '  tfds build imagenet2012 --data_dir={data_dir} --manual_dir=<dir with the'
    ' tars> --file_format=array_record\n'
    'or, in Python,\n'
    "  tfds.builder('imagenet2012', data_dir='{data_dir}').download_and_prepare("
    "file_format='array_record',"
    ' download_config=tfds.download.DownloadConfig(manual_dir=<dir with the'
    ' tars>))'
)

_GENERIC_HELP = (
    'Prepare it once (needs network, and TensorFlow for datasets whose images'
    ' TFDS encodes itself, e.g. cifar10) with\n'
    '  tfds build {name} --data_dir={data_dir} --file_format=array_record\n'
    'or, in Python,\n'
    "  tfds.builder('{name}', data_dir='{data_dir}').download_and_prepare("
    "file_format='array_record')\n"
    'then copy the data_dir to this machine if it was built elsewhere.'
)


def default_data_dir() -> str:
  """Returns the directory datasets are read from when none is given.

  Order: `$CRAM_JAX_DATA_DIR`, `$TFDS_DATA_DIR`, `~/tensorflow_datasets`.
  """
  for env in (DATA_DIR_ENV, 'TFDS_DATA_DIR'):
    if os.environ.get(env):
      return os.path.expanduser(os.environ[env])
  return os.path.expanduser('~/tensorflow_datasets')


def resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
  """Returns `data_dir` as a string, or `default_data_dir()` if it is None."""
  if data_dir is None:
    return default_data_dir()
  if not isinstance(data_dir, (str, os.PathLike)):
    raise TypeError(
        f'data_dir={data_dir!r} must be a path (str or os.PathLike) or None'
    )
  return os.path.expanduser(os.fspath(data_dir))


def how_to_prepare(name: str, data_dir: str) -> str:
  """Returns the instructions for preparing dataset `name` in `data_dir`."""
  base = name.split('/')[0].split(':')[0]
  if base == 'imagenet2012':
    return _IMAGENET_HELP.format(data_dir=data_dir)
  if base == 'digits':
    return (
        f"Call cram_jax.data.digits.prepare_digits(data_dir='{data_dir}');"
        ' it runs offline.'
    )
  return _GENERIC_HELP.format(name=name, data_dir=data_dir)


def _builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """Returns the TFDS builder for `name`, with a short error if unknown."""
  base = name.split('/')[0].split(':')[0]
  if base in _LAZY_BUILDERS:
    _LAZY_BUILDERS[base]()
  try:
    return tfds.builder(name, data_dir=data_dir, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(
        f'open_source: unknown TFDS dataset name={name!r} (expected e.g.'
        " 'cifar10', 'imagenet2012', 'glue/sst2', 'squad/v1.1', 'digits')"
    ) from None


def open_source(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    decoders: Any = None,
) -> Sequence[dict[str, Any]]:
  """Opens one split of a prepared TFDS dataset for random access.

  Nothing is downloaded: a dataset that is not prepared in `data_dir` raises
  `FileNotFoundError` with the commands that prepare it. The exception is
  `digits`, which is built offline from scikit-learn on first use.

  Args:
    name: TFDS name, optionally with config and version, e.g. `'cifar10'`,
      `'glue/sst2'`, `'squad/v1.1'`.
    split: split name or TFDS slice, e.g. `'train'`, `'validation[:10%]'`.
    data_dir: root of the TFDS data; default `default_data_dir()`.
    decoders: optional TFDS decoders, e.g. `{'image':
      tfds.decode.SkipDecoding()}`.

  Returns:
    A sequence of example dicts (numpy arrays, `bytes`/`str` for text).

  Raises:
    FileNotFoundError: the dataset is not prepared in `data_dir`.
    ValueError: unknown dataset name or split, or data in a format without
      random access.
  """
  if not isinstance(name, str):
    raise TypeError(
        f'open_source: name={name!r} must be a TFDS name string such as'
        " 'cifar10' or 'glue/sst2'"
    )
  if not isinstance(split, str):
    raise TypeError(
        f'open_source: split={split!r} must be a split string such as'
        " 'train' or 'validation[:10%]'"
    )
  data_dir = resolve_data_dir(data_dir)
  if name.split('/')[0].split(':')[0] == 'digits':
    # Also registers the `digits` builder with TFDS.
    from cram_jax.data import digits  # pylint: disable=g-import-not-at-top

    digits.prepare_digits(data_dir)
  builder = _builder(name, data_dir)
  try:
    return builder.as_data_source(split=split, decoders=decoders)
  except Exception as error:  # pylint: disable=broad-except
    # TFDS fails in several unhelpful ways on an absent dataset; decide
    # from the directory instead of from the exception.
    if not builder.is_prepared():
      raise FileNotFoundError(
          f'open_source: dataset {name!r} is not prepared in'
          f' data_dir={data_dir!r} (looked for {builder.data_path}).\n'
          + how_to_prepare(name, data_dir)
      ) from None
    if isinstance(error, NotImplementedError):
      raise ValueError(
          f'open_source: dataset {name!r} in {builder.data_path} has no'
          ' ArrayRecord files (it was built for tf.data); rebuild it'
          ' with file_format=array_record.\n' + how_to_prepare(name, data_dir)
      ) from None
    if isinstance(error, (KeyError, ValueError)):
      splits = sorted(builder.info.splits.keys())
      raise ValueError(
          f'open_source: split={split!r} is not valid for {name!r};'
          f' available splits: {splits} ({error})'
      ) from None
    raise

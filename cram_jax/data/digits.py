"""`digits`: scikit-learn's handwritten digits as a TFDS ArrayRecord dataset.

The embedded default dataset: real data (1797 8x8 grey images of the digits
0-9 from the UCI optical recognition set, bundled with scikit-learn), so the
whole stack (TFDS `data_source` -> grain -> model) runs offline and in
seconds.

- `image`: `(8, 8, 1)` uint8. scikit-learn stores 17 grey levels 0..16; they
  are mapped to 0..255 by `(v * 255 + 8) // 16` (rounded, 16 -> 255).
- `label`: `ClassLabel(num_classes=10)`.
- `sklearn_index`: the row in `sklearn.datasets.load_digits()`, for tracing.
- Splits: `train` 1437 and `test` 360 examples, from a fixed permutation
  (`np.random.default_rng(0).permutation(1797)`: the first 1437 rows train).

Preparation writes ArrayRecord files with `download_and_prepare(
file_format='array_record')`; nothing is downloaded (GCS metadata look-ups
are off) and TensorFlow is not needed, because the images are PNG-encoded
with PIL before TFDS sees them.
"""

from __future__ import annotations

import io
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from cram_jax.data import sources

NUM_EXAMPLES = 1797
NUM_TRAIN = 1437
SPLIT_SEED = 0


def _png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image, mode='L').save(buffer, format='PNG')
  return buffer.getvalue()


def split_indices(split: str) -> np.ndarray:
  """Rows of `load_digits()` in `split` (`'train'` or `'test'`), sorted."""
  order = np.random.default_rng(SPLIT_SEED).permutation(NUM_EXAMPLES)
  if split == 'train':
    return np.sort(order[:NUM_TRAIN])
  if split == 'test':
    return np.sort(order[NUM_TRAIN:])
  raise ValueError(f"split_indices: split={split!r} is not 'train' or 'test'")


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Maps scikit-learn's grey levels 0..16 to 0..255 (rounded half up)."""
  levels = np.asarray(images).astype(np.int64)
  return ((levels * 255 + 8) // 16).astype(np.uint8)


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits (1437 train / 360 test)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  # TFDS derives this from the package via `importlib_resources`, which is
  # not a dependency; it is only used to look for a checksums file here.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            'Optical recognition of handwritten digits (UCI), as bundled'
            ' with scikit-learn: 8x8 images, grey levels 0..16 scaled to'
            ' 0..255.'
        ),
        features=tfds.features.FeaturesDict(
            {
                'image': tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
                'label': tfds.features.ClassLabel(num_classes=10),
                'sklearn_index': tfds.features.Scalar(dtype=np.int32),
            }
        ),
        supervised_keys=('image', 'label'),
        homepage='https://archive.ics.uci.edu/dataset/80',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {
        'train': self._generate_examples('train'),
        'test': self._generate_examples('test'),
    }

  def _generate_examples(self, split):
    # Imported here: scikit-learn is only needed to build the dataset.
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

    digits = load_digits()
    images = to_uint8(digits.images)
    for row in split_indices(split):
      yield int(row), {
          'image': _png(images[row]),
          'label': int(digits.target[row]),
          'sklearn_index': int(row),
      }


def _check_writable(data_dir: str) -> None:
  """Raises, naming `data_dir`, unless the dataset can be written there."""
  if os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise NotADirectoryError(
        f'prepare_digits: data_dir={data_dir!r} is a file, not a directory'
    )
  try:
    os.makedirs(data_dir, exist_ok=True)
  except OSError as e:
    raise type(e)(
        e.errno,
        f'prepare_digits: cannot create data_dir={data_dir!r} ({e.strerror});'
        ' pass a writable directory, or set $CRAM_JAX_DATA_DIR',
    ) from None
  if not os.access(data_dir, os.W_OK | os.X_OK):
    raise PermissionError(
        f'prepare_digits: data_dir={data_dir!r} is not writable, and digits'
        ' is not prepared there yet; pass a writable directory, or set'
        ' $CRAM_JAX_DATA_DIR'
    )


def prepare_digits(data_dir: str | os.PathLike | None = None) -> Digits:
  """Builds `digits` as ArrayRecord in `data_dir` unless already there.

  Args:
    data_dir: TFDS data directory; default `sources.default_data_dir()`
      (`$CRAM_JAX_DATA_DIR`, `$TFDS_DATA_DIR` or `~/tensorflow_datasets`).

  Returns:
    The prepared builder; `builder.as_data_source('train')` reads it, as does
    `tfds.data_source('digits', split='train', data_dir=data_dir)`.

  Raises:
    TypeError: `data_dir` is not a path.
    OSError (NotADirectoryError, PermissionError, ...): `data_dir` is a file,
      cannot be created, or is not writable while digits is not prepared in
      it. The message names `data_dir`.
  """
  if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
    raise TypeError(
        f'prepare_digits: data_dir={data_dir!r} must be a path (str or'
        ' os.PathLike) or None'
    )
  data_dir = sources.resolve_data_dir(data_dir)
  builder = Digits(data_dir=data_dir, file_format='array_record')
  if not builder.is_prepared():
    _check_writable(data_dir)
    builder.download_and_prepare(
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
  return builder

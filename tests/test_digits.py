"""The `digits` TFDS builder: offline preparation to ArrayRecord, the split,
the pixel mapping, reading back through `tfds.data_source`, the pipeline."""

import pathlib
import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from cram_jax import data
from cram_jax.data import digits, vision


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """Prepares digits once for this module, with every network call failing."""
  path = tmp_path_factory.mktemp('tfds')
  original = socket.socket.connect

  def no_network(self, *args, **kwargs):
    raise OSError('network access during digits preparation')

  socket.socket.connect = no_network
  try:
    builder = data.prepare_digits(path)
  finally:
    socket.socket.connect = original
  assert builder.is_prepared()
  return str(path)


def test_files_are_array_record(data_dir):
  version_dir = pathlib.Path(data_dir) / 'digits' / '1.0.0'
  names = sorted(p.name for p in version_dir.iterdir())
  assert 'dataset_info.json' in names
  assert any(n.startswith('digits-train.array_record') for n in names)
  assert any(n.startswith('digits-test.array_record') for n in names)


def test_split_sizes_labels_and_pixels(data_dir):
  train = tfds.data_source(
      'digits', split='train', data_dir=data_dir, download=False
  )
  test = tfds.data_source(
      'digits', split='test', data_dir=data_dir, download=False
  )
  assert (len(train), len(test)) == (1437, 360)
  sk = load_digits()
  seen = []
  for source in (train, test):
    for i in range(len(source)):
      example = source[i]
      row = int(example['sklearn_index'])
      seen.append(row)
      assert (
          example['image'].shape == (8, 8, 1)
          and example['image'].dtype == np.uint8
      )
      assert int(example['label']) == sk.target[row]
      np.testing.assert_array_equal(
          example['image'][..., 0], digits.to_uint8(sk.images[row])
      )
  assert sorted(seen) == list(range(1797))  # disjoint and complete
  train_rows = {int(train[i]['sklearn_index']) for i in range(len(train))}
  assert train_rows == set(digits.split_indices('train').tolist())
  labels = [int(test[i]['label']) for i in range(len(test))]
  assert set(labels) == set(range(10))


def test_pixel_mapping():
  np.testing.assert_array_equal(
      digits.to_uint8(np.array([0, 1, 8, 15, 16])), [0, 16, 128, 239, 255]
  )


def test_split_is_fixed():
  a, b = digits.split_indices('train'), digits.split_indices('test')
  assert len(a) == 1437 and len(b) == 360 and not set(a) & set(b)
  np.testing.assert_array_equal(a, digits.split_indices('train'))
  with pytest.raises(ValueError, match="split='valid'"):
    digits.split_indices('valid')


def test_pipeline_and_env_default(data_dir, monkeypatch):
  monkeypatch.setenv('CRAM_JAX_DATA_DIR', data_dir)
  assert data.default_data_dir() == data_dir
  it = data.make_pipeline('digits', 'train', batch_size=32, train=True, seed=10)
  batch = next(it)
  assert (
      batch['image'].shape == (32, 8, 8, 1)
      and batch['image'].dtype == np.float32
  )
  assert batch['label'].dtype == np.int32
  assert set(batch['label'].tolist()) <= set(range(10))
  lo = -vision.DIGITS_MEAN[0] / vision.DIGITS_STD[0]
  hi = (1 - vision.DIGITS_MEAN[0]) / vision.DIGITS_STD[0]
  assert batch['image'].min() >= lo - 1e-5 and batch['image'].max() <= hi + 1e-5
  again = next(
      data.make_pipeline('digits', 'train', batch_size=32, train=True, seed=10)
  )
  np.testing.assert_array_equal(batch['image'], again['image'])
  evaluation = list(
      data.make_pipeline('digits', 'test', batch_size=100, train=False)
  )
  assert (
      len(evaluation) == 4
      and sum(int(b['mask'].sum()) for b in evaluation) == 360
  )


def test_training_shift_is_at_most_one_pixel(data_dir):
  source = data.open_source('digits', 'train', data_dir=data_dir)
  batch = next(
      data.make_pipeline(
          'digits',
          'train',
          batch_size=64,
          train=True,
          seed=1,
          data_dir=data_dir,
          normalize=False,
      )
  )
  for image, index in zip(batch['image'], batch['index']):
    raw = source[int(index)]['image']
    padded = np.pad(raw, ((1, 1), (1, 1), (0, 0)))
    crops = [padded[t : t + 8, c : c + 8] for t in range(3) for c in range(3)]
    assert any(np.array_equal(image, c) for c in crops)


def test_prepared_twice_gives_identical_records(data_dir, tmp_path):
  other = data.prepare_digits(tmp_path).as_data_source(split='test')
  first = tfds.data_source(
      'digits', split='test', data_dir=data_dir, download=False
  )
  for i in range(0, 360, 37):
    assert int(other[i]['sklearn_index']) == int(first[i]['sklearn_index'])
    np.testing.assert_array_equal(other[i]['image'], first[i]['image'])


def test_worker_processes_give_the_same_batches(data_dir):
  kwargs = dict(batch_size=16, train=True, seed=3, data_dir=data_dir)
  local = data.make_pipeline('digits', 'train', **kwargs)
  workers = data.make_pipeline('digits', 'train', worker_count=1, **kwargs)
  for _ in range(3):
    a, b = next(local), next(workers)
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['index'], b['index'])
  # The state layout depends on worker_count: restore with the same one.
  state = workers.get_state()
  resumed = data.make_pipeline('digits', 'train', worker_count=1, **kwargs)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)['index'], next(workers)['index'])


def test_prepare_digits_names_a_data_dir_it_cannot_use(tmp_path, monkeypatch):
  a_file = tmp_path / 'a_file'
  a_file.write_text('x')
  with pytest.raises(NotADirectoryError, match="data_dir='.*a_file' is a file"):
    data.prepare_digits(a_file)
  with pytest.raises(OSError, match="cannot create data_dir='.*a_file/sub'"):
    data.prepare_digits(a_file / 'sub')
  with pytest.raises(TypeError, match='data_dir=5 must be a path'):
    data.prepare_digits(5)
  # Root may write anywhere, so the permission check is driven directly.
  monkeypatch.setattr(digits.os, 'access', lambda path, mode: False)
  with pytest.raises(PermissionError, match="data_dir='.*ro' is not writable"):
    data.prepare_digits(tmp_path / 'ro')
  assert not list((tmp_path / 'ro').iterdir())  # nothing half-written

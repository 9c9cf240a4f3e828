"""Vision input pipelines: transforms against numpy oracles, and the grain
pipeline's determinism, resumption and sharding, on `tfds.testing.mock_data`.

`mock_data` supports `tfds.data_source` in TFDS 4.9.10: it patches
`as_data_source` to serve deterministic random examples (example `i` is drawn
from seed `i`; every split has `num_examples`), so no files are written. The
legacy builders (glue) need their module imported first, which
`cram_jax.data.sources` does.
"""

import contextlib
import itertools

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cram_jax import data
from cram_jax.data import sampling, vision

MOCK = tfds.testing.MockPolicy.USE_CODE


@contextlib.contextmanager
def mock(num_examples):
  with tfds.testing.mock_data(num_examples=num_examples, policy=MOCK):
    yield


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def normalized_bounds(mean, std):
  mean, std = np.asarray(mean), np.asarray(std)
  return (0 - mean) / std, (1 - mean) / std


def oracle_normalize(image, mean, std):
  return (image.astype(np.float64) / 255 - np.asarray(mean)) / np.asarray(std)


# ----------------------------------------------------------------------------
# Transforms.


def test_pad_crop_flip_matches_pad_then_slice():
  rng = np.random.default_rng(0)
  image = rng.integers(1, 256, size=(6, 7, 3), dtype=np.uint8)
  p = 2
  padded = np.pad(image, ((p, p), (p, p), (0, 0)))
  for top, left, flip in itertools.product(
      range(2 * p + 1), range(2 * p + 1), (0, 1)
  ):
    want = padded[top : top + 6, left : left + 7]
    if flip:
      want = want[:, ::-1]
    got = vision.pad_crop_flip(image, top, left, bool(flip), p)
    np.testing.assert_array_equal(got, want)


def test_pad_crop_flip_rejects_offsets_outside_padding():
  with pytest.raises(ValueError, match='top=9'):
    vision.pad_crop_flip(np.zeros((4, 4, 1), np.uint8), 9, 0, False, 4)


def test_normalize_values_and_bounds():
  image = np.array([[[0, 255, 128]]], np.uint8)
  got = vision.normalize(image, vision.CIFAR_MEAN, vision.CIFAR_STD)
  assert got.dtype == np.float32
  np.testing.assert_allclose(
      got,
      oracle_normalize(image, vision.CIFAR_MEAN, vision.CIFAR_STD),
      atol=1e-5,
  )


def test_random_resized_crop_box_within_scale_and_ratio():
  rng = np.random.default_rng(1)
  for _ in range(300):
    h, w = rng.integers(20, 400, size=2)
    top, left, ch, cw = vision.random_resized_crop_box(int(h), int(w), rng)
    assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
    assert ch > 0 and cw > 0
    area = ch * cw / (h * w)
    # Rounding of the sides moves area and ratio slightly.
    assert 0.08 * 0.8 <= area <= 1.0
    centred = (top, left) == ((h - ch) // 2, (w - cw) // 2)
    if not centred:
      assert 3 / 4 * 0.85 <= cw / ch <= 4 / 3 * 1.15


def test_random_resized_crop_box_falls_back_to_centre_crop():
  rng = np.random.default_rng(0)
  # attempts=0 forces the fallback; a 10x100 image is wider than 4:3.
  box = vision.random_resized_crop_box(10, 100, rng, attempts=0)
  assert box == (0, (100 - 13) // 2, 10, 13)
  box = vision.random_resized_crop_box(100, 10, rng, attempts=0)
  assert box == ((100 - 13) // 2, 0, 13, 10)
  assert vision.random_resized_crop_box(30, 35, rng, attempts=0) == (
      0,
      0,
      30,
      35,
  )


def test_crop_resize_of_constant_region_is_constant():
  image = np.zeros((50, 60, 3), np.uint8)
  image[10:30, 20:50] = (10, 200, 30)
  out = vision.crop_resize(image, (10, 20, 20, 30), 224)
  assert out.shape == (224, 224, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, np.broadcast_to([10, 200, 30], out.shape))


def test_resize_shorter_center_crop():
  rng = np.random.default_rng(0)
  # Shorter side already 256: no resampling, so the crop is an exact slice.
  image = rng.integers(0, 256, size=(256, 300, 3), dtype=np.uint8)
  out = vision.resize_shorter_center_crop(image, 256, 224)
  np.testing.assert_array_equal(out, image[16:240, 38:262])
  for shape in [(13, 40, 3), (500, 375, 3), (37, 37, 3)]:
    out = vision.resize_shorter_center_crop(np.zeros(shape, np.uint8), 256, 224)
    assert out.shape == (224, 224, 3)


def test_as_rgb_handles_grey_and_encoded():
  import io

  from PIL import Image

  grey = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
  np.testing.assert_array_equal(vision.as_rgb(grey)[..., 2], grey[..., 0])
  buffer = io.BytesIO()
  Image.fromarray(grey[..., 0]).save(buffer, format='PNG')
  np.testing.assert_array_equal(
      vision.as_rgb(buffer.getvalue())[..., 0], grey[..., 0]
  )


# ----------------------------------------------------------------------------
# CIFAR pipelines on mock data.


def test_cifar_train_batch_is_crop_flip_of_source_images():
  with mock(16):
    source = data.open_source('cifar10', 'train')
    it = data.make_pipeline(
        'cifar10', 'train', batch_size=8, train=True, seed=3
    )
    batch = next(it)
  assert (
      batch['image'].shape == (8, 32, 32, 3)
      and batch['image'].dtype == np.float32
  )
  assert batch['label'].dtype == np.int32 and batch['mask'].all()
  lo, hi = normalized_bounds(vision.CIFAR_MEAN, vision.CIFAR_STD)
  assert (batch['image'] >= lo - 1e-5).all() and (
      batch['image'] <= hi + 1e-5
  ).all()
  padded_seen = False
  for image, label, index in zip(
      batch['image'], batch['label'], batch['index']
  ):
    raw = source[int(index)]['image']
    assert label == source[int(index)]['label']
    padded = np.pad(raw, ((4, 4), (4, 4), (0, 0)))
    matches = []
    for top, left, flip in itertools.product(range(9), range(9), (0, 1)):
      crop = padded[top : top + 32, left : left + 32]
      crop = crop[:, ::-1] if flip else crop
      want = oracle_normalize(crop, vision.CIFAR_MEAN, vision.CIFAR_STD)
      if np.allclose(image, want, atol=1e-5):
        matches.append((top, left, flip))
    assert matches, f'record {index}: not a padded crop/flip of the source'
    padded_seen |= any((t, left) != (4, 4) for t, left, _ in matches)
  assert padded_seen  # 8 draws from 81 offsets: some shift happened.


def test_cifar_eval_is_normalised_source_in_order_with_padding():
  with mock(10):
    source = data.open_source('cifar100', 'test')
    batches = take(
        data.make_pipeline('cifar100', 'test', batch_size=4, train=False), 3
    )
  images = np.concatenate([b['image'] for b in batches])
  index = np.concatenate([b['index'] for b in batches])
  mask = np.concatenate([b['mask'] for b in batches])
  np.testing.assert_array_equal(index, list(range(10)) + [-1, -1])
  np.testing.assert_array_equal(mask, [True] * 10 + [False] * 2)
  for i in range(10):
    want = oracle_normalize(
        source[i]['image'], vision.CIFAR_MEAN, vision.CIFAR_STD
    )
    np.testing.assert_allclose(images[i], want, atol=1e-5)
  assert not images[10:].any()


def test_cifar_uint8_output_when_not_normalised():
  with mock(4):
    batch = next(
        data.make_pipeline(
            'cifar10', 'train', batch_size=4, train=True, normalize=False
        )
    )
  assert batch['image'].dtype == np.uint8


def test_same_seed_same_batches_different_seed_differs():
  with mock(16):
    a = take(
        data.make_pipeline(
            'cifar10', 'train', batch_size=4, train=True, seed=7
        ),
        6,
    )
    b = take(
        data.make_pipeline(
            'cifar10', 'train', batch_size=4, train=True, seed=7
        ),
        6,
    )
    c = take(
        data.make_pipeline(
            'cifar10', 'train', batch_size=4, train=True, seed=8
        ),
        6,
    )
  assert_batches_equal(a, b)
  assert any(not np.array_equal(x['image'], y['image']) for x, y in zip(a, c))
  assert any(not np.array_equal(x['index'], y['index']) for x, y in zip(a, c))


@pytest.mark.parametrize('num_threads', [0, 2])
def test_resume_from_saved_state(num_threads):
  kwargs = dict(batch_size=4, train=True, seed=5, num_threads=num_threads)
  with mock(12):
    it = data.make_pipeline('cifar10', 'train', **kwargs)
    take(it, 2)
    state = it.get_state()
    # 3 batches per epoch: the continuation crosses two epoch boundaries.
    later = take(it, 5)
    fresh = data.make_pipeline('cifar10', 'train', **kwargs)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 5), later)


def test_epochs_are_permutations_and_reshuffled():
  with mock(12):
    it = data.make_pipeline(
        'cifar10', 'train', batch_size=4, train=True, seed=0
    )
    epochs = [
        np.concatenate([b['index'] for b in take(it, 3)]) for _ in range(3)
    ]
  for order in epochs:
    assert sorted(order) == list(range(12))
  assert not np.array_equal(epochs[0], epochs[1])


def test_two_shards_cover_each_example_once_per_epoch():
  n, batch = 24, 4
  with mock(n):
    shards = [
        data.make_pipeline(
            'cifar10',
            'train',
            batch_size=batch,
            train=True,
            seed=1,
            shard_index=s,
            shard_count=2,
        )
        for s in range(2)
    ]
    for _ in range(2):  # two epochs
      seen = [
          np.concatenate([b['index'] for b in take(it, 3)]) for it in shards
      ]
      assert not set(seen[0]) & set(seen[1])
      assert sorted(np.concatenate(seen)) == list(range(n))


def test_two_eval_shards_cover_odd_split_with_equal_lengths():
  with mock(11):
    runs = [
        list(
            data.make_pipeline(
                'cifar10',
                'test',
                batch_size=4,
                train=False,
                shard_index=s,
                shard_count=2,
            )
        )
        for s in range(2)
    ]
  assert len(runs[0]) == len(runs[1]) == 2
  index = np.concatenate([b['index'] for r in runs for b in r])
  mask = np.concatenate([b['mask'] for r in runs for b in r])
  assert sorted(index[mask]) == list(range(11))
  assert (index[~mask] == -1).all()


def test_augmentation_does_not_depend_on_sharding():
  with mock(8):
    single = next(
        data.make_pipeline('cifar10', 'train', batch_size=8, train=True, seed=2)
    )
    halves = [
        take(
            data.make_pipeline(
                'cifar10',
                'train',
                batch_size=4,
                train=True,
                seed=2,
                shard_index=s,
                shard_count=2,
            ),
            1,
        )[0]
        for s in range(2)
    ]
  by_index = dict(zip(single['index'].tolist(), single['image']))
  for half in halves:
    for index, image in zip(half['index'].tolist(), half['image']):
      np.testing.assert_array_equal(image, by_index[index])


def test_steps_per_epoch():
  assert data.steps_per_epoch(50000, batch_size=128, train=True) == 390
  assert data.steps_per_epoch(10000, batch_size=128, train=False) == 79
  assert data.steps_per_epoch(11, batch_size=4, train=False, shard_count=2) == 2


def test_finite_epochs_and_random_access():
  with mock(12):
    ds = data.make_dataset(
        'cifar10', 'train', batch_size=4, train=True, num_epochs=2
    )
    assert len(ds) == 6
    batches = list(
        data.make_pipeline(
            'cifar10', 'train', batch_size=4, train=True, num_epochs=2
        )
    )
  assert len(batches) == 6
  np.testing.assert_array_equal(ds[4]['image'], batches[4]['image'])


def test_invalid_arguments_name_the_option():
  with mock(8):
    with pytest.raises(ValueError, match='shard_index=2'):
      data.make_pipeline(
          'cifar10',
          'train',
          batch_size=2,
          train=True,
          shard_index=2,
          shard_count=2,
      )
    with pytest.raises(ValueError, match='batch_size=16'):
      data.make_pipeline('cifar10', 'train', batch_size=16, train=True)
    with pytest.raises(ValueError, match='seed=-1'):
      data.make_pipeline('cifar10', 'train', batch_size=2, train=True, seed=-1)
  with pytest.raises(ValueError, match="name='mnist'"):
    data.make_pipeline('mnist', 'train', batch_size=2, train=True)


# ----------------------------------------------------------------------------
# ImageNet on mock data (random sizes between 5 and 50 pixels).


def test_imagenet_train_and_eval_batches():
  with mock(8):
    source = data.open_source('imagenet2012', 'validation')
    kwargs = dict(batch_size=4, train=True, seed=1)
    train = take(data.make_pipeline('imagenet2012', 'train', **kwargs), 2)
    again = take(data.make_pipeline('imagenet2012', 'train', **kwargs), 2)
    evaluation = next(
        data.make_pipeline(
            'imagenet2012', 'validation', batch_size=4, train=False
        )
    )
  assert_batches_equal(train, again)
  lo, hi = normalized_bounds(vision.IMAGENET_MEAN, vision.IMAGENET_STD)
  for batch in train + [evaluation]:
    assert batch['image'].shape == (4, 224, 224, 3)
    assert (
        batch['image'].dtype == np.float32 and batch['label'].dtype == np.int32
    )
    assert (batch['image'] >= lo - 1e-5).all() and (
        batch['image'] <= hi + 1e-5
    ).all()
  for image, index in zip(evaluation['image'], evaluation['index']):
    want = vision.resize_shorter_center_crop(source[int(index)]['image'])
    np.testing.assert_allclose(
        image,
        oracle_normalize(want, vision.IMAGENET_MEAN, vision.IMAGENET_STD),
        atol=1e-5,
    )


# ----------------------------------------------------------------------------
# Missing data.


def test_missing_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError, match='tfds build cifar10') as info:
    data.make_pipeline(
        'cifar10', 'train', batch_size=2, train=True, data_dir=tmp_path
    )
  assert 'array_record' in str(info.value)
  assert info.value.__cause__ is None and info.value.__suppress_context__


def test_missing_imagenet_mentions_manual_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match='manual_dir') as info:
    data.make_pipeline(
        'imagenet2012', 'train', batch_size=2, train=True, data_dir=tmp_path
    )
  assert 'ILSVRC2012_img_train.tar' in str(info.value)


def test_ready_order_is_picklable():
  import pickle

  order = sampling.EpochOrder(num_records=10, per_epoch=8, train=True, seed=1)
  clone = pickle.loads(pickle.dumps(order))
  assert [clone(i) for i in range(16)] == [order(i) for i in range(16)]


# ----------------------------------------------------------------------------
# Careless arguments: one clear error, before any file is opened.


@pytest.mark.parametrize(
    'kwargs, error, message',
    [
        (dict(name=None), TypeError, 'name=None must be a dataset name string'),
        (dict(name='CIFAR10'), ValueError, "name='CIFAR10' is not supported"),
        (dict(split=None), TypeError, 'split=None must be a TFDS split string'),
        (
            dict(batch_size=32.0),
            TypeError,
            'batch_size=32.0 must be an int, not float',
        ),
        (
            dict(batch_size=True),
            TypeError,
            'batch_size=True must be an int, not bool',
        ),
        (dict(batch_size='8'), TypeError, "batch_size='8' must be an int"),
        (dict(batch_size=0), ValueError, 'batch_size=0 must be >= 1'),
        (dict(batch_size=-4), ValueError, 'batch_size=-4 must be >= 1'),
        (dict(train=None), TypeError, 'train=None must be True or False'),
        (dict(train='yes'), TypeError, "train='yes' must be True or False"),
        (dict(seed=1.0), TypeError, 'seed=1.0 must be a non-negative integer'),
        (
            dict(seed=None),
            TypeError,
            'seed=None must be a non-negative integer',
        ),
        (dict(seed=-1), ValueError, 'seed=-1 must be a non-negative integer'),
        (dict(num_epochs=-1), ValueError, 'num_epochs=-1 must be >= 1'),
        (dict(num_epochs=2.0), TypeError, 'num_epochs=2.0 must be an int'),
        (dict(shard_count=0), ValueError, 'shard_count=0 must be >= 1'),
        (dict(shard_index=0.0), TypeError, 'shard_index=0.0 must be an int'),
        (
            dict(shard_index=3, shard_count=2),
            ValueError,
            r'shard_index=3 must be in \[0, shard_count=2\)',
        ),
        (dict(num_threads=1.5), TypeError, 'num_threads=1.5 must be an int'),
        (dict(num_threads=-1), ValueError, 'num_threads=-1 must be >= 0'),
        (
            dict(prefetch_buffer_size=-1),
            ValueError,
            'prefetch_buffer_size=-1 must be >= 0',
        ),
        (
            dict(worker_count=None),
            TypeError,
            'worker_count=None must be an int',
        ),
        (dict(data_dir=5), TypeError, 'data_dir=5 must be a path'),
        (dict(source=5), TypeError, 'source must be a random-access sequence'),
        (
            dict(foo=1),
            ValueError,
            r"options \['foo'\] are not supported for name='cifar10'; its options are \['normalize'\]",
        ),
        (
            dict(normalize='no'),
            TypeError,
            "normalize='no' must be True or False",
        ),
        (
            dict(name='imagenet2012', image_size=224.0),
            TypeError,
            'image_size=224.0 must be an int',
        ),
        (
            dict(name='imagenet2012', image_size=256, resize_size=224),
            ValueError,
            'resize_size=224 must be >= image_size=256',
        ),
        (
            dict(name='imagenet2012', scale=(1.0, 0.5)),
            ValueError,
            r'scale=\(1.0, 0.5\) must satisfy 0 < lo <= hi <= 1.0',
        ),
        (
            dict(name='imagenet2012', ratio=3),
            TypeError,
            'ratio=3 must be a pair of numbers',
        ),
    ],
)
def test_bad_arguments_fail_before_anything_is_opened(
    tmp_path, kwargs, error, message
):
  # `tmp_path` holds no dataset: a check that came after opening the source
  # would surface as FileNotFoundError instead.
  args = dict(
      name='cifar10', split='train', batch_size=4, train=True, data_dir=tmp_path
  )
  with pytest.raises(FileNotFoundError, match='is not prepared'):
    data.make_pipeline(**args)
  args.update(kwargs)
  with pytest.raises(error, match=message) as info:
    data.make_pipeline(**args)
  if not str(info.value).startswith(('ImageNetTransform', 'vision_transform')):
    assert str(info.value).startswith('make_pipeline: ')


def test_make_dataset_names_itself():
  with pytest.raises(TypeError, match='make_dataset: batch_size=2.0 must be'):
    data.make_dataset('digits', 'train', batch_size=2.0, train=True)


@pytest.mark.parametrize(
    'args, kwargs, error, message',
    [
        (
            (100,),
            dict(batch_size=0),
            ValueError,
            'steps_per_epoch: batch_size=0 must be >= 1',
        ),
        (
            (100,),
            dict(batch_size=2.0),
            TypeError,
            'steps_per_epoch: batch_size=2.0 must be an int',
        ),
        (
            (100,),
            dict(batch_size=True),
            TypeError,
            'batch_size=True must be an int, not bool',
        ),
        (
            (-5,),
            dict(batch_size=2),
            ValueError,
            'steps_per_epoch: num_records=-5 must be >= 0',
        ),
        (
            (None,),
            dict(batch_size=2),
            TypeError,
            'num_records=None must be an int',
        ),
        (
            (10,),
            dict(batch_size=2, shard_count=0),
            ValueError,
            'shard_count=0 must be >= 1',
        ),
        (
            (10,),
            dict(batch_size=2, train='yes'),
            TypeError,
            "train='yes' must be True or False",
        ),
        (
            (3,),
            dict(batch_size=4),
            ValueError,
            'batch_size=4 is larger than the 3 training examples',
        ),
    ],
)
def test_steps_per_epoch_rejects_bad_arguments(args, kwargs, error, message):
  kwargs = {'train': True, **kwargs}
  with pytest.raises(error, match=message):
    data.steps_per_epoch(*args, **kwargs)

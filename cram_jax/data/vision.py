"""Image transforms and pipelines: CIFAR-10/100, ImageNet, digits.

The transforms are plain numpy/PIL functions of one `uint8` HWC image, split
into a deterministic part (`pad_crop_flip`, `crop_resize`, ...) and a
sampling part that draws its parameters from a `np.random.Generator`, so tests
can check the deterministic part against a direct oracle.

Outputs: `image` float32 NHWC, normalised per channel as
`(x / 255 - mean) / std` (or the raw uint8 with `normalize=False`, to
normalise on the device), and `label` int32.

Normalisation constants (docs/method.md section 7): CIFAR-10 mean (0.4914, 0.4822,
0.4465), std (0.2023, 0.1994, 0.2010), the values of the CrAM reference.
CIFAR-100 uses the same constants, so one preprocessing serves both; its own
statistics (mean ~(0.507, 0.487, 0.441), std ~(0.267, 0.256, 0.276)) differ a
little, which the first BatchNorm absorbs. ImageNet: mean (0.485, 0.456,
0.406), std (0.229, 0.224, 0.225). Digits: mean 0.3055, std 0.3759, computed
once on the 1437 training images scaled to [0, 1].
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from cram_jax.data import sampling, sources

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS_MEAN = (0.3055,)
DIGITS_STD = (0.3759,)

VISION_DATASETS = ('cifar10', 'cifar100', 'imagenet2012', 'digits')


# ----------------------------------------------------------------------------
# Deterministic transforms.


def normalize(
    image: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
  """Returns `(image / 255 - mean) / std` as float32 (last axis = channels)."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  # One multiply-add instead of three passes over the image.
  scale = 1.0 / (255.0 * std)
  return image.astype(np.float32) * scale - mean / std


def pad_crop_flip(
    image: np.ndarray, top: int, left: int, flip: bool, padding: int
) -> np.ndarray:
  """Zero-pads by `padding`, crops the original size at (top, left), flips.

  Equivalent to `np.pad(image, padding)[top:top + H, left:left + W]`
  followed by a left-right flip if `flip`, without building the padded image.

  Args:
    image: HWC array.
    top: crop row in the padded image, in `[0, 2 * padding]`.
    left: crop column in the padded image, in `[0, 2 * padding]`.
    flip: mirror left-right after cropping.
    padding: zero border width.

  Returns:
    An array of the same shape and dtype as `image`.
  """
  h, w = image.shape[:2]
  if not (0 <= top <= 2 * padding and 0 <= left <= 2 * padding):
    raise ValueError(
        f'pad_crop_flip: top={top}, left={left} must be in [0, {2 * padding}]'
    )
  dy, dx = top - padding, left - padding  # shift of the window
  out = np.zeros_like(image)
  out[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)] = image[
      max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)
  ]
  if flip:
    out = out[:, ::-1]
  return out


def random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tuple[int, int, int, int]:
  """Samples an Inception-style crop box `(top, left, crop_h, crop_w)`.

  Up to `attempts` times, draw an area fraction uniformly from `scale` and
  an aspect ratio (width / height) log-uniformly from `ratio`; accept the
  first box that fits in the image, at a uniform position. Otherwise fall
  back to the largest centred crop whose aspect ratio is clipped to `ratio`.

  Args:
    height: image height.
    width: image width.
    rng: random generator.
    scale: range of the crop area as a fraction of the image area.
    ratio: range of the crop aspect ratio, width / height.
    attempts: number of tries before the fallback.

  Returns:
    `(top, left, crop_height, crop_width)`, inside the image.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(attempts):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    crop_w = int(round(math.sqrt(target * aspect)))
    crop_h = int(round(math.sqrt(target / aspect)))
    if 0 < crop_w <= width and 0 < crop_h <= height:
      top = int(rng.integers(0, height - crop_h + 1))
      left = int(rng.integers(0, width - crop_w + 1))
      return top, left, crop_h, crop_w
  aspect = width / height
  if aspect < ratio[0]:
    crop_w, crop_h = width, int(round(width / ratio[0]))
  elif aspect > ratio[1]:
    crop_w, crop_h = int(round(height * ratio[1])), height
  else:
    crop_w, crop_h = width, height
  return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def crop_resize(
    image: np.ndarray, box: tuple[int, int, int, int], size: int
) -> np.ndarray:
  """Crops `box = (top, left, h, w)` and resizes it to `size x size`.

  Bilinear with PIL's antialiasing. The crop is cut out first: resizing
  straight from PIL's `box=` would blend pixels outside the box into the
  edges.
  """
  top, left, h, w = box
  pil = Image.fromarray(image[top : top + h, left : left + w])
  return np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))


def resize_shorter_center_crop(
    image: np.ndarray, resize: int = 256, crop: int = 224
) -> np.ndarray:
  """Resizes the shorter side to `resize` (bilinear), then centre-crops.

  Args:
    image: HWC uint8 image of any size.
    resize: length of the shorter side after resizing.
    crop: side of the square centre crop.

  Returns:
    A `(crop, crop, C)` uint8 array.
  """
  h, w = image.shape[:2]
  if h <= w:
    new_h, new_w = resize, int(resize * w / h)
  else:
    new_h, new_w = int(resize * h / w), resize
  pil = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR)
  out = np.asarray(pil)
  top = int(round((new_h - crop) / 2.0))
  left = int(round((new_w - crop) / 2.0))
  return out[top : top + crop, left : left + crop]


def as_rgb(image: Any) -> np.ndarray:
  """Returns an HxWx3 uint8 array from an array or encoded image bytes."""
  if isinstance(image, (bytes, np.bytes_)):
    with Image.open(io.BytesIO(image)) as pil:
      image = np.asarray(pil.convert('RGB'))
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  elif image.shape[-1] == 4:
    image = image[..., :3]
  return image.astype(np.uint8, copy=False)


# ----------------------------------------------------------------------------
# Per-example transforms used by the pipelines (picklable callables).


class SmallImageTransform:
  """CIFAR/digits: optional pad-crop(-flip) augmentation, then normalise.

  Args:
    mean: per-channel mean of [0, 1] pixels.
    std: per-channel std of [0, 1] pixels.
    padding: zero border of the random crop (0 disables it).
    flip: random left-right flip in training.
    normalize: output float32 normalised images; else raw uint8.
  """

  def __init__(self, mean, std, *, padding: int, flip: bool, normalize: bool):
    self.mean, self.std = tuple(mean), tuple(std)
    self.padding, self.flip, self.normalize = padding, flip, normalize

  def __call__(
      self, example: Mapping[str, Any], rng: np.random.Generator | None
  ) -> dict[str, np.ndarray]:
    image = np.asarray(example['image'])
    if rng is not None and (self.padding or self.flip):
      top, left = rng.integers(0, 2 * self.padding + 1, size=2)
      flip = bool(self.flip and rng.random() < 0.5)
      image = pad_crop_flip(image, int(top), int(left), flip, self.padding)
    if self.normalize:
      image = normalize(image, self.mean, self.std)
    return {'image': image, 'label': np.int32(example['label'])}


def _check_range(
    owner: str, name: str, value: Any, upper: float | None = None
) -> tuple[float, float]:
  """`(lo, hi)` with `0 < lo <= hi` (and `hi <= upper`), as floats."""
  try:
    lo, hi = (float(v) for v in value)
  except (TypeError, ValueError):
    raise TypeError(
        f'{owner}: {name}={value!r} must be a pair of numbers (lo, hi)'
    ) from None
  if not 0 < lo <= hi or (upper is not None and hi > upper):
    bound = f' <= {upper}' if upper is not None else ''
    raise ValueError(
        f'{owner}: {name}={value!r} must satisfy 0 < lo <= hi{bound}'
    )
  return lo, hi


class ImageNetTransform:
  """ImageNet: random-resized-crop + flip (train), resize + centre crop (eval).

  Args:
    image_size: output side (224).
    resize_size: shorter side before the evaluation centre crop (256).
    scale: area range of the random crop.
    ratio: aspect-ratio range of the random crop.
    normalize: output float32 normalised images; else raw uint8.
  """

  def __init__(
      self,
      *,
      image_size: int = 224,
      resize_size: int = 256,
      scale: tuple[float, float] = (0.08, 1.0),
      ratio: tuple[float, float] = (3 / 4, 4 / 3),
      normalize: bool = True,
  ):
    owner = 'ImageNetTransform'
    sampling.check_int(owner, 'image_size', image_size, minimum=1)
    sampling.check_int(owner, 'resize_size', resize_size, minimum=1)
    if resize_size < image_size:
      raise ValueError(
          f'{owner}: resize_size={resize_size} must be >= image_size='
          f'{image_size} (the evaluation centre crop is cut from the resized'
          ' image)'
      )
    scale = _check_range(owner, 'scale', scale, upper=1.0)
    ratio = _check_range(owner, 'ratio', ratio)
    sampling.check_bool(owner, 'normalize', normalize)
    self.image_size, self.resize_size = int(image_size), int(resize_size)
    self.scale, self.ratio, self.normalize = scale, ratio, bool(normalize)

  def __call__(
      self, example: Mapping[str, Any], rng: np.random.Generator | None
  ) -> dict[str, np.ndarray]:
    image = as_rgb(example['image'])
    if rng is None:
      image = resize_shorter_center_crop(
          image, self.resize_size, self.image_size
      )
    else:
      box = random_resized_crop_box(
          image.shape[0],
          image.shape[1],
          rng,
          scale=self.scale,
          ratio=self.ratio,
      )
      image = crop_resize(image, box, self.image_size)
      if rng.random() < 0.5:
        image = image[:, ::-1]
    if self.normalize:
      image = normalize(image, IMAGENET_MEAN, IMAGENET_STD)
    else:
      image = np.ascontiguousarray(image)
    return {'image': image, 'label': np.int32(example['label'])}


def vision_transform(name: str, *, normalize: bool = True, **options):
  """Returns the per-example transform of a vision dataset.

  Args:
    name: one of `VISION_DATASETS`.
    normalize: float32 normalised output (True) or raw uint8 (False).
    **options: for `imagenet2012`, `ImageNetTransform` options
      (`image_size`, `resize_size`, `scale`, `ratio`).
  """
  sampling.check_bool('vision_transform', 'normalize', normalize)
  if name in ('cifar10', 'cifar100'):
    transform = SmallImageTransform(
        CIFAR_MEAN, CIFAR_STD, padding=4, flip=True, normalize=normalize
    )
  elif name == 'digits':
    # A 1-pixel random shift; no flip (digits are not mirror-symmetric).
    transform = SmallImageTransform(
        DIGITS_MEAN, DIGITS_STD, padding=1, flip=False, normalize=normalize
    )
  elif name == 'imagenet2012':
    return ImageNetTransform(normalize=normalize, **options)
  else:
    raise ValueError(
        f'vision_transform: name={name!r} is not one of {VISION_DATASETS}'
    )
  if options:
    raise ValueError(
        f'vision_transform: options {sorted(options)} are not supported for'
        f' name={name!r}'
    )
  return transform


def make_vision_dataset(
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
    normalize: bool = True,
    source: Sequence[Mapping[str, Any]] | None = None,
    **options,
) -> grain.MapDataset:
  """Batched `grain.MapDataset` for a vision dataset (see `make_pipeline`).

  Args:
    name: `'cifar10'`, `'cifar100'`, `'imagenet2012'` or `'digits'`.
    split: TFDS split, e.g. `'train'`, `'test'`, `'validation'`.
    batch_size: per-process batch size.
    train: augment, shuffle per epoch, drop incomplete batches.
    seed: shuffle and augmentation seed.
    data_dir: TFDS data directory.
    shard_index: this process's shard.
    shard_count: number of processes.
    num_epochs: None = forever (train) / once (eval).
    normalize: float32 normalised images (else uint8).
    source: read this sequence of examples instead of opening TFDS.
    **options: extra `ImageNetTransform` options for `imagenet2012`.

  Returns:
    A `grain.MapDataset` of batches `{'image', 'label', 'index', 'mask'}`.
  """
  transform = vision_transform(name, normalize=normalize, **options)
  if source is None:
    source = sources.open_source(name, split, data_dir=data_dir)
  return sampling.batched_dataset(
      source,
      transform,
      batch_size=batch_size,
      train=train,
      seed=seed,
      shard_index=shard_index,
      shard_count=shard_count,
      num_epochs=num_epochs,
  )

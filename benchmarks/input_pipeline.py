"""Throughput of the CIFAR-10 training input pipeline (images per second).

Writes a CIFAR-10-shaped TFDS dataset (random 32x32x3 images, PNG-encoded
like TFDS's cifar10, labels 0..9) as ArrayRecord into a temporary directory,
then times `make_pipeline('cifar10', 'train', train=True)` reading it through
`data_source`: ArrayRecord read, PNG decode, pad-4 random crop, flip,
normalisation to float32, batching. Offline; no TensorFlow.

Reported: the median over `--repeats` timed runs of `--steps` batches each,
after `--warmup` batches.

Usage:
  python benchmarks/input_pipeline.py [--batch-size 128] [--threads 0]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from cram_jax.data import make_pipeline


class BenchCifar(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Random images with the features and encoding of TFDS cifar10."""

  VERSION = tfds.core.Version('1.0.0')
  NUM_EXAMPLES = 8192

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description='Synthetic CIFAR-10-shaped data for benchmarks.',
        features=tfds.features.FeaturesDict(
            {
                'image': tfds.features.Image(shape=(32, 32, 3)),
                'label': tfds.features.ClassLabel(num_classes=10),
            }
        ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    # Smooth images compress like natural ones; pure noise would not.
    base = rng.integers(
        0, 256, size=(self.NUM_EXAMPLES, 8, 8, 3), dtype=np.uint8
    )
    for i in range(self.NUM_EXAMPLES):
      image = Image.fromarray(base[i]).resize(
          (32, 32), Image.Resampling.BILINEAR
      )
      buffer = io.BytesIO()
      image.save(buffer, format='PNG')
      yield i, {'image': buffer.getvalue(), 'label': i % 10}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument(
      '--steps', type=int, default=40, help='batches per timed run'
  )
  parser.add_argument('--warmup', type=int, default=5)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument(
      '--threads', type=int, default=0, help='grain read threads'
  )
  parser.add_argument(
      '--workers', type=int, default=0, help='grain worker processes'
  )
  args = parser.parse_args()

  tfds.display_progress_bar(False)
  with tempfile.TemporaryDirectory() as data_dir:
    builder = BenchCifar(data_dir=data_dir, file_format='array_record')
    builder.download_and_prepare(
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
    source = builder.as_data_source(split='train')
    iterator = make_pipeline(
        'cifar10',
        'train',
        batch_size=args.batch_size,
        train=True,
        seed=10,
        source=source,
        num_threads=args.threads,
        worker_count=args.workers,
    )
    for _ in range(args.warmup):
      next(iterator)
    rates = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      for _ in range(args.steps):
        batch = next(iterator)
      elapsed = time.perf_counter() - start
      rates.append(args.steps * args.batch_size / elapsed)
    assert batch['image'].shape == (args.batch_size, 32, 32, 3)
    iterator.close()  # stops worker processes before the data is deleted
  print(
      f'input_pipeline cifar10 train: batch {args.batch_size},'
      f' threads {args.threads}, workers {args.workers},'
      f' {os.cpu_count()} CPUs:'
      f' {statistics.median(rates):.0f} images/s'
      f' (median of {args.repeats} x {args.steps} batches;'
      f' min {min(rates):.0f}, max {max(rates):.0f})'
  )


if __name__ == '__main__':
  main()

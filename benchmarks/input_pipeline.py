"""Throughput of the training and evaluation input pipelines on VOC-like data.

Builds a throwaway dataset of `reco_toy` scenes drawn at VOC size (sides 375-500, JPEG images,
PNG labels) in a temporary directory, then times batches of each pipeline after a warm-up:

  PYTHONPATH=. python benchmarks/input_pipeline.py [--num_train=200] [--batches=30]
"""
import argparse
import io
import os
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from reco_jax.data import pipeline  # noqa: E402
from reco_jax.data import toy  # noqa: E402


class VocLikeToy(toy.RecoToy, skip_registration=True):
  """reco_toy scenes at VOC size, images stored as JPEG like VOC's."""

  def _generate_examples(self, split, count):
    for key, ex in super()._generate_examples(split, count):
      buffer = io.BytesIO()
      Image.fromarray(ex['image']).save(buffer, format='JPEG', quality=90)
      yield key, dict(ex, image=buffer.getvalue())


def seconds_per_batch(it, batches: int, warmup: int = 3) -> float:
  """Seconds per batch after `warmup` batches."""
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return (time.perf_counter() - start) / batches


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--num_train', type=int, default=200)
  parser.add_argument('--batches', type=int, default=30)
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as data_dir:
    config = toy.RecoToyConfig(name='voc_like', num_train=args.num_train, num_validation=40,
                               min_size=375, max_size=500)
    builder = VocLikeToy(config=config, data_dir=data_dir)
    start = time.perf_counter()
    builder.download_and_prepare()
    print(f'build: {args.num_train + 40} images in {time.perf_counter() - start:.1f} s')

    common = dict(min_classes=1, num_classes=toy.NUM_CLASSES, partial='', crop_size=(321, 321),
                  scale_range=(0.5, 1.5), seed=0)
    runs = {
        'labelled, all images (uncached), batch 10': dict(num_labels=0, labelled_batch=10,
                                                          unlabelled_batch=0),
        'labelled, 60-image subset (cached), batch 10': dict(num_labels=60, labelled_batch=10,
                                                             unlabelled_batch=0),
        'unlabelled, crop only, batch 10': dict(num_labels=60, labelled_batch=1,
                                                unlabelled_batch=10),
    }
    for name, kw in runs.items():
      labelled, unlabelled, _ = pipeline.train_iterators(builder,
                                                         pipeline.TrainData(**common, **kw))
      it = unlabelled if kw['unlabelled_batch'] else labelled
      per_batch = seconds_per_batch(it, args.batches)
      size = kw['unlabelled_batch'] or kw['labelled_batch']
      print(f'{name}: {size / per_batch:.1f} images/s ({per_batch * 1e3:.0f} ms/batch)')

    start = time.perf_counter()
    count = 0
    for batch in pipeline.eval_iterator(builder, eval_size=(513, 513), batch_size=4):
      count += int(np.sum(batch['valid']))
    print(f'eval 513x513, batch 4: {count / (time.perf_counter() - start):.1f} images/s '
          '(one pass, includes start-up)')


if __name__ == '__main__':
  main()

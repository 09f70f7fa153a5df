"""The trainer's inputs: the labelled and unlabelled training streams of a config, its
evaluation stream, and the global batches the steps take.

A method's branches give its images per step; `train_streams` builds this process's share of
them with `data.pipeline.train_iterators` from the config's data fields, and `global_batches`
assembles and shards a step's batch one step ahead.
"""
from collections.abc import Iterator
import collections

import jax

from reco_jax import data as data_lib
from reco_jax import methods
from reco_jax import names
from reco_jax import parallel
from reco_jax.data import pipeline
from reco_jax.data import raw_io
from reco_jax.data import splits


def branch_batches(config) -> tuple[int, int]:
  """(labelled, unlabelled) global images per step of config.method.

  The method's branches in multiples of config.batch_size: a method without an unlabelled
  branch (supervised) reads 2 x batch_size labelled images, as the reference's supervised
  runs do.
  """
  return branch_sizes(config, methods.get(config.method).branches)


def branch_sizes(config, branches) -> tuple[int, int]:
  labelled, unlabelled = branches
  return labelled * config.batch_size, unlabelled * config.batch_size


def train_streams(config, builder, start_batch: int, *, method, pseudo=None):
  """(labelled, unlabelled or None, labelled ids) for this process, after `start_batch`.

  method: the `methods.interface.Method` (its branches and labelled_photometric); pseudo:
  {image id: PNG label} joining the labelled stream.
  """
  labelled_batch, unlabelled_batch = branch_sizes(config, method.branches)
  data = pipeline.TrainData(
      num_labels=config.labels, min_classes=config.min_classes,
      num_classes=config.num_classes, partial=config.partial,
      crop_size=tuple(config.crop_size), scale_range=tuple(config.scale_range),
      labelled_batch=labelled_batch, unlabelled_batch=unlabelled_batch, seed=config.seed,
      labelled_pool=labelled_pool(config.split),
      unlabelled_fraction=float(config.unlabelled_fraction),
      hue_jitter=float(config.hue_jitter), subset=config.subset,
      labelled_photometric=method.labelled_photometric)
  return pipeline.train_iterators(builder, data, process_index=jax.process_index(),
                                  process_count=jax.process_count(), start_batch=start_batch,
                                  pseudo_labels=pseudo)


def labelled_pool(split: str) -> list[str] | None:
  """The shipped id list the labelled subset of config.split is drawn from (None: all)."""
  filename = names.LABELLED_POOLS[split]
  if filename is None:
    return None
  return raw_io.shipped_ids(filename)


def eval_stream(config, builder):
  return pipeline.eval_iterator(
      builder, split=data_lib.eval_split(builder), eval_size=tuple(config.eval_size),
      batch_size=config.eval_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count())


def global_batches(mesh, labelled, unlabelled) -> Iterator[dict]:
  """Global train batches, one prefetched ahead."""
  def make():
    local = next(labelled)
    batch = {'labelled': {'image': local['image'], 'label': local['label']}}
    if unlabelled is not None:
      # Partial-label runs also carry the sparse labels of the unlabelled branch.
      batch['unlabelled'] = dict(next(unlabelled))
    return parallel.shard_batch(mesh, batch)

  # The transfer of the next batch overlaps the running step (device_put is asynchronous).
  queue = collections.deque([make()])
  while True:
    queue.append(make())
    yield queue.popleft()


def labelled_ids(config, builder) -> list[str]:
  """The labelled subset of config, as the input pipeline draws it."""
  ids, classes = pipeline.train_ids_and_classes(builder)
  return splits.labelled_subset(ids, classes, config.labels, min_classes=config.min_classes,
                                  num_classes=config.num_classes, seed=config.seed,
                                  labelled_pool=labelled_pool(config.split),
                                  subset=config.subset)

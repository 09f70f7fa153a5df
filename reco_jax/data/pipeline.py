"""tf.data input pipelines: fixed-shape numpy batches for training and evaluation.

Training follows the reference ReCo data code (build_data.py `transform`), in its order:
random scale (bilinear image, nearest label) -> pad bottom/right to the crop (image reflected,
label void) -> random crop -> colour jitter (p=0.8, the four torchvision adjustments in random
order) -> Gaussian blur (p=0.5) -> horizontal flip (p=0.5) -> ImageNet normalisation.
Unlabelled images are only padded and randomly cropped. Evaluation images are padded (reflect,
as the reference does) or centre-cropped to a fixed size.

Randomness: shuffling uses explicit seeds, and every augmentation draws from stateless TF ops
seeded by (run seed, process, stream, position of the example in this process's stream), so a
seed reproduces the same batches whatever the threading.
"""
from collections.abc import Callable, Iterator, Mapping, Sequence
import dataclasses
import hashlib

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from reco_jax import names
from reco_jax import normalization
from reco_jax import photometric as P
from reco_jax.data import image_ops
from reco_jax.data import splits

# Largest shuffle buffer, in encoded examples (memory: ~100 kB each for VOC-size JPEGs).
SHUFFLE_BUFFER = 2048

_SKIP = {'image': tfds.decode.SkipDecoding(), 'label': tfds.decode.SkipDecoding()}


def derive_seed(seed: int, *tags) -> int:
  """A stable 63-bit seed from a run seed and tags (process index, stream name...)."""
  text = ':'.join(str(t) for t in (seed,) + tags)
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], 'little') >> 1


# ----------------------------------------------------------------------------------------------
# Reading.


def _read(builder: tfds.core.DatasetBuilder, split: str) -> tf.data.Dataset:
  """Encoded examples of `split` in storage order (deterministic)."""
  return builder.as_dataset(split=split, shuffle_files=False, decoders=_SKIP)


def _decode(builder: tfds.core.DatasetBuilder, ex: dict) -> tuple[tf.Tensor, tf.Tensor]:
  features = builder.info.features
  return (features['image'].decode_example(ex['image']),
          features['label'].decode_example(ex['label']))


def train_ids_and_classes(builder: tfds.core.DatasetBuilder,
                          split: str = 'train') -> tuple[list[str], list[np.ndarray]]:
  """Image ids and present classes of every example of `split`, without decoding images."""
  ds = _read(builder, split).map(lambda ex: (ex['image_id'], ex['classes']),
                                 num_parallel_calls=tf.data.AUTOTUNE)
  ids, classes = [], []
  for image_id, present in tfds.as_numpy(ds):
    ids.append(image_id.decode())
    classes.append(present)
  return ids, classes


def _id_filter(ids: Sequence[str], keep: bool):
  """A dataset predicate: image_id in `ids` (keep=True) or not in it (keep=False)."""
  if ids:
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(list(ids)),
                                            tf.ones([len(ids)], tf.int32)), default_value=0)
    if keep:
      return lambda ex: tf.equal(table.lookup(ex['image_id']), 1)
    return lambda ex: tf.equal(table.lookup(ex['image_id']), 0)
  return lambda ex: tf.constant(not keep)


def _stream(builder, split, ids: Sequence[str], *, keep: bool, num_examples: int, cache: bool,
            seed: int, process_index: int, process_count: int) -> tf.data.Dataset:
  """Infinite shuffled stream of (position, encoded example) for this process.

  Selects the examples whose id is (keep=True) or is not (keep=False) in `ids`; `num_examples`
  is how many that is. Each process takes its own disjoint share, except when there are fewer
  examples than processes: then every process reads them all (with its own seed). A cached
  selection (small) is filtered from the whole split once and then dealt out example by example;
  an uncached one (most of the split) is filtered from this process's part of the split, so that
  each process reads only its part every epoch.
  """
  select = _id_filter(ids, keep)
  local = num_examples
  if num_examples < process_count:
    ds = _read(builder, split).filter(select)
    ds = ds.cache() if cache else ds
  elif cache:
    ds = _read(builder, split).filter(select).cache().shard(process_count, process_index)
    local = len(range(process_index, num_examples, process_count))
  else:
    part = tfds.split_for_jax_process(split, process_index=process_index,
                                      process_count=process_count)
    ds = _read(builder, part).filter(select)
    local = -(-num_examples // process_count)
  ds = ds.shuffle(max(1, min(local, SHUFFLE_BUFFER)), seed=derive_seed(seed, 'shuffle'),
                  reshuffle_each_iteration=True)
  return ds.repeat().enumerate()


def _example_seed(seed: int, position: tf.Tensor) -> tf.Tensor:
  base_seed = tf.constant([seed & 0x7FFFFFFF, seed >> 31], tf.int64)
  return tf.random.experimental.stateless_fold_in(base_seed, position)


def _partial_fn(mode: str, seed: int):
  """Label -> partial label, seeded by (run seed, image id); runs on the host via numpy."""
  def fn(label, image_id):
    return splits.partial_labels(label, mode, splits.partial_seed(seed, image_id.decode()))

  def apply(label, image_id):
    out = tf.numpy_function(fn, [label, image_id], tf.uint8, stateful=False)
    out.set_shape([None, None, 1])
    return out
  return apply


def _pseudo_label_fn(pseudo_labels: Mapping[str, bytes]):
  """(image id, label) -> the pseudo-label of that image if it has one, else the label."""
  keys = sorted(pseudo_labels)
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(tf.constant(keys),
                                          tf.constant([pseudo_labels[k] for k in keys])),
      default_value='')

  def apply(image_id, label):
    png = table.lookup(image_id)
    out = tf.cond(tf.strings.length(png) > 0,
                  lambda: tf.io.decode_png(png, channels=1, dtype=tf.uint8), lambda: label)
    out.set_shape([None, None, 1])
    return out
  return apply


def decoded_images(builder: tfds.core.DatasetBuilder, ids: Sequence[str], *,
                   split: str = 'train', process_index: int = 0,
                   process_count: int = 1) -> Iterator[tuple[str, np.ndarray]]:
  """(image id, uint8 [h, w, 3]) of the examples of `split` whose id is in `ids`, in storage
  order; this process gets every process_count-th of them."""
  image_feature = builder.info.features['image']
  ds = _read(builder, split).filter(_id_filter(ids, True)).shard(process_count, process_index)
  ds = ds.map(lambda ex: (ex['image_id'], image_feature.decode_example(ex['image'])),
              num_parallel_calls=tf.data.AUTOTUNE)
  for image_id, image in tfds.as_numpy(_options(ds.prefetch(2))):
    yield image_id.decode(), image


def _check_batch(name: str, batch: int, process_count: int) -> int:
  if batch < 0 or batch % process_count:
    raise ValueError(f'{name}={batch} must be a non-negative multiple of the process count '
                     f'({process_count}); batch sizes are global.')
  return batch // process_count


def dataset_options() -> tf.data.Options:
  """Every stream's options: a deterministic order (a seed fixes the batches whatever the
  parallelism), and no autotuning.

  `num_parallel_calls=AUTOTUNE` then runs tf.data's fixed default parallelism, bounded by the
  host's cores (a map of 50 ms calls given 32 threads kept about 20 calls in flight, 30 when
  autotuned), and the prefetch buffers are the ones written here. With autotuning, deleting
  an iterator waits for tf.data's autotuning thread: the toy's main job exited 7.6 s after its
  last line (1.9 s without), and each stage boundary of a staged run waited too. The same seed
  gives the same batches either way.
  """
  options = tf.data.Options()
  options.deterministic = True
  options.autotune.enabled = False
  return options


def _options(ds: tf.data.Dataset) -> tf.data.Dataset:
  return ds.with_options(dataset_options())


@dataclasses.dataclass(frozen=True)
class TrainData:
  """What the training streams read and how they prepare it (a run's data fields).

  num_labels, min_classes, num_classes: the labelled subset (see splits.select_labelled);
    num_labels 0 labels every train image.
  partial: '' for full labels, else the partial-label mode.
  crop_size: (height, width) of training crops.
  scale_range: (low, high) random rescale factor for labelled images.
  labelled_batch, unlabelled_batch: GLOBAL batch sizes, multiples of the process count.
  seed: run seed; the same seed gives the same batches.
  labelled_pool: the ids the labelled subset is drawn from (e.g. the 1,464 images of VOC's
    original train list, the PseudoSeg partition of the ReCo paper's Table 2); None = every
    train image. The unlabelled images are still all the others.
  unlabelled_fraction: in (0, 1]: a seeded subset of this fraction of the unlabelled images
    is used (ReCo paper Fig. 7c).
  hue_jitter: the largest hue shift of the labelled images' colour jitter, in turns.
  subset: how the labelled subset is drawn, one of `names.SUBSETS` (see
    `splits.labelled_subset`).
  labelled_photometric: False gives the labelled images rescale, crop and flip only (no
    colour jitter or blur), as UniMatch's authors do.
  """
  num_labels: int
  min_classes: int
  num_classes: int
  partial: str
  crop_size: tuple[int, int]
  scale_range: tuple[float, float]
  labelled_batch: int
  unlabelled_batch: int
  seed: int
  labelled_pool: Sequence[str] | None = None
  unlabelled_fraction: float = 1.0
  hue_jitter: float = P.JITTER_HUE
  subset: str = names.SUBSETS[0]
  labelled_photometric: bool = True

  def __post_init__(self):
    """Raises ValueError on fields that cannot make a stream."""
    if self.partial and self.partial not in names.PARTIAL_FRACTIONS:
      raise ValueError(f"partial must be '' or one of {sorted(names.PARTIAL_FRACTIONS)}, got "
                       f'{self.partial!r}.')
    if self.partial and self.num_labels:
      raise ValueError(f'partial labels use every train image: set num_labels=0 (got '
                       f'{self.num_labels}) when partial={self.partial!r}.')
    if len(self.crop_size) != 2 or min(self.crop_size) < 1:
      raise ValueError(f'crop_size must be (height, width) >= 1, got {self.crop_size}.')
    object.__setattr__(self, 'crop_size', (int(self.crop_size[0]), int(self.crop_size[1])))
    if not 0 < self.scale_range[0] <= self.scale_range[1]:
      raise ValueError(f'scale_range must be (low, high) with 0 < low <= high, got '
                       f'{self.scale_range}.')
    if not 0.0 < self.unlabelled_fraction <= 1.0:
      raise ValueError(f'unlabelled_fraction must be in (0, 1], got '
                       f'{self.unlabelled_fraction}.')


@dataclasses.dataclass(frozen=True)
class _Branch:
  """One training stream: the images it reads (`_stream`'s selection), its local batch, and
  prepare(example seed, image uint8 [h, w, 3], label uint8 [h, w, 1], image id) -> batch
  element."""
  name: str
  ids: Sequence[str]
  keep: bool
  count: int
  cache: bool
  local_batch: int
  prepare: Callable[..., dict]


def _branch_iterator(builder, branch: _Branch, *, seed: int, process_index: int,
                     process_count: int, start_batch: int) -> Iterator[dict]:
  """This process's batches of `branch`, from batch `start_batch` on."""
  branch_seed = derive_seed(seed, branch.name, process_index)
  ds = _stream(builder, 'train', branch.ids, keep=branch.keep, num_examples=branch.count,
               cache=branch.cache, seed=branch_seed, process_index=process_index,
               process_count=process_count).skip(start_batch * branch.local_batch)

  def prepare(position, ex):
    image, label = _decode(builder, ex)
    return branch.prepare(_example_seed(branch_seed, position), image, label, ex['image_id'])

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  return iter(tfds.as_numpy(_options(ds.batch(branch.local_batch, drop_remainder=True)
                                     .prefetch(2))))


def train_iterators(builder: tfds.core.DatasetBuilder, data: TrainData, *,
                    process_index: int = 0, process_count: int = 1, start_batch: int = 0,
                    pseudo_labels: Mapping[str, bytes] | None = None,
                    ) -> tuple[Iterator[dict], Iterator[dict] | None, list[str]]:
  """Infinite iterators of this process's training batches.

  Labelled batches: {'image': float32 [b, h, w, 3] ImageNet-normalised, 'label': int32 [b, h, w]
  (255 void)}, with b = labelled_batch // process_count and (h, w) = crop_size.
  Unlabelled batches: {'image': float32 [b', h, w, 3]} (b' = unlabelled_batch // process_count),
  random crop only; None when unlabelled_batch == 0.

  Which images: `num_labels` images chosen by `splits.select_labelled` (or
  `splits.select_uniform` with subset='uniform'; 0 = every train image) are labelled; the
  others are unlabelled, except with num_labels == 0, where, as in the reference, the
  unlabelled stream also runs over every image. With `partial` in
  {'p0', 'p1', 'p5', 'p25'} every train image is labelled with partial labels
  (`splits.partial_labels`, seeded by `seed` and the image id; num_labels must be 0) and, as in
  the reference's partial-label training, the unlabelled stream runs over the same images and
  also carries their partial 'label' (int32 [b', h, w], cropped with the image), which the
  trainer may use in place of pseudo-labels where it is not void.

  Args:
    builder: a prepared TFDS builder (reco_jax.data.prepare) with a 'train' split.
    data: the streams' fields (`TrainData`).
    process_index, process_count: this process and the number of processes.
    start_batch: batches already consumed (a resumed run): the iterators yield exactly what an
      uninterrupted run would yield from that batch on. Skipping happens on encoded examples,
      before decoding and augmentation (each example's augmentation seed is its position).
    pseudo_labels: {image id: PNG-encoded uint8 label} of train images that join the labelled
      stream with these labels (a model's predictions: method=pseudo_label); their ids must
      not be among the labelled ones. The unlabelled stream is unchanged.

  Returns:
    (labelled iterator, unlabelled iterator or None, the labelled image ids in chosen order).
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, {process_count}).')
  local_l = _check_batch('labelled_batch', data.labelled_batch, process_count)
  local_u = _check_batch('unlabelled_batch', data.unlabelled_batch, process_count)
  if local_l == 0:
    raise ValueError('labelled_batch must be at least the process count.')
  if start_batch < 0:
    raise ValueError(f'start_batch must be >= 0, got {start_batch}.')
  ids, classes = train_ids_and_classes(builder)
  labelled_ids = splits.labelled_subset(
      ids, classes, data.num_labels, min_classes=data.min_classes,
      num_classes=data.num_classes, seed=data.seed, labelled_pool=data.labelled_pool,
      subset=data.subset)
  where = dict(seed=data.seed, process_index=process_index, process_count=process_count,
               start_batch=start_batch)
  labelled = _branch_iterator(builder, _labelled_branch(data, ids, labelled_ids, pseudo_labels,
                                                        local_l), **where)
  unlabelled = None
  if local_u:
    unlabelled = _branch_iterator(builder, _unlabelled_branch(data, ids, labelled_ids, local_u),
                                  **where)
  return labelled, unlabelled, labelled_ids


def _labelled_branch(data: TrainData, ids, labelled_ids, pseudo_labels, local_batch) -> _Branch:
  """The labelled images (and the pseudo-labelled ones), with the labelled augmentation."""
  stream_ids = list(labelled_ids)
  pseudo_fn = None
  if pseudo_labels:
    if data.partial:
      raise ValueError('pseudo_labels and partial labels cannot be combined.')
    clash = sorted(set(pseudo_labels) & set(labelled_ids))
    unknown = sorted(set(pseudo_labels) - set(ids))
    if clash or unknown:
      raise ValueError(f'pseudo_labels must label train images outside the labelled subset; '
                       f'labelled: {clash[:5]}, not in the train split: {unknown[:5]}.')
    stream_ids += sorted(pseudo_labels)
    pseudo_fn = _pseudo_label_fn(pseudo_labels)
  partial_fn = _partial_fn(data.partial, data.seed) if data.partial else None

  def prepare(seed, image, label, image_id):
    if pseudo_fn:
      label = pseudo_fn(image_id, label)
    if partial_fn:
      label = partial_fn(label, image_id)
    image, label = image_ops.augment_labelled(
        image, label, seed, crop_size=data.crop_size, scale_range=data.scale_range,
        photometric=data.labelled_photometric, hue_jitter=data.hue_jitter)
    return {'image': normalization.normalize(image), 'label': label}

  # A strict subset is small next to the split: cache its encoded bytes rather than scanning
  # the whole split every epoch.
  return _Branch('labelled', stream_ids, keep=True, count=len(stream_ids),
                 cache=len(stream_ids) != len(ids), local_batch=local_batch, prepare=prepare)


def _unlabelled_branch(data: TrainData, ids, labelled_ids, local_batch) -> _Branch:
  """The unlabelled images (`splits.unlabelled_selection`), padded and randomly cropped; with
  partial labels, their partial labels cropped with them."""
  u_ids, keep, count = splits.unlabelled_selection(ids, labelled_ids, data.unlabelled_fraction,
                                                   data.seed)
  if count == 0:
    raise ValueError('unlabelled_batch > 0 but no train image is left unlabelled.')
  partial_fn = _partial_fn(data.partial, data.seed) if data.partial else None

  def prepare(seed, image, label, image_id):
    image = tf.image.convert_image_dtype(image, tf.float32)
    if partial_fn:
      label = partial_fn(label, image_id)
      image, label = image_ops.random_crop(image, label, seed, data.crop_size)
      return {'image': normalization.normalize(image),
              'label': tf.cast(label[..., 0], tf.int32)}
    image, _ = image_ops.random_crop(image, None, seed, data.crop_size)
    return {'image': normalization.normalize(image)}

  return _Branch('unlabelled', u_ids, keep=keep, count=count, cache=False,
                 local_batch=local_batch, prepare=prepare)


# ----------------------------------------------------------------------------------------------
# Evaluation.


class EvalBatches:
  """A finite, re-iterable sequence of evaluation batches (numpy dicts); len() = batch count."""

  def __init__(self, ds: tf.data.Dataset, num_batches: int, num_examples: int):
    self._ds = ds
    self.num_batches = num_batches
    self.num_examples = num_examples  # real examples of this process

  def __iter__(self) -> Iterator[dict]:
    return iter(tfds.as_numpy(self._ds))

  def __len__(self) -> int:
    return self.num_batches


def eval_iterator(builder: tfds.core.DatasetBuilder, *, split: str = 'validation',
                  eval_size: tuple[int, int], batch_size: int, process_index: int = 0,
                  process_count: int = 1) -> EvalBatches:
  """Evaluation batches of this process's share of `split`.

  Batches: {'image': float32 [b, H, W, 3] normalised, 'label': int32 [b, H, W] (255 = void or
  padding), 'valid': bool [b] (False for padding examples)}, b = batch_size // process_count,
  (H, W) = eval_size. Every process yields the same number of batches: the shares differ by at
  most one example, and each is completed with padding examples (zero image, void label).
  """
  local = _check_batch('batch_size', batch_size, process_count)
  if local == 0:
    raise ValueError('batch_size must be at least the process count.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, {process_count}).')
  height, width = int(eval_size[0]), int(eval_size[1])
  total = builder.info.splits[split].num_examples
  mine = len(range(process_index, total, process_count))
  largest = -(-total // process_count)
  num_batches = -(-largest // local)

  def prepare(ex):
    image, label = _decode(builder, ex)
    image = tf.image.convert_image_dtype(image, tf.float32)
    image, label = image_ops.fit_to_size(image, label, height, width)
    return {'image': normalization.normalize(image), 'label': tf.cast(label[..., 0], tf.int32),
            'valid': tf.constant(True)}

  ds = _read(builder, split).shard(process_count, process_index)
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  filler = {'image': tf.zeros([height, width, 3], tf.float32),
            'label': tf.fill([height, width], tf.constant(names.VOID, tf.int32)),
            'valid': tf.constant(False)}
  ds = ds.concatenate(tf.data.Dataset.from_tensors(filler).repeat(num_batches * local - mine))
  ds = _options(ds.batch(local, drop_remainder=True).prefetch(2))
  return EvalBatches(ds, num_batches, mine)

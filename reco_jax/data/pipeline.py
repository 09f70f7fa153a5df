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
from collections.abc import Iterator, Mapping, Sequence
import hashlib

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from reco_jax import names
from reco_jax import normalization
from reco_jax import photometric as P
from reco_jax.data import base
from reco_jax.data import splits

# Largest shuffle buffer, in encoded examples (memory: ~100 kB each for VOC-size JPEGs).
SHUFFLE_BUFFER = 2048

_SKIP = {'image': tfds.decode.SkipDecoding(), 'label': tfds.decode.SkipDecoding()}


def derive_seed(seed: int, *tags) -> int:
  """A stable 63-bit seed from a run seed and tags (process index, stream name...)."""
  text = ':'.join(str(t) for t in (seed,) + tags)
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], 'little') >> 1


# ----------------------------------------------------------------------------------------------
# Geometry and photometry on single examples (graph-mode TF, dynamic input sizes).


def _reflect_indices(size_in: tf.Tensor, size_out: tf.Tensor) -> tf.Tensor:
  """Source index of each of `size_out` positions when reflecting a length-`size_in` axis.

  Equals repeated REFLECT padding (edge not repeated), so it works for any pad length, unlike
  tf.pad, which fails once the pad exceeds the image size.
  """
  period = tf.maximum(2 * (size_in - 1), 1)
  m = tf.range(size_out) % period
  return tf.where(m < size_in, m, period - m)


def pad_to_size(image: tf.Tensor, label: tf.Tensor | None, height, width):
  """Pads bottom/right up to at least (height, width): image reflected, label void.

  image: [h, w, 3] float32; label: [h, w, 1] uint8 or None. Sizes already large enough stay.
  """
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  out_h, out_w = tf.maximum(h, height), tf.maximum(w, width)
  image = tf.gather(image, _reflect_indices(h, out_h), axis=0)
  image = tf.gather(image, _reflect_indices(w, out_w), axis=1)
  if label is not None:
    label = tf.pad(label, [[0, out_h - h], [0, out_w - w], [0, 0]],
                   constant_values=names.VOID)
  return image, label


def _grey(image: tf.Tensor) -> tf.Tensor:
  """PIL's convert('L') grey level: [h, w, 1]."""
  return tf.reduce_sum(image * tf.constant(P.GREY_WEIGHTS), axis=-1, keepdims=True)


def colour_jitter(image: tf.Tensor, seed: tf.Tensor, hue_jitter: float = P.JITTER_HUE
                  ) -> tf.Tensor:
  """torchvision-style ColorJitter on a [h, w, 3] float32 image in [0, 1], random draws; the
  hue shift is uniform in [-hue_jitter, hue_jitter]."""
  seeds = tf.random.experimental.stateless_split(seed, 3)
  b, c, s = tf.unstack(tf.random.stateless_uniform([3], seeds[0], *P.JITTER_FACTOR))
  hue = tf.random.stateless_uniform([], seeds[1], -hue_jitter, hue_jitter)
  order = tf.argsort(tf.random.stateless_uniform([4], seeds[2]))
  return colour_jitter_with(image, order, b, c, s, hue)


def colour_jitter_with(image: tf.Tensor, order: tf.Tensor, b, c, s, hue) -> tf.Tensor:
  """The four colour ops of ColorJitter in `order` ([4] int: 0 brightness, 1 contrast,
  2 saturation, 3 hue). Brightness multiplies; contrast blends with the mean grey level;
  saturation blends with the grey image; hue shifts the HSV hue; each clips to [0, 1].
  """
  ops = [
      lambda x: x * b,
      lambda x: tf.reduce_mean(_grey(x)) * (1 - c) + x * c,
      lambda x: _grey(x) * (1 - s) + x * s,
      lambda x: tf.image.adjust_hue(x, hue),
  ]
  for step in range(4):
    image = tf.switch_case(order[step], [lambda f=f: tf.clip_by_value(f(image), 0., 1.)
                                         for f in ops])
  return image


def _symmetric_indices(size: tf.Tensor) -> tf.Tensor:
  """Indices of a symmetric extension by BLUR_RADIUS on each side (edge pixel repeated)."""
  i = tf.range(-P.BLUR_RADIUS, size + P.BLUR_RADIUS)
  i = tf.where(i < 0, -i - 1, tf.where(i >= size, 2 * size - 1 - i, i))
  return tf.clip_by_value(i, 0, size - 1)  # images narrower than the radius


def gaussian_blur(image: tf.Tensor, sigma: tf.Tensor) -> tf.Tensor:
  """Separable Gaussian blur of a [h, w, 3] float32 image; border extended symmetrically."""
  x = tf.range(-P.BLUR_RADIUS, P.BLUR_RADIUS + 1, dtype=tf.float32)
  k = tf.exp(-0.5 * tf.square(x / sigma))
  k /= tf.reduce_sum(k)
  rows = _symmetric_indices(tf.shape(image)[0])
  cols = _symmetric_indices(tf.shape(image)[1])
  padded = tf.gather(tf.gather(image, rows, axis=0), cols, axis=1)[None]
  kernel_y = tf.tile(tf.reshape(k, [-1, 1, 1, 1]), [1, 1, 3, 1])
  kernel_x = tf.tile(tf.reshape(k, [1, -1, 1, 1]), [1, 1, 3, 1])
  out = tf.nn.depthwise_conv2d(padded, kernel_y, [1, 1, 1, 1], 'VALID')
  out = tf.nn.depthwise_conv2d(out, kernel_x, [1, 1, 1, 1], 'VALID')
  return out[0]


def augment_labelled(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor, *,
                     crop_size: tuple[int, int], scale_range: tuple[float, float],
                     photometric: bool = True, hue_jitter: float = P.JITTER_HUE
                     ) -> tuple[tf.Tensor, tf.Tensor]:
  """The labelled-branch augmentation of one example.

  Args:
    image: [h, w, 3] uint8. label: [h, w, 1] uint8 (255 void).
    seed: [2] int64 stateless seed.
    crop_size: output (height, width). scale_range: random rescale factor range.
    photometric: False skips colour jitter and blur (tests check geometry with it).
    hue_jitter: the largest hue shift of the colour jitter, in turns.

  Returns:
    image [crop_h, crop_w, 3] float32 in [0, 1] (not normalised), label [crop_h, crop_w] int32.
  """
  seeds = tf.random.experimental.stateless_split(seed, 8)
  image = tf.image.convert_image_dtype(image, tf.float32)
  if tuple(scale_range) != (1.0, 1.0):
    scale = tf.random.stateless_uniform([], seeds[0], scale_range[0], scale_range[1])
    size = tf.cast(tf.cast(tf.shape(image)[:2], tf.float32) * scale, tf.int32)
    size = tf.maximum(size, 1)
    # antialias=True matches PIL's bilinear resize, which filters when downscaling.
    image = tf.image.resize(image, size, 'bilinear', antialias=True)
    label = tf.image.resize(label, size, 'nearest')
  image, label = random_crop(image, label, seeds[1], crop_size)
  if photometric:
    jitter = tf.random.stateless_uniform([], seeds[2]) < P.JITTER_PROB
    image = tf.cond(jitter, lambda: colour_jitter(image, seeds[3], hue_jitter),
                    lambda: image)
    blur = tf.random.stateless_uniform([], seeds[4]) < P.BLUR_PROB
    sigma = tf.random.stateless_uniform([], seeds[5], *P.BLUR_SIGMA)
    image = tf.cond(blur, lambda: gaussian_blur(image, sigma), lambda: image)
  flip = tf.random.stateless_uniform([], seeds[6]) < P.FLIP_PROB
  image, label = tf.cond(flip, lambda: (image[:, ::-1], label[:, ::-1]), lambda: (image, label))
  image.set_shape(list(crop_size) + [3])
  return image, tf.cast(tf.reshape(label, crop_size), tf.int32)


def random_crop(image: tf.Tensor, label: tf.Tensor | None, seed: tf.Tensor,
                crop_size: tuple[int, int]):
  """Pads (see `pad_to_size`) then crops the same random window from image and label."""
  image, label = pad_to_size(image, label, crop_size[0], crop_size[1])
  shape = tf.shape(image)
  seeds = tf.random.experimental.stateless_split(seed, 2)
  y = tf.random.stateless_uniform([], seeds[0], 0, shape[0] - crop_size[0] + 1, tf.int32)
  x = tf.random.stateless_uniform([], seeds[1], 0, shape[1] - crop_size[1] + 1, tf.int32)
  image = image[y:y + crop_size[0], x:x + crop_size[1]]
  image.set_shape(list(crop_size) + [3])
  if label is not None:
    label = label[y:y + crop_size[0], x:x + crop_size[1]]
    label.set_shape(list(crop_size) + [1])
  return image, label


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


def labelled_subset(ids: Sequence[str], classes: Sequence[np.ndarray], num_labels: int, *,
                    min_classes: int, num_classes: int, seed: int,
                    labelled_pool: Sequence[str] | None = None,
                    subset: str = names.SUBSETS[0]) -> list[str]:
  """The labelled image ids, drawn from `labelled_pool` if given.

  subset: 'class_balanced' (`splits.select_labelled`, ReCo's rule; min_classes and
  num_classes apply) or 'uniform' (`splits.select_uniform`, Zhao et al.'s; the classes are
  not looked at).
  """
  if subset not in names.SUBSETS:
    raise ValueError(f'subset={subset!r}: expected one of {names.SUBSETS}.')
  pool_ids, pool_classes = list(ids), list(classes)
  if labelled_pool is not None:
    pool = set(labelled_pool)
    pool_ids = [i for i in ids if i in pool]
    pool_classes = [c for i, c in zip(ids, classes) if i in pool]
    if num_labels > len(pool_ids) or not pool_ids:
      raise ValueError(f'{num_labels} labelled images requested from a pool of '
                       f'{len(pool_ids)} train images ({len(pool)} listed); lower num_labels.')
  if subset == 'uniform':
    return splits.select_uniform(pool_ids, num_labels, seed=seed)
  return splits.select_labelled(pool_ids, pool_classes, num_labels, min_classes=min_classes,
                                num_classes=num_classes, seed=seed)


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


def _options(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def unlabelled_selection(ids: Sequence[str], labelled_ids: Sequence[str], fraction: float,
                         seed: int) -> tuple[Sequence[str], bool, int]:
  """Which train images the unlabelled stream reads: (ids, keep, count) for `_stream`.

  The images not labelled (all of them when every image is labelled, as in the reference),
  or a seeded `fraction` of those.
  """
  all_labelled = len(labelled_ids) == len(ids)
  if fraction < 1.0:
    chosen = set(labelled_ids)
    pool = ids if all_labelled else [i for i in ids if i not in chosen]
    u_ids = splits.seeded_fraction(pool, fraction, seed)
    return u_ids, True, len(u_ids)
  if all_labelled:
    return labelled_ids, True, len(labelled_ids)
  return labelled_ids, False, len(ids) - len(labelled_ids)


def train_iterators(builder: tfds.core.DatasetBuilder, *, num_labels: int, min_classes: int,
                    num_classes: int, partial: str, crop_size: tuple[int, int],
                    scale_range: tuple[float, float], labelled_batch: int,
                    unlabelled_batch: int, seed: int, process_index: int = 0,
                    process_count: int = 1, start_batch: int = 0,
                    labelled_pool: Sequence[str] | None = None,
                    unlabelled_fraction: float = 1.0,
                    pseudo_labels: Mapping[str, bytes] | None = None,
                    hue_jitter: float = P.JITTER_HUE,
                    subset: str = names.SUBSETS[0],
                    labelled_photometric: bool = True,
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
    builder: a prepared TFDS builder (base.prepare) with a 'train' split.
    num_labels, min_classes, num_classes: the labelled subset (see splits.select_labelled).
    partial: '' for full labels, else the partial-label mode.
    crop_size: (height, width) of training crops.
    scale_range: (low, high) random rescale factor for labelled images.
    labelled_batch, unlabelled_batch: GLOBAL batch sizes, multiples of process_count.
    seed: run seed; the same seed gives the same batches.
    process_index, process_count: this process and the number of processes.
    start_batch: batches already consumed (a resumed run): the iterators yield exactly what an
      uninterrupted run would yield from that batch on. Skipping happens on encoded examples,
      before decoding and augmentation (each example's augmentation seed is its position).
    labelled_pool: the ids the labelled subset is drawn from (e.g. the 1,464 images of VOC's
      original train list, the PseudoSeg partition of the ReCo paper's Table 2); None = every
      train image. The unlabelled images are still all the others.
    unlabelled_fraction: in (0, 1]: a seeded subset of this fraction of the unlabelled images
      is used (ReCo paper Fig. 7c).
    pseudo_labels: {image id: PNG-encoded uint8 label} of train images that join the labelled
      stream with these labels (a model's predictions: method=pseudo_label); their ids must
      not be among the labelled ones. The unlabelled stream is unchanged.
    hue_jitter: the largest hue shift of the labelled images' colour jitter, in turns.
    subset: how the labelled subset is drawn, one of `names.SUBSETS` (see `labelled_subset`).
    labelled_photometric: False gives the labelled images rescale, crop and flip only (no
      colour jitter or blur), as UniMatch's authors do.

  Returns:
    (labelled iterator, unlabelled iterator or None, the labelled image ids in chosen order).
  """
  if partial and partial not in names.PARTIAL_FRACTIONS:
    raise ValueError(f"partial must be '' or one of {sorted(names.PARTIAL_FRACTIONS)}, got "
                     f'{partial!r}.')
  if partial and num_labels:
    raise ValueError(f'partial labels use every train image: set num_labels=0 (got '
                     f'{num_labels}) when partial={partial!r}.')
  if len(crop_size) != 2 or min(crop_size) < 1:
    raise ValueError(f'crop_size must be (height, width) >= 1, got {crop_size}.')
  crop_size = (int(crop_size[0]), int(crop_size[1]))
  if not 0 < scale_range[0] <= scale_range[1]:
    raise ValueError(f'scale_range must be (low, high) with 0 < low <= high, got {scale_range}.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, {process_count}).')
  local_l = _check_batch('labelled_batch', labelled_batch, process_count)
  local_u = _check_batch('unlabelled_batch', unlabelled_batch, process_count)
  if local_l == 0:
    raise ValueError('labelled_batch must be at least the process count.')
  if start_batch < 0:
    raise ValueError(f'start_batch must be >= 0, got {start_batch}.')

  if not 0.0 < unlabelled_fraction <= 1.0:
    raise ValueError(f'unlabelled_fraction must be in (0, 1], got {unlabelled_fraction}.')

  ids, classes = train_ids_and_classes(builder)
  labelled_ids = labelled_subset(ids, classes, num_labels, min_classes=min_classes,
                                 num_classes=num_classes, seed=seed,
                                 labelled_pool=labelled_pool, subset=subset)
  stream_ids = list(labelled_ids)
  if pseudo_labels:
    if partial:
      raise ValueError('pseudo_labels and partial labels cannot be combined.')
    clash = sorted(set(pseudo_labels) & set(labelled_ids))
    unknown = sorted(set(pseudo_labels) - set(ids))
    if clash or unknown:
      raise ValueError(f'pseudo_labels must label train images outside the labelled subset; '
                       f'labelled: {clash[:5]}, not in the train split: {unknown[:5]}.')
    stream_ids += sorted(pseudo_labels)
    pseudo_fn = _pseudo_label_fn(pseudo_labels)
  all_labelled = len(stream_ids) == len(ids)
  partial_fn = _partial_fn(partial, seed) if partial else None
  common = dict(process_index=process_index, process_count=process_count)

  # A strict subset is small next to the split: cache its encoded bytes rather than scanning
  # the whole split every epoch.
  l_seed = derive_seed(seed, 'labelled', process_index)
  labelled = _stream(builder, 'train', stream_ids, keep=True, num_examples=len(stream_ids),
                     cache=not all_labelled, seed=l_seed, **common).skip(start_batch * local_l)

  def labelled_map(position, ex):
    image, label = _decode(builder, ex)
    if pseudo_labels:
      label = pseudo_fn(ex['image_id'], label)
    if partial_fn:
      label = partial_fn(label, ex['image_id'])
    image, label = augment_labelled(image, label, _example_seed(l_seed, position),
                                    crop_size=crop_size, scale_range=scale_range,
                                    photometric=labelled_photometric, hue_jitter=hue_jitter)
    return {'image': normalization.normalize(image), 'label': label}

  labelled = labelled.map(labelled_map, num_parallel_calls=tf.data.AUTOTUNE)
  labelled = _options(labelled.batch(local_l, drop_remainder=True).prefetch(2))

  unlabelled = None
  if local_u:
    u_ids, keep, count = unlabelled_selection(ids, labelled_ids, unlabelled_fraction, seed)
    if count == 0:
      raise ValueError('unlabelled_batch > 0 but no train image is left unlabelled.')
    u_seed = derive_seed(seed, 'unlabelled', process_index)
    unlabelled = _stream(builder, 'train', u_ids, keep=keep, num_examples=count, cache=False,
                         seed=u_seed, **common).skip(start_batch * local_u)

    def unlabelled_map(position, ex):
      image, label = _decode(builder, ex)
      image = tf.image.convert_image_dtype(image, tf.float32)
      if partial_fn:
        label = partial_fn(label, ex['image_id'])
        image, label = random_crop(image, label, _example_seed(u_seed, position), crop_size)
        return {'image': normalization.normalize(image),
                'label': tf.cast(label[..., 0], tf.int32)}
      image, _ = random_crop(image, None, _example_seed(u_seed, position), crop_size)
      return {'image': normalization.normalize(image)}

    unlabelled = unlabelled.map(unlabelled_map, num_parallel_calls=tf.data.AUTOTUNE)
    unlabelled = _options(unlabelled.batch(local_u, drop_remainder=True).prefetch(2))
    unlabelled = iter(tfds.as_numpy(unlabelled))
  return iter(tfds.as_numpy(labelled)), unlabelled, labelled_ids


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


def fit_to_size(image: tf.Tensor, label: tf.Tensor, height: int, width: int):
  """Pads bottom/right (image reflected, label void) or centre-crops to exactly (height, width).

  image: [h, w, 3] float32; label: [h, w, 1] uint8. The reference pads the same way and
  random-crops larger images; a centre crop keeps evaluation deterministic (its VOC, Cityscapes
  and SUN evaluation sizes never crop).
  """
  image, label = pad_to_size(image, label, height, width)
  shape = tf.shape(image)
  y, x = (shape[0] - height) // 2, (shape[1] - width) // 2
  image = image[y:y + height, x:x + width]
  label = label[y:y + height, x:x + width]
  image.set_shape([height, width, 3])
  label.set_shape([height, width, 1])
  return image, label


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
    image, label = fit_to_size(image, label, height, width)
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

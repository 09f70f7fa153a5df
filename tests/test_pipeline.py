"""Input pipelines: shapes, augmentation geometry, seeds, multi-process sharding, evaluation."""
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from reco_jax import normalization
from reco_jax.data import image_ops
from reco_jax.data import pipeline
from reco_jax.data import splits
from reco_jax.data import toy

NUM_CLASSES = toy.NUM_CLASSES


@pytest.fixture(scope='module')
def builder(toy_data_dir):
  return tfds.builder('reco_toy/tiny', data_dir=toy_data_dir)


_STREAM_ARGS = ('process_index', 'process_count', 'start_batch', 'pseudo_labels')


def _train(builder, **overrides):
  kw = dict(num_labels=10, min_classes=2, num_classes=NUM_CLASSES, partial='',
            crop_size=(40, 48), scale_range=(0.5, 1.5), labelled_batch=4, unlabelled_batch=2,
            seed=0)
  kw.update(overrides)
  data = pipeline.TrainData(**{k: v for k, v in kw.items() if k not in _STREAM_ARGS})
  return pipeline.train_iterators(builder, data,
                                  **{k: v for k, v in kw.items() if k in _STREAM_ARGS})


def test_train_batches_shapes_and_dtypes(builder):
  labelled, unlabelled, ids = _train(builder)
  assert len(ids) == len(set(ids)) == 10
  batch = next(labelled)
  assert set(batch) == {'image', 'label'}
  assert batch['image'].shape == (4, 40, 48, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (4, 40, 48) and batch['label'].dtype == np.int32
  values = np.unique(batch['label'])
  assert set(values.tolist()) <= set(range(NUM_CLASSES)) | {255}
  # ImageNet-normalised: a [0, 1] image maps into [-2.2, 2.7].
  assert batch['image'].min() >= -2.2 and batch['image'].max() <= 2.7
  assert batch['image'].min() < -0.5 < 0.5 < batch['image'].max()
  u = next(unlabelled)
  assert set(u) == {'image'} and u['image'].shape == (2, 40, 48, 3)


def test_same_seed_same_batches_other_seed_differs(builder, monkeypatch):
  """Whatever the parallelism: the streams are deterministic and not autotuned, and the same
  seed's streams with tf.data's autotuning on give the same batches."""
  options = pipeline.dataset_options()
  assert options.deterministic and not options.autotune.enabled
  runs = [_train(builder, seed=5)]
  options.autotune.enabled = True
  monkeypatch.setattr(pipeline, 'dataset_options', lambda: options)
  runs += [_train(builder, seed=s) for s in (5, 6)]
  first = [[next(it) for _ in range(2)] for it in (r[0] for r in runs)]
  firstu = [next(r[1]) for r in runs]
  assert runs[0][2] == runs[1][2]
  for a, b in zip(first[0], first[1]):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  np.testing.assert_array_equal(firstu[0]['image'], firstu[1]['image'])
  assert not np.array_equal(first[0][0]['image'], first[2][0]['image'])
  assert not np.array_equal(firstu[0]['image'], firstu[2]['image'])


def _palette_scene():
  """A 40x56 label of 16 classes in a 4x4 grid and an image painting each class its colour."""
  yy, xx = np.mgrid[:40, :56]
  label = (yy // 10 * 4 + xx // 14).astype(np.uint8)
  palette = np.random.default_rng(0).integers(0, 256, (16, 3)).astype(np.uint8)
  return palette[label], label, palette


def test_augmentation_keeps_image_and_label_aligned():
  image, label, palette = _palette_scene()
  flips = set()
  for s in range(16):
    out_image, out_label = image_ops.augment_labelled(
        tf.constant(image), tf.constant(label[..., None]), tf.constant([s, 1], tf.int64),
        crop_size=(32, 32), scale_range=(0.5, 1.5), photometric=False)
    out_image, out_label = out_image.numpy(), out_label.numpy()
    assert out_image.shape == (32, 32, 3) and out_label.shape == (32, 32)
    # Where the 5x5 neighbourhood has a single class, the pixel has that class's colour.
    padded = np.pad(out_label, 2, constant_values=255)
    same = np.ones_like(out_label, bool)
    for dy in range(5):
      for dx in range(5):
        same &= padded[dy:dy + 32, dx:dx + 32] == out_label
    same &= out_label != 255
    assert same.sum() > 100
    err = np.abs(out_image[same] - palette[out_label[same]] / 255.0).max()
    assert err < 0.02, (s, err)
    # Classes grow with x in the source; a flipped crop has them decrease along rows.
    rows = [r[r != 255] for r in out_label]
    steps = np.concatenate([np.diff(r % 4) for r in rows if r.size > 1])
    flips.add(bool((steps < 0).any()) if (steps != 0).any() else None)
  assert {True, False} <= flips  # both branches of the flip were exercised


def test_reflect_padding_beyond_the_image_size():
  image = np.arange(3 * 2 * 3, dtype=np.float32).reshape(3, 2, 3)
  label = np.arange(6, dtype=np.uint8).reshape(3, 2, 1)
  out_image, out_label = image_ops.pad_to_size(tf.constant(image), tf.constant(label), 10, 9)
  np.testing.assert_array_equal(out_image.numpy(),
                                np.pad(image, ((0, 7), (0, 7), (0, 0)), mode='reflect'))
  expected = np.full((10, 9, 1), 255, np.uint8)
  expected[:3, :2] = label
  np.testing.assert_array_equal(out_label.numpy(), expected)
  with pytest.raises(tf.errors.InvalidArgumentError):  # why pad_to_size does not use tf.pad
    tf.pad(tf.constant(image), [[0, 7], [0, 7], [0, 0]], mode='REFLECT')


def test_colour_jitter_is_multiplicative_and_grey_preserving():
  black = tf.zeros([8, 8, 3])
  grey = tf.fill([8, 8, 3], 0.4)
  for s in range(8):
    seed = tf.constant([s, 0], tf.int64)
    np.testing.assert_allclose(image_ops.colour_jitter(black, seed).numpy(), 0, atol=1e-6)
    out = image_ops.colour_jitter(grey, seed).numpy()
    assert np.ptp(out) < 1e-5  # contrast/saturation/hue leave a uniform grey image uniform grey
    assert 0.4 * 0.75 - 1e-5 <= out[0, 0, 0] <= 0.4 * 1.25 + 1e-5


def test_gaussian_blur_of_an_impulse_is_the_gaussian():
  image = np.zeros((15, 15, 3), np.float32)
  image[7, 7] = 1.0
  sigma = 0.9
  out = image_ops.gaussian_blur(tf.constant(image), tf.constant(sigma)).numpy()
  x = np.arange(-4, 5)
  k = np.exp(-0.5 * (x / sigma) ** 2)
  k /= k.sum()
  expected = np.zeros((15, 15))
  expected[3:12, 3:12] = np.outer(k, k)
  for c in range(3):
    np.testing.assert_allclose(out[..., c], expected, atol=1e-6)


def _first_epoch_ids(builder, ids, process_index, process_count, num_examples, take,
                     cache=True, keep=True):
  ds = pipeline._stream(builder, 'train', ids, keep=keep, num_examples=num_examples,
                        cache=cache, seed=pipeline.derive_seed(0, 'test', process_index),
                        process_index=process_index, process_count=process_count)
  return [ex['image_id'].decode() for _, ex in tfds.as_numpy(ds.take(take))]


@pytest.mark.parametrize('process_count', [2, 5])
def test_process_shards_are_disjoint_and_complete(builder, process_count):
  ids = [f'train_{k:05d}' for k in range(48)]
  seen = []
  for p in range(process_count):
    share = len(range(p, 48, process_count))
    got = _first_epoch_ids(builder, ids, p, process_count, 48, share)
    assert len(set(got)) == share  # one epoch of this process: each of its examples once
    seen.extend(got)
  assert sorted(seen) == ids


def test_uncached_shards_read_disjoint_parts_of_the_split(builder):
  labelled = [f'train_{k:05d}' for k in range(0, 48, 4)]
  seen = []
  for p in range(3):
    got = _first_epoch_ids(builder, labelled, p, 3, 36, 60, cache=False, keep=False)
    assert not set(got) & set(labelled)
    seen.append(set(got))
  assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
  assert set.union(*seen) == {f'train_{k:05d}' for k in range(48)} - set(labelled)


def test_small_labelled_set_is_read_whole_by_every_process(builder):
  ids = ['train_00003', 'train_00007']
  orders = [_first_epoch_ids(builder, ids, p, 3, 2, 8) for p in range(3)]
  for order in orders:
    assert sorted(set(order)) == ids
  assert len({tuple(o) for o in orders}) > 1  # each process shuffles with its own seed


def test_per_process_batches_are_a_share_of_the_global_batch(builder):
  labelled, unlabelled, ids = _train(builder, process_index=1, process_count=2)
  assert next(labelled)['image'].shape[0] == 2 and next(unlabelled)['image'].shape[0] == 1
  with pytest.raises(ValueError, match='multiple of the process count'):
    _train(builder, labelled_batch=3, process_count=2)


def test_partial_labels_everywhere(builder):
  labelled, unlabelled, ids = _train(builder, num_labels=0, partial='p0', scale_range=(1., 1.))
  assert len(ids) == 48
  batch, u = next(labelled), next(unlabelled)
  assert set(u) == {'image', 'label'} and u['label'].shape == (2, 40, 48)
  for lab in np.concatenate([batch['label'], u['label']]):
    # one seed pixel per class present (at most 9), at scale 1.0 never duplicated
    kept = lab[lab != 255]
    assert kept.size == np.unique(kept).size <= NUM_CLASSES
  with pytest.raises(ValueError, match='num_labels=0'):
    _train(builder, num_labels=5, partial='p1')


def test_eval_pads_and_flags_valid_examples(builder):
  decoded = list(tfds.as_numpy(builder.as_dataset(split='validation', shuffle_files=False)))
  batches = pipeline.eval_iterator(builder, eval_size=(100, 98), batch_size=8)
  assert len(batches) == 2
  got = list(batches)
  assert len(got) == 2 and len(list(batches)) == 2  # re-iterable
  valid = np.concatenate([b['valid'] for b in got])
  np.testing.assert_array_equal(valid, [True] * 12 + [False] * 4)
  first = got[0]
  assert first['image'].shape == (8, 100, 98, 3) and first['image'].dtype == np.float32
  assert first['label'].shape == (8, 100, 98) and first['label'].dtype == np.int32
  ex = decoded[0]
  h, w = ex['label'].shape[:2]
  want = normalization.normalize(ex['image'] / np.float32(255))
  np.testing.assert_allclose(first['image'][0, :h, :w], want, atol=1e-5)
  np.testing.assert_allclose(first['image'][0, h:h + 3, :w], want[h - 2:h - 5:-1], atol=1e-5)
  np.testing.assert_array_equal(first['label'][0, :h, :w], ex['label'][..., 0])
  assert (first['label'][0, h:] == 255).all() and (first['label'][0, :, w:] == 255).all()
  padding = got[1]
  assert (padding['label'][~padding['valid']] == 255).all()
  assert (padding['image'][~padding['valid']] == 0).all()


def test_eval_centre_crops_larger_images(builder):
  batch = next(iter(pipeline.eval_iterator(builder, eval_size=(32, 40), batch_size=4)))
  assert batch['image'].shape == (4, 32, 40, 3) and batch['valid'].all()


@pytest.mark.parametrize('process_count,batch_size', [(3, 6), (5, 5)])
def test_eval_processes_run_equal_batches_and_cover_the_split(builder, process_count,
                                                              batch_size):
  reference = [b for b in pipeline.eval_iterator(builder, eval_size=(96, 96), batch_size=4)]
  want = sorted(float(x.sum()) for b in reference for x, v in zip(b['image'], b['valid']) if v)
  counts, sums = set(), []
  for p in range(process_count):
    batches = pipeline.eval_iterator(builder, eval_size=(96, 96), batch_size=batch_size,
                                     process_index=p, process_count=process_count)
    got = list(batches)
    counts.add(len(got))
    assert len(got) == len(batches)
    for b in got:
      assert b['image'].shape[0] == batch_size // process_count
      sums.extend(float(x.sum()) for x, v in zip(b['image'], b['valid']) if v)
  assert len(counts) == 1
  np.testing.assert_allclose(sorted(sums), want, rtol=1e-6)


def test_start_batch_continues_the_uninterrupted_stream(builder):
  full_l, full_u, _ = _train(builder, seed=3)
  batches = [(next(full_l), next(full_u)) for _ in range(3)]
  resumed_l, resumed_u, _ = _train(builder, seed=3, start_batch=2)
  l, u = next(resumed_l), next(resumed_u)
  np.testing.assert_array_equal(l['image'], batches[2][0]['image'])
  np.testing.assert_array_equal(l['label'], batches[2][0]['label'])
  np.testing.assert_array_equal(u['image'], batches[2][1]['image'])
  assert not np.array_equal(l['image'], batches[1][0]['image'])


def test_labelled_subset_is_drawn_from_the_pool(builder):
  pool = [f'train_{i:05d}' for i in range(0, 48, 3)]
  for seed in (0, 1):
    _, unlabelled, ids = _train(builder, num_labels=4, labelled_pool=pool, seed=seed)
    assert len(ids) == 4 and set(ids) <= set(pool)
    assert _train(builder, num_labels=4, labelled_pool=pool, seed=seed)[2] == ids
    assert next(unlabelled)['image'].shape == (2, 40, 48, 3)
  with pytest.raises(ValueError, match='pool of 16 train images'):
    _train(builder, labelled_pool=pool, num_labels=20)


def test_uniform_subset_is_the_seeded_uniform_draw(builder):
  ids, classes = pipeline.train_ids_and_classes(builder)
  drawn = {}
  for seed in (0, 1):
    labelled, _, drawn[seed] = _train(builder, num_labels=6, subset='uniform', seed=seed,
                                      unlabelled_batch=0)
    assert drawn[seed] == splits.select_uniform(ids, 6, seed=seed)
    assert next(labelled)['image'].shape == (4, 40, 48, 3)
  assert drawn[0] != drawn[1]
  # A min_classes that no image meets: the class-balanced rule fails, uniform never looks.
  with pytest.raises(ValueError, match='with at least 99 classes'):
    splits.labelled_subset(ids, classes, 6, min_classes=99, num_classes=NUM_CLASSES, seed=0)
  assert splits.labelled_subset(ids, classes, 6, min_classes=99, num_classes=NUM_CLASSES,
                                  seed=0, subset='uniform') == drawn[0]
  with pytest.raises(ValueError, match="subset='random'"):
    splits.labelled_subset(ids, classes, 6, min_classes=2, num_classes=NUM_CLASSES, seed=0,
                             subset='random')


def test_a_fraction_of_the_unlabelled_images_feeds_the_unlabelled_stream(builder):
  ids = [f'i{n}' for n in range(40)]
  labelled = ids[:8]
  assert splits.unlabelled_selection(ids, labelled, 1.0, 0) == (labelled, False, 32)
  half, keep, count = splits.unlabelled_selection(ids, labelled, 0.5, 0)
  assert keep and count == len(half) == 16 and not set(half) & set(labelled)
  # Every image labelled: the unlabelled stream reads (a fraction of) all of them.
  assert splits.unlabelled_selection(ids, ids, 1.0, 0) == (ids, True, 40)
  assert splits.unlabelled_selection(ids, ids, 0.25, 0)[2] == 10
  _, unlabelled, _ = _train(builder, num_labels=4, unlabelled_fraction=0.5)
  assert next(unlabelled)['image'].shape == (2, 40, 48, 3)
  with pytest.raises(ValueError, match='unlabelled_fraction'):
    _train(builder, num_labels=4, unlabelled_fraction=0.0)


def test_colour_jitter_shifts_hue_within_hue_jitter():
  """A saturated colour keeps its hue with hue_jitter=0 and moves by about hue_jitter at most
  (the grey blends of contrast and saturation move it a little too)."""
  red = tf.tile(tf.constant([[[0.9, 0.1, 0.1]]]), [4, 4, 1])
  hue = lambda x: tf.image.rgb_to_hsv(x).numpy()[0, 0, 0]
  shifts = {0.0: [], 0.1: []}
  for s in range(16):
    seed = tf.constant([s, 1], tf.int64)
    for limit in shifts:
      h = hue(image_ops.colour_jitter(red, seed, limit))
      shifts[limit].append(min(h, 1 - h))  # distance from red's hue 0 around the wheel
  assert max(shifts[0.0]) < 1e-3
  assert 0.02 < max(shifts[0.1]) <= 0.11

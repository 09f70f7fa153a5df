"""The procedural `reco_toy` dataset."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from reco_jax.data import base
from reco_jax.data import toy


def _build(directory):
  b = tfds.builder('reco_toy/tiny', data_dir=str(directory))
  b.download_and_prepare()
  return b


def _examples(builder, split):
  ds = builder.as_dataset(split=split, shuffle_files=False)
  return list(tfds.as_numpy(ds))


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  return _build(tmp_path_factory.mktemp('a'))


def test_registered_with_configs():
  assert tfds.builder_cls('reco_toy') is toy.RecoToy
  default = toy.RecoToy.BUILDER_CONFIGS[0]
  assert (default.name, default.num_train, default.num_validation) == ('default', 2000, 200)


def test_tiny_build_counts_sizes_and_metadata(tiny):
  assert tiny.info.splits['train'].num_examples == 48
  assert tiny.info.splits['validation'].num_examples == 12
  assert base.class_names(tiny) == toy.CLASS_NAMES and len(toy.CLASS_NAMES) == 9
  sizes = set()
  for ex in _examples(tiny, 'train'):
    h, w = ex['image'].shape[:2]
    assert 64 <= h <= 96 and 64 <= w <= 96 and ex['image'].dtype == np.uint8
    assert ex['label'].shape == (h, w, 1)
    labels = np.unique(ex['label'])
    np.testing.assert_array_equal(ex['classes'], labels[labels != 255])
    sizes.add((h, w))
  assert len(sizes) > 20  # sizes vary, so evaluation padding is exercised


def test_void_band_separates_every_pair_of_classes(tiny):
  for ex in _examples(tiny, 'validation'):
    label = ex['label'][..., 0].astype(np.int32)
    void = label == 255
    assert 0.003 < void.mean() < 0.3
    for a, b in ((label[1:], label[:-1]), (label[:, 1:], label[:, :-1])):
      touching = (a != 255) & (b != 255)
      assert (a[touching] == b[touching]).all()


def test_two_builds_are_identical(tiny, tmp_path):
  again = _build(tmp_path)
  for split in ('train', 'validation'):
    for x, y in zip(_examples(tiny, split), _examples(again, split), strict=True):
      assert x['image_id'] == y['image_id']
      np.testing.assert_array_equal(x['image'], y['image'])
      np.testing.assert_array_equal(x['label'], y['label'])


def test_class_coverage_rarity_and_uninformative_colour():
  config = toy.RecoToyConfig(name='probe')
  counts = np.zeros(toy.NUM_CLASSES)
  colour_sum = np.zeros((toy.NUM_CLASSES, 3))
  pixels = np.zeros(toy.NUM_CLASSES)
  for i in range(300):
    ex = toy.example('train', i, config)
    counts[ex['classes']] += 1
    label = ex['label'][..., 0]
    for c in ex['classes']:
      colour_sum[c] += ex['image'][label == c].sum(0) / 255
      pixels[c] += (label == c).sum()
  assert (counts > 0).all()  # every class occurs
  names = list(toy.CLASS_NAMES)
  rare = counts[[names.index('cross'), names.index('checkered')]]
  common = counts[[names.index(n) for n in ('disc', 'ring', 'square', 'diamond')]]
  assert rare.max() < 0.5 * common.min()
  # Random colours: every class has about the same mean colour, so colour alone cannot tell.
  means = colour_sum / pixels[:, None]
  assert np.abs(means - means.mean(0)).max() < 0.2  # fixed colours would give ~0.5


def test_examples_are_seeded_per_index():
  config = toy.RecoToyConfig(name='probe')
  a, b = toy.example('validation', 3, config), toy.example('validation', 3, config)
  np.testing.assert_array_equal(a['image'], b['image'])
  assert a['image_id'] == 'validation_00003'
  c = toy.example('validation', 4, config)
  assert a['image'].shape != c['image'].shape or not np.array_equal(a['image'], c['image'])

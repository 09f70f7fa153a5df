"""The procedural `reco_toy` dataset."""
import pathlib

import matplotlib.colors
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import toy as toy_config
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
  assert (default.name, default.num_train, default.num_validation) == ('default', 2000, 500)


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


def _class_pixels(count):
  """Per class: images it occurs in, and the hues (HSV, in [0, 1)) of its pixels."""
  config = toy.RecoToyConfig(name='probe')
  counts = np.zeros(toy.NUM_CLASSES)
  hues = [[] for _ in range(toy.NUM_CLASSES)]
  for i in range(count):
    ex = toy.example('train', i, config)
    counts[ex['classes']] += 1
    label = ex['label'][..., 0]
    rgb = ex['image'].astype(np.float32) / 255
    hue = matplotlib.colors.rgb_to_hsv(rgb)[..., 0]
    for c in ex['classes']:
      hues[c].append(hue[label == c])
  return counts, [np.concatenate(h) for h in hues]


def test_class_coverage_rarity_and_hue_bands():
  counts, hues = _class_pixels(300)
  assert (counts > 0).all()  # every class occurs
  names = list(toy.CLASS_NAMES)
  rare = counts[names.index('rings')]
  common = counts[[names.index(n) for n in names[1:-1]]]
  assert rare < 0.5 * common.min()
  # Colour narrows a class down but does not decide it: each class's pixel hues centre on its
  # own band (k / 8), and neighbouring classes' hue ranges overlap.
  for k in range(1, toy.NUM_CLASSES):
    offset = (hues[k] - (k - 1) / 8 + 0.5) % 1 - 0.5  # signed distance to the band centre
    assert abs(np.median(offset)) < 0.03, (names[k], np.median(offset))
    assert np.mean(np.abs(offset) < 0.15) > 0.8  # random hues would give 0.3
    assert np.mean(np.abs(offset) > 1 / 16) > 0.05  # beyond half-way to a neighbour's centre


def test_textures_tell_neighbouring_classes_apart():
  """Same colours, period and frame: each texture gives a different two-tone pattern."""
  yy, xx = np.mgrid[:48, :48].astype(np.float32) - 24
  patterns = {name: toy._pattern(name, xx, yy, 8.0, np.random.default_rng(0))
              for name in toy.CLASS_NAMES[1:]}
  for a in patterns:
    for b in patterns:
      if a < b:
        assert np.mean(patterns[a] != patterns[b]) > 0.1, (a, b)


def test_examples_are_seeded_per_index():
  config = toy.RecoToyConfig(name='probe')
  a, b = toy.example('validation', 3, config), toy.example('validation', 3, config)
  np.testing.assert_array_equal(a['image'], b['image'])
  assert a['image_id'] == 'validation_00003'
  c = toy.example('validation', 4, config)
  assert a['image'].shape != c['image'].shape or not np.array_equal(a['image'], c['image'])


def test_console_reference_matches_the_results_file():
  """The figures a toy run prints at its end are the benchmark's (the results file)."""
  table = (pathlib.Path(__file__).parents[1] / 'benchmarks' / 'results' /
           'label_efficiency.md').read_text()
  head, *body = [[cell.strip() for cell in line.split('|')[1:-1]]
                  for line in table.splitlines() if line.startswith('| ')]
  rows = {row[0]: row[1:] for row in body}
  every = f'all {toy.RecoToyConfig.num_train:,} labels'  # the benchmark's all-labels column
  columns = {0 if c == every else int(c.split()[0]): i for i, c in enumerate(head[1:])}
  assert set(toy.REFERENCE_MIOU) == set(columns)
  for labels, figures in toy.REFERENCE_MIOU.items():
    for name, *mean_low_high in figures:
      cell = rows[name][columns[labels]]
      # '41.9 (34.5-48.0)' or '47.2 (40.6-58.4; 5 seeds)'
      mean, low_high = cell.split()[:2]
      low, high = low_high.strip('(;)').split('-')
      got = [float(x) / 100 for x in (mean, low, high)]
      assert max(abs(g - w) for g, w in zip(got, mean_low_high)) < 0.0006, (labels, name)
  assert toy_config.get_config().num_train_steps == toy.REFERENCE_STEPS  # the same budget
  line = toy.reference_line('reco_toy', 30, toy.REFERENCE_STEPS)
  assert 'Supervised' in line and f'all {toy.RecoToyConfig.num_train:,} labels' in line
  assert toy.reference_line('reco_toy/tiny', 30, toy.REFERENCE_STEPS) is None
  assert toy.reference_line('reco_toy', 30, 10) is None
  assert toy.reference_line('reco_toy', 45, toy.REFERENCE_STEPS) is None

"""Where the labelled and unlabelled images come from: the PseudoSeg partition (ReCo paper
Table 2) and a fraction of the unlabelled images (Fig. 7c)."""
import importlib.resources

import pytest
import tensorflow_datasets as tfds

from configs import cityscapes
from configs import voc
from reco_jax import names
from reco_jax import train
from reco_jax.data import pipeline
from reco_jax.data import splits
from reco_jax.data import toy


def _shipped(filename):
  return (importlib.resources.files('reco_jax.data') / 'splits' / filename).read_text().split()


def test_pseudoseg_pool_is_vocs_1464_train_images_within_train_aug():
  pool = _shipped(names.LABELLED_POOLS['pseudoseg'])
  assert len(pool) == len(set(pool)) == 1464
  assert set(pool) <= set(_shipped('voc_train_aug.txt'))
  assert train._labelled_pool('pseudoseg') == pool and train._labelled_pool('') is None


def test_voc_config_takes_the_partition_and_the_fraction():
  c = voc.get_config('split=pseudoseg,labels=92,unlabelled_fraction=0.25')
  assert (c.split, c.labels, c.unlabelled_fraction) == ('pseudoseg', 92, 0.25)
  assert voc.get_config().split == '' and voc.get_config().unlabelled_fraction == 1.0
  with pytest.raises(ValueError, match='partition of Pascal VOC'):
    cityscapes.get_config('split=pseudoseg')
  with pytest.raises(ValueError, match='expected one of'):
    voc.get_config('split=coco')
  bad = voc.get_config('unlabelled_fraction=1.5')
  with pytest.raises(ValueError, match='unlabelled_fraction'):
    train.validate_config(bad)


def test_seeded_fraction_is_a_deterministic_subset():
  ids = [f'id{i:03d}' for i in range(200)]
  quarter = splits.seeded_fraction(ids, 0.25, seed=0)
  assert len(quarter) == 50 and set(quarter) <= set(ids)
  assert quarter == sorted(quarter, key=ids.index)  # kept in the split's order
  assert splits.seeded_fraction(ids, 0.25, seed=0) == quarter
  assert splits.seeded_fraction(ids, 0.25, seed=1) != quarter
  assert splits.seeded_fraction(ids, 0.001, seed=0) != []  # at least one


@pytest.fixture(scope='module')
def builder(tmp_path_factory):
  b = tfds.builder('reco_toy/tiny', data_dir=str(tmp_path_factory.mktemp('tfds')))
  b.download_and_prepare()
  return b


def _train(builder, **overrides):
  kw = dict(num_labels=4, min_classes=2, num_classes=toy.NUM_CLASSES, partial='',
            crop_size=(40, 48), scale_range=(0.5, 1.5), labelled_batch=4, unlabelled_batch=2,
            seed=0)
  kw.update(overrides)
  return pipeline.train_iterators(builder, **kw)


def test_labelled_subset_is_drawn_from_the_pool(builder):
  pool = [f'train_{i:05d}' for i in range(0, 48, 3)]
  for seed in (0, 1):
    _, unlabelled, ids = _train(builder, labelled_pool=pool, seed=seed)
    assert len(ids) == 4 and set(ids) <= set(pool)
    assert _train(builder, labelled_pool=pool, seed=seed)[2] == ids
    assert next(unlabelled)['image'].shape == (2, 40, 48, 3)
  with pytest.raises(ValueError, match='pool of 16 train images'):
    _train(builder, labelled_pool=pool, num_labels=20)


def test_a_fraction_of_the_unlabelled_images_feeds_the_unlabelled_stream(builder):
  ids = [f'i{n}' for n in range(40)]
  labelled = ids[:8]
  assert pipeline.unlabelled_selection(ids, labelled, 1.0, 0) == (labelled, False, 32)
  half, keep, count = pipeline.unlabelled_selection(ids, labelled, 0.5, 0)
  assert keep and count == len(half) == 16 and not set(half) & set(labelled)
  # Every image labelled: the unlabelled stream reads (a fraction of) all of them.
  assert pipeline.unlabelled_selection(ids, ids, 1.0, 0) == (ids, True, 40)
  assert pipeline.unlabelled_selection(ids, ids, 0.25, 0)[2] == 10
  _, unlabelled, _ = _train(builder, unlabelled_fraction=0.5)
  assert next(unlabelled)['image'].shape == (2, 40, 48, 3)
  with pytest.raises(ValueError, match='unlabelled_fraction'):
    _train(builder, unlabelled_fraction=0.0)

"""Where the labelled and unlabelled images come from: the PseudoSeg partition (ReCo paper
Table 2) and a fraction of the unlabelled images (Fig. 7c); their pipeline tests are in
test_pipeline.py."""
import pytest

from configs import cityscapes
from configs import voc
from reco_jax import config_checks
from reco_jax import inputs
from reco_jax import names
from reco_jax.data import raw_io
from reco_jax.data import splits


def test_pseudoseg_pool_is_vocs_1464_train_images_within_train_aug():
  pool = raw_io.shipped_ids(names.LABELLED_POOLS['pseudoseg'])
  assert len(pool) == len(set(pool)) == 1464
  assert set(pool) <= set(raw_io.shipped_ids('voc_train_aug.txt'))
  assert inputs.labelled_pool('pseudoseg') == pool and inputs.labelled_pool('') is None


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
    config_checks.validate_config(bad)


def test_seeded_fraction_is_a_deterministic_subset():
  ids = [f'id{i:03d}' for i in range(200)]
  quarter = splits.seeded_fraction(ids, 0.25, seed=0)
  assert len(quarter) == 50 and set(quarter) <= set(ids)
  assert quarter == sorted(quarter, key=ids.index)  # kept in the split's order
  assert splits.seeded_fraction(ids, 0.25, seed=0) == quarter
  assert splits.seeded_fraction(ids, 0.25, seed=1) != quarter
  assert splits.seeded_fraction(ids, 0.001, seed=0) != []  # at least one

"""The TFDS builders build tiny fake raw datasets in the official layouts, and fail clearly."""
import pathlib
import threading

import fake_raw
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

import reco_jax.data  # registers the builders
from reco_jax import data as data_lib
from reco_jax.data import base
from reco_jax.data import cityscapes
from reco_jax.data import raw_io
from reco_jax.data import sun_rgbd

# The official Cityscapes labelId -> trainId table, written out independently of the module.
CITYSCAPES_TABLE = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def _build(name: str, data_dir: pathlib.Path, manual_dir: pathlib.Path):
  return data_lib.prepare(name, str(data_dir), str(manual_dir))


def _read(builder, split: str) -> dict[str, dict]:
  return {ex['image_id'].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(split))}


def _classes(label: np.ndarray) -> list[int]:
  return [int(c) for c in np.unique(label) if c != 255]


def _fails(name: str, tmp_path: pathlib.Path, manual_dir: pathlib.Path, error, match: str):
  """Builds and expects `error`; then checks nothing that looks prepared was left behind."""
  data_dir = tmp_path / 'data'
  with pytest.raises(error, match=match) as info:
    _build(name, data_dir, manual_dir)
  assert not tfds.builder(name, data_dir=str(data_dir)).is_prepared()
  assert not list(data_dir.glob(f'{name}/*/dataset_info.json'))
  assert not list(data_dir.glob(f'{name}/incomplete*'))  # TFDS removed its temporary dir
  return str(info.value)


@pytest.fixture(scope='module')
def voc(tmp_path_factory):
  root = tmp_path_factory.mktemp('voc')
  raw = fake_raw.make_voc(root / 'raw')
  return _build('reco_voc', root / 'data', root / 'raw'), raw


@pytest.fixture(scope='module')
def city(tmp_path_factory):
  root = tmp_path_factory.mktemp('cityscapes')
  raw = fake_raw.make_cityscapes(root / 'raw')
  return _build('reco_cityscapes', root / 'data', root / 'raw'), raw


@pytest.fixture(scope='module')
def sun(tmp_path_factory):
  root = tmp_path_factory.mktemp('sun')
  raw = fake_raw.make_sun(root / 'raw')
  return _build('reco_sun_rgbd', root / 'data', root / 'raw'), raw, root / 'data'


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('folder')
  raw = fake_raw.make_folder(root / 'raw', classes=('sky', 'road', 'car'))
  return _build('reco_folder', root / 'data', root / 'raw'), raw, root / 'data'


def test_importing_the_package_registers_every_builder():
  assert {'reco_voc', 'reco_cityscapes', 'reco_sun_rgbd', 'reco_folder',
          'reco_toy'} <= set(reco_jax.data.BUILDER_NAMES)
  for name in reco_jax.data.BUILDER_NAMES:
    assert tfds.builder_cls(name).name == name


# VOC.


def test_voc_splits_follow_the_list_files_in_the_manual_dir(voc):
  builder, _ = voc
  assert set(_read(builder, 'train')) == {'2007_000001', '2007_000002', '2008_000003',
                                          '2009_000004'}
  assert set(_read(builder, 'validation')) == {'2010_000005', '2011_000006'}
  assert builder.info.splits['train'].num_examples == 4
  assert builder.info.splits['validation'].num_examples == 2


def test_voc_examples_keep_pixels_labels_and_void(voc):
  builder, raw = voc
  examples = {**_read(builder, 'train'), **_read(builder, 'validation')}
  for image_id, (image, label) in raw.items():
    ex = examples[image_id]
    assert ex['image'].shape == (40, 60, 3) and ex['label'].shape == (40, 60, 1)
    np.testing.assert_array_equal(ex['image'], image)  # the pixels PIL decodes from the JPEG
    np.testing.assert_array_equal(ex['label'][..., 0], label)
    assert ex['classes'].tolist() == _classes(label)
  assert any((ex['label'] == 255).any() for ex in examples.values())


def test_voc_class_names_in_metadata(voc):
  names = base.class_names(voc[0])
  assert len(names) == 21 and names[0] == 'background' and names[-1] == 'tvmonitor'
  assert names[15] == 'person'


def test_voc_without_list_files_uses_the_shipped_lists(tmp_path):
  fake_raw.make_voc(tmp_path / 'raw', lists=False)
  message = _fails('reco_voc', tmp_path, tmp_path / 'raw', FileNotFoundError,
                   'train_aug.txt')
  # The shipped train_aug list starts with 2007_000032.
  assert 'JPEGImages/2007_000032.jpg' in message
  assert 'of 21164 files' in message  # 2 x 10,582


def test_voc_bad_label_value_stops_the_build_and_leaves_nothing_prepared(tmp_path):
  fake_raw.make_voc(tmp_path / 'raw')
  label = np.full((40, 60), 3, np.uint8)
  label[5, 5] = 21
  fake_raw.save_png(tmp_path / 'raw' / 'SegmentationClassAug' / '2011_000006.png', label)
  _fails('reco_voc', tmp_path, tmp_path / 'raw', ValueError,
         r'2011_000006: label values \[21\]')
  # Once fixed, the same data_dir builds: the failed attempt left nothing in the way.
  label[5, 5] = 255
  fake_raw.save_png(tmp_path / 'raw' / 'SegmentationClassAug' / '2011_000006.png', label)
  builder = _build('reco_voc', tmp_path / 'data', tmp_path / 'raw')
  assert builder.is_prepared()
  assert builder.info.splits['validation'].num_examples == 2


def test_voc_size_mismatch_stops_the_build_naming_the_image(tmp_path):
  fake_raw.make_voc(tmp_path / 'raw')
  fake_raw.save_png(tmp_path / 'raw' / 'SegmentationClassAug' / '2008_000003.png',
                    np.zeros((40, 59), np.uint8))
  _fails('reco_voc', tmp_path, tmp_path / 'raw', ValueError,
         r'2008_000003: image is 40x60 .*but its label is 40x59')


def test_voc_missing_label_file_is_named(tmp_path):
  fake_raw.make_voc(tmp_path / 'raw')
  (tmp_path / 'raw' / 'SegmentationClassAug' / '2009_000004.png').unlink()
  message = _fails('reco_voc', tmp_path, tmp_path / 'raw', FileNotFoundError,
                   'SegmentationClassAug/2009_000004.png')
  assert '1 of 8' in message and 'incomplete' in message


def test_voc_missing_folder_is_named(tmp_path):
  fake_raw.make_voc(tmp_path / 'raw')
  for path in (tmp_path / 'raw' / 'SegmentationClassAug').iterdir():
    path.unlink()
  (tmp_path / 'raw' / 'SegmentationClassAug').rmdir()
  _fails('reco_voc', tmp_path, tmp_path / 'raw', FileNotFoundError,
         'lacks SegmentationClassAug')


# Cityscapes.


def test_cityscapes_stores_half_resolution_train_ids(city):
  builder, raw = city
  train, val = _read(builder, 'train'), _read(builder, 'validation')
  assert set(train) == {'aachen_000000_000019', 'aachen_000001_000019', 'bochum_000000_000313',
                        'bochum_000000_001097'}
  assert set(val) == {'frankfurt_000000_000294', 'frankfurt_000001_000538'}
  seen = set()
  for image_id, (image, label_ids) in raw.items():
    ex = {**train, **val}[image_id]
    assert ex['image'].shape == (32, 64, 3) and ex['label'].shape == (32, 64, 1)
    # Raw labels are 2x2 blocks: any nearest-neighbour halving keeps one value per block.
    expected = np.vectorize(lambda v: CITYSCAPES_TABLE.get(int(v), 255))(label_ids[::2, ::2])
    np.testing.assert_array_equal(ex['label'][..., 0], expected)
    assert ex['classes'].tolist() == _classes(expected)
    bicubic = np.asarray(Image.fromarray(image).resize((64, 32), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(ex['image'], bicubic)
    seen |= set(np.unique(ex['label']).tolist())
  assert 255 in seen and len(seen) > 10


def test_cityscapes_class_names(city):
  names = base.class_names(city[0])
  assert len(names) == 19 and names[0] == 'road' and names[18] == 'bicycle'


def test_cityscapes_label_table_maps_every_label_id():
  all_ids = np.arange(256, dtype=np.uint8).reshape(16, 16)
  mapped = cityscapes.to_train_ids(all_ids).ravel()
  for label_id in range(256):
    assert mapped[label_id] == CITYSCAPES_TABLE.get(label_id, 255), label_id


def test_cityscapes_size_is_half_of_the_raw_frame():
  assert cityscapes.half_size(1024, 2048) == (512, 1024)
  assert cityscapes.half_size(65, 129) == (32, 64)


def test_cityscapes_missing_label_file_is_named(tmp_path):
  fake_raw.make_cityscapes(tmp_path / 'raw')
  (tmp_path / 'raw' / 'gtFine' / 'val' / 'frankfurt' /
   'frankfurt_000001_000538_gtFine_labelIds.png').unlink()
  _fails('reco_cityscapes', tmp_path, tmp_path / 'raw', FileNotFoundError,
         'gtFine/val/frankfurt/frankfurt_000001_000538_gtFine_labelIds.png')


# SUN RGB-D.


def test_sun_ids_are_unique_across_train_and_test_folders(sun):
  builder, _, _ = sun
  train, val = _read(builder, 'train'), _read(builder, 'validation')
  # Train images 1..3 (labels 5051..5053) and the unlisted test images 1 and 3 share file
  # names img-000001.jpg, img-000003.jpg; ids follow the label numbers.
  assert set(train) == {'img-005051', 'img-005052', 'img-005053', 'img-000001', 'img-000003'}
  assert set(val) == {'img-000002', 'img-000004'}
  assert builder.info.splits['train'].num_examples == 5


def test_sun_resizes_and_shifts_labels(sun):
  builder, raw, _ = sun
  examples = {**_read(builder, 'train'), **_read(builder, 'validation')}
  for image_id, (image, label) in raw.items():
    ex = examples[image_id]
    assert ex['image'].shape == (384, 512, 3) and ex['label'].shape == (384, 512, 1)
    # 192x256 -> 384x512 nearest is an exact 2x repeat; raw 0 -> 255, raw c -> c - 1.
    up = label.repeat(2, 0).repeat(2, 1).astype(np.int32)
    expected = np.where(up == 0, 255, up - 1)
    np.testing.assert_array_equal(ex['label'][..., 0], expected)
    assert ex['classes'].tolist() == _classes(expected)
    resized = np.asarray(Image.fromarray(image).resize((512, 384), sun_rgbd.IMAGE_RESAMPLE))
    np.testing.assert_array_equal(ex['image'], resized)  # the image of the right folder


def test_sun_class_names(sun):
  names = base.class_names(sun[0])
  assert len(names) == 37 and names[0] == 'wall' and names[36] == 'bag'
  assert names[19] == 'floor_mat'


def test_sun_label_mapping():
  raw = np.array([[0, 1, 37]], np.uint8)
  np.testing.assert_array_equal(sun_rgbd.to_class_ids(raw), [[255, 0, 36]])


def test_sun_test_number_past_the_offset_is_rejected(tmp_path):
  fake_raw.make_sun(tmp_path / 'raw', num_train=1, num_test=2, val=(2,))
  # A test image numbered 5051 would collide with training image 1 (label 5051).
  fake_raw.save_jpg(tmp_path / 'raw' / 'SUNRGBD-test_images' / 'img-005051.jpg',
                    np.zeros((8, 8, 3), np.uint8))
  _fails('reco_sun_rgbd', tmp_path, tmp_path / 'raw', ValueError,
         r'share the label numbers \[5051\]')


def test_sun_missing_label_is_named(tmp_path):
  fake_raw.make_sun(tmp_path / 'raw', num_train=2, num_test=2, val=(1,))
  (tmp_path / 'raw' / 'sunrgbd_train_test_labels' / 'img-005052.png').unlink()
  _fails('reco_sun_rgbd', tmp_path, tmp_path / 'raw', FileNotFoundError,
         'sunrgbd_train_test_labels/img-005052.png')


def test_sun_bad_raw_label_value_is_named(tmp_path):
  fake_raw.make_sun(tmp_path / 'raw', num_train=1, num_test=2, val=(1,), size=(16, 16))
  fake_raw.save_png(tmp_path / 'raw' / 'sunrgbd_train_test_labels' / 'img-000002.png',
                    np.full((16, 16), 38, np.uint8))
  _fails('reco_sun_rgbd', tmp_path, tmp_path / 'raw', ValueError,
         r'img-000002: label values \[37\]')


def test_sun_size_mismatch_is_caught_before_resizing(tmp_path):
  fake_raw.make_sun(tmp_path / 'raw', num_train=1, num_test=2, val=(1,), size=(16, 16))
  fake_raw.save_png(tmp_path / 'raw' / 'sunrgbd_train_test_labels' / 'img-005051.png',
                    np.ones((16, 12), np.uint8))
  _fails('reco_sun_rgbd', tmp_path, tmp_path / 'raw', ValueError,
         'img-005051: image is 16x16 .*but its label is 16x12')


# Folder.


def test_folder_builds_with_its_class_names(folder):
  builder, raw, data_dir = folder
  # A fresh builder reads the class names back from the prepared dataset.
  reloaded = tfds.builder('reco_folder', data_dir=str(data_dir))
  assert base.class_names(reloaded) == ('sky', 'road', 'car')
  train, val = _read(reloaded, 'train'), _read(reloaded, 'validation')
  assert set(train) == {'a', 'b', 'c', 'd'} and set(val) == {'e', 'f'}
  for stem, (image, label) in raw.items():
    ex = {**train, **val}[stem]
    np.testing.assert_array_equal(ex['image'], image)
    # Stem 'a' has a palette PNG mask: its indices are the class ids.
    np.testing.assert_array_equal(ex['label'][..., 0], label)
    assert ex['classes'].tolist() == _classes(label)


def test_folder_label_beyond_its_classes_is_named(tmp_path):
  fake_raw.make_folder(tmp_path / 'raw', classes=('sky', 'road'))
  fake_raw.save_png(tmp_path / 'raw' / 'labels' / 'e.png', np.full((40, 60), 2, np.uint8))
  _fails('reco_folder', tmp_path, tmp_path / 'raw', ValueError,
         r'e: label values \[2\] are not class ids 0..1')


def test_folder_missing_class_list_is_named(tmp_path):
  fake_raw.make_folder(tmp_path / 'raw')
  (tmp_path / 'raw' / 'classes.txt').unlink()
  _fails('reco_folder', tmp_path, tmp_path / 'raw', FileNotFoundError, 'classes.txt')


# Shared errors and helpers.


@pytest.mark.parametrize('name, expected', [
    ('reco_voc', 'JPEGImages/2007_000032.jpg'),
    ('reco_cityscapes', 'leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png'),
    ('reco_sun_rgbd', 'SUNRGBD-train_images/img-000001.jpg'),
    ('reco_folder', 'images/street_001.jpg'),
])
def test_missing_manual_dir_names_the_expected_layout(tmp_path, name, expected):
  message = _fails(name, tmp_path, tmp_path / 'nowhere', FileNotFoundError, 'manual dir')
  assert expected in message and str(tmp_path / 'nowhere') in message


def test_ordered_map_keeps_order_in_threads_and_raises():
  # The first three items wait for each other, so they must run in three threads at once (a
  # set of the threads that ran items is not enough: one fast thread may take them all).
  all_three_started = threading.Barrier(3, timeout=30)

  def square(x):
    if x < 3:
      all_three_started.wait()
    return x * x

  assert list(raw_io.ordered_map(square, range(50), num_threads=3)) == [x * x for x in range(50)]

  def fail_on_7(x):
    if x == 7:
      raise ValueError('seven')
    return x

  with pytest.raises(ValueError, match='seven'):
    list(raw_io.ordered_map(fail_on_7, range(20), num_threads=2))

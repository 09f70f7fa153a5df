"""configs/folder.py: one's own data in one config argument, and errors that name the file."""
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from PIL import Image

import fake_raw
from configs import folder as folder_config
from reco_jax import data as data_lib
from reco_jax import own_data
from reco_jax import train
from reco_jax.data import base
from reco_jax.data import splits


@pytest.fixture
def tfds_home(tmp_path, monkeypatch):
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tfds_home'))
  return tmp_path / 'tfds_home'


def test_config_reads_classes_sizes_and_a_data_dir_of_its_own(tmp_path, tfds_home):
  fake_raw.make_folder(tmp_path / 'mine', classes=('sky', 'road', 'car', 'person'),
                       size=(40, 60))
  fake_raw.make_folder(tmp_path / 'other' / 'mine', size=(40, 60))
  c = folder_config.get_config(f'data={tmp_path / "mine"},labels=3,method=cutmix,seed=2')
  assert c.dataset == 'reco_folder' and c.num_classes == 4
  assert c.labels == 3 and c.method == 'cutmix' and c.seed == 2
  assert tuple(c.crop_size) == (33, 33)  # the 40 px side as 8k + 1
  assert tuple(c.eval_size) == (49, 65)  # 40 x 60 as 16k + 1
  assert c.manual_dir == str((tmp_path / 'mine').resolve())
  assert c.data_dir.startswith(str(tfds_home))
  # Two folders of the same name never share a prepared dataset.
  other = folder_config.get_config(f'data={tmp_path / "other" / "mine"}')
  assert other.data_dir != c.data_dir and other.num_classes == 3


def test_sizes_follow_the_paper_on_voc_sized_images(tmp_path):
  fake_raw.make_folder(tmp_path / 'voc_like', train=('a', 'b'), val=('c',), size=(500, 375))
  crop, eval_size = own_data.crop_and_eval_size(tmp_path / 'voc_like')
  assert crop == (321, 321) and eval_size == (513, 385)


@pytest.mark.parametrize('arg, error, match', [
    ('labels=3', ValueError, 'needs the dataset folder'),
    ('data=/nonexistent/folder', FileNotFoundError, 'is not a folder'),
])
def test_config_without_a_folder_is_a_clear_error(arg, error, match):
  with pytest.raises(error, match=match):
    folder_config.get_config(arg)


def test_config_trains_a_few_steps_on_a_generated_folder(tmp_path, tfds_home):
  fake_raw.make_folder(tmp_path / 'mine', size=(40, 60))
  c = folder_config.get_config(
      f'data={tmp_path / "mine"},labels=2,method=supervised,reco=False,runlocal')
  c.num_train_steps = 2
  c.eval_every_steps = c.checkpoint_every_steps = c.log_every_steps = 2
  c.num_image_summaries = 0
  state = train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert int(state.step) == 2
  assert base.class_names(tfds.builder('reco_folder', data_dir=c.data_dir)) == (
      'sky', 'road', 'car')


def _build_fails(raw, tmp_path, match):
  with pytest.raises(ValueError, match=match):
    data_lib.prepare('reco_folder', str(tmp_path / 'tfds'), str(raw))


def test_label_id_outside_classes_names_the_file(tmp_path):
  raw = tmp_path / 'raw'
  fake_raw.make_folder(raw, classes=('sky', 'road'))
  fake_raw.save_png(raw / 'labels' / 'e.png', np.full((40, 60), 7, np.uint8))
  _build_fails(raw, tmp_path, r'label values \[7\] are not class ids 0..1.*labels/e\.png')


def test_label_of_another_size_names_the_file(tmp_path):
  raw = tmp_path / 'raw'
  fake_raw.make_folder(raw)
  fake_raw.save_png(raw / 'labels' / 'b.png', np.zeros((20, 60), np.uint8))
  _build_fails(raw, tmp_path, r'image is 40x60 .*but its label is 20x60.*labels/b\.png')


def test_image_without_label_names_the_file(tmp_path):
  raw = tmp_path / 'raw'
  fake_raw.make_folder(raw)
  (raw / 'labels' / 'c.png').unlink()
  with pytest.raises(FileNotFoundError, match=r'labels/c\.png'):
    data_lib.prepare('reco_folder', str(tmp_path / 'tfds'), str(raw))


# --------------------------------------------------------------------------- checked whole


def test_validation_images_in_train_txt_are_an_error_naming_them(tmp_path):
  raw = tmp_path / 'raw'
  fake_raw.make_folder(raw)
  fake_raw.write_lines(raw / 'val.txt', ('e', 'b'))  # b is a training image
  for check in (lambda: folder_config.get_config(f'data={raw}'),
                lambda: data_lib.prepare('reco_folder', str(tmp_path / 'tfds'), str(raw))):
    with pytest.raises(ValueError, match=r"val\.txt lists 1 image.*train\.txt.*\['b'\]"):
      check()


def test_the_entry_point_gives_a_config_files_error_and_an_unknown_field_in_one_line(tmp_path):
  raw = tmp_path / 'raw'
  fake_raw.make_folder(raw, classes=('thing',))
  root = pathlib.Path(__file__).resolve().parents[1]
  for args, message in (
      ([f'--config=configs/folder.py:data={raw}'], f'Error: {raw / "classes.txt"} names 1 class'),
      (['--config=configs/toy.py', '--config.nope=1'],
       "Error: --config.nope: the config has no field 'nope'")):
    run = subprocess.run([sys.executable, '-m', 'reco_jax.main', *args,
                          f'--workdir={tmp_path / "run"}'], cwd=root, capture_output=True,
                         text=True, timeout=300, check=False)
    assert run.returncode == 1
    assert run.stderr.strip().startswith(message), run.stderr[-2000:]
    assert 'Traceback' not in run.stderr and 'FATAL' not in run.stderr
  assert not (tmp_path / 'run').exists()


def test_a_single_class_is_an_error(tmp_path):
  raw = tmp_path / 'raw'
  fake_raw.make_folder(raw, classes=('thing',))
  with pytest.raises(ValueError, match=r'classes\.txt names 1 class.*at least two classes'):
    folder_config.get_config(f'data={raw}')


def test_lists_with_a_byte_order_mark_read_as_without(tmp_path, tfds_home):
  raw = tmp_path / 'raw'
  fake_raw.make_folder(raw)
  for name in ('train.txt', 'val.txt', 'classes.txt'):
    text = (raw / name).read_text()
    (raw / name).write_bytes(b'\xef\xbb\xbf' + text.encode())
  c = folder_config.get_config(f'data={raw},labels=2')
  assert c.num_classes == 3
  builder = data_lib.prepare('reco_folder', str(tmp_path / 'tfds'), str(raw))
  assert base.class_names(builder) == ('sky', 'road', 'car')
  assert builder.info.splits['train'].num_examples == 4


def test_a_class_count_that_is_not_the_datasets_says_what_to_do(tmp_path, tfds_home):
  raw = tmp_path / 'raw'
  fake_raw.make_folder(raw)
  c = folder_config.get_config(f'data={raw},labels=2')
  data_lib.prepare_for_config(c)
  c.num_classes = 4  # A run trained before a class was taken out of classes.txt.
  with pytest.raises(ValueError, match=r'has 3 classes; set --config\.num_classes=3\.'):
    data_lib.prepare_for_config(c)  # The trainer: the dataset is current.
  # A tool on a run of older data is not told to change the run's classes.
  with pytest.raises(ValueError, match=r'The run has 4 classes but .* now has 3: the data '
                     r'changed since it was trained\. Pass --data_dir=DIR'):
    data_lib.prepare_for_config(c, flags='--')


def test_a_truncated_image_names_its_file(tmp_path):
  raw = tmp_path / 'raw'
  fake_raw.make_folder(raw)
  data = (raw / 'images' / 'a.jpg').read_bytes()
  (raw / 'images' / 'a.jpg').write_bytes(data[:len(data) // 2])
  _build_fails(raw, tmp_path, r'images/a\.jpg cannot be decoded.*truncated')


def test_exif_rotated_images_are_turned_upright(tmp_path):
  raw = tmp_path / 'raw'
  written = fake_raw.make_folder(raw, size=(40, 60))
  upright = written['a'][0]
  # Stored turned a quarter, with EXIF orientation 6 saying how to show it: upright it is 40x60.
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(np.rot90(upright)).save(raw / 'images' / 'a.jpg', exif=exif, quality=100)
  assert own_data.image_sizes(raw, 'train')[0] == (40, 60)
  builder = data_lib.prepare('reco_folder', str(tmp_path / 'tfds'), str(raw))
  [example] = [ex for ex in tfds.as_numpy(builder.as_dataset(split='train'))
               if ex['image_id'] == b'a']
  assert example['image'].shape == (40, 60, 3)
  assert np.abs(example['image'].astype(int) - upright).mean() < 8  # JPEG noise only


def test_small_folders_label_every_image_by_default(tmp_path, capsys):
  raw = tmp_path / 'raw'
  fake_raw.make_folder(raw)  # 4 training images, fewer than the default 50
  c = folder_config.get_config(f'data={raw}')
  assert c.labels == 0
  assert 'lists 4 training images, fewer than the default labels=50' in capsys.readouterr().out
  assert folder_config.get_config(f'data={raw},labels=3').labels == 3
  with pytest.raises(ValueError, match=r'labels=10 asks for 10 .* only 4; use labels=0'):
    splits.select_uniform(['a', 'b', 'c', 'd'], 10, seed=0)


def test_a_folder_edited_after_its_build_is_built_again(tmp_path, capsys):
  raw = tmp_path / 'raw'
  fake_raw.make_folder(raw)
  data_dir = str(tmp_path / 'tfds')
  first = data_lib.prepare('reco_folder', data_dir, str(raw))
  assert base.class_names(first) == ('sky', 'road', 'car')
  data_lib.prepare('reco_folder', data_dir, str(raw))  # unchanged: reused, nothing said
  assert 'building it again' not in capsys.readouterr().out
  fake_raw.write_lines(raw / 'classes.txt', ('sky', 'road', 'vehicle'))  # a class renamed
  second = data_lib.prepare('reco_folder', data_dir, str(raw))
  assert 'has changed since it was built' in capsys.readouterr().out
  assert base.class_names(second) == ('sky', 'road', 'vehicle')
  # A label redrawn: the example's label follows the file.
  label = np.zeros((40, 60), np.uint8)
  fake_raw.save_png(raw / 'labels' / 'a.png', label)
  third = data_lib.prepare('reco_folder', data_dir, str(raw))
  assert 'has changed since it was built' in capsys.readouterr().out
  [example] = [ex for ex in tfds.as_numpy(third.as_dataset(split='train'))
               if ex['image_id'] == b'a']
  np.testing.assert_array_equal(example['label'][..., 0], label)

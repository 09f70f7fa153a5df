"""TFDS builder `reco_folder`: a user's own segmentation dataset from a plain folder.

Layout of the folder (the manual dir):
  images/<stem>.jpg or .png   RGB images (grey or palette images are converted to RGB)
  labels/<stem>.png           class ids, same size as the image, 255 = void (8-bit grayscale
                              or palette PNG; palette indices are the class ids)
  train.txt, val.txt          stems of the `train` and `validation` images, one per line
  classes.txt                 one class name per line; line i names class id i

Images keep their size and are stored as PNG (the pixels PIL decodes). Class names go into
the dataset metadata (`reco_jax.data.base.class_names(builder)`).

Training on it: `--config=configs/folder.py:data=/data/mine,labels=50,method=classmix` reads
the class count, the image sizes and a data dir of its own from the folder and builds the
dataset on first use. Built by hand instead:
  reco_jax.data.prepare('reco_folder', data_dir='/data/mine_tfds', manual_dir='/data/mine')
into a data dir of its own, since TFDS caches by builder name and version and every folder
dataset is called `reco_folder`. The build records the folder's fingerprint
(`own_data.fingerprint`: the lists, classes.txt, and each listed file's size and modification
time); when the folder has changed since, `prepare` says so and builds it again.
"""
from etils import epath
import tensorflow_datasets as tfds

from reco_jax import own_data
from reco_jax.data import base
from reco_jax.data import raw_io

_INSTRUCTIONS = """\
reco_folder expects in its manual dir:
  images/<stem>.jpg or images/<stem>.png   e.g. images/street_001.jpg
  labels/<stem>.png                        e.g. labels/street_001.png (class ids, 255 = void)
  train.txt, val.txt                       image stems, one per line, e.g. street_001
  classes.txt                              class names, one per line (line i = class id i)
See the reco_jax.data.folder module docstring for how to build and use it.
"""

_SPLITS = {'train': 'train.txt', 'validation': 'val.txt'}
_FILES = ('classes.txt',) + tuple(_SPLITS.values())


def read_class_names(root: epath.Path) -> tuple[str, ...]:
  """Class names from `root/classes.txt`, index = class id; at most 255 (255 is void)."""
  classes = own_data.class_names(root)
  raw_io.check_unique(classes, 'classes.txt', 'reco_folder')
  return classes


def source_fingerprint(manual_dir: str) -> str:
  """What `reco_jax.data.prepare` compares with a build's record to find a folder changed since."""
  return own_data.fingerprint(manual_dir)


class RecoFolder(base.SegmentationBuilder):
  """A user's folder of images and PNG masks, with train/val lists and class names."""

  name = 'reco_folder'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  # No CLASS_NAMES: they are unknown until the folder is read; _split_generators fills them
  # in and they are saved with the prepared dataset.
  DESCRIPTION = 'A user-provided semantic segmentation dataset (reco_folder layout).'

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = raw_io.manual_dir(dl_manager, self.name, _INSTRUCTIONS)
    raw_io.require_dirs(root, ('images', 'labels'), self.name, _INSTRUCTIONS)
    raw_io.raise_if_missing([f for f in _FILES if not (root / f).exists()], len(_FILES),
                            'list files', self.name, _INSTRUCTIONS)
    classes = read_class_names(root)
    own_data.check_splits(root)
    self.info.metadata['class_names'] = list(classes)

    images = raw_io.list_files(root / 'images', ('.jpg', '.jpeg', '.png'))
    stems = [p.name[:p.name.rfind('.')] for p in (root / 'images').iterdir()
             if p.name.lower().endswith(('.jpg', '.jpeg', '.png'))]
    raw_io.check_unique(stems, 'images/ (one image per stem: not both .jpg and .png)',
                        self.name)
    labels = raw_io.list_files(root / 'labels', ('.png',))
    generators = {}
    for split, filename in _SPLITS.items():
      ids = raw_io.read_id_list(root, filename)
      if not ids:
        raise ValueError(f'{self.name}: {root / filename} is empty; list the image stems of the '
                         f'{split} split, one per line.')
      raw_io.check_unique(ids, filename, self.name)
      missing = ([f'images/{i}.jpg (or .png)' for i in ids if i not in images] +
                 [f'labels/{i}.png' for i in ids if i not in labels])
      raw_io.raise_if_missing(missing, 2 * len(ids), f'files of the {split} split ({filename})',
                              self.name, _INSTRUCTIONS)
      generators[split] = self._generate_examples(
          [(i, images[i], labels[i]) for i in ids], len(classes))
    return generators

  source_fingerprint = staticmethod(source_fingerprint)

  def _generate_examples(self, items: list[tuple[str, epath.Path, epath.Path]],
                         num_classes: int):
    yield from raw_io.load_examples(items, num_classes)

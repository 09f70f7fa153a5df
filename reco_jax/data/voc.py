"""TFDS builder `reco_voc`: PASCAL VOC 2012 with the SBD augmented masks (SegmentationClassAug).

Splits: `train` = the 10,582 `train_aug` ids, `validation` = the 1,449 VOC 2012 `val` ids (lists
shipped in reco_jax/data/splits; `train_aug.txt` / `val.txt` in the manual dir replace them).
Images keep their size and are stored as PNG holding the pixels PIL decodes from the JPEGs
(as the reference reads them); masks as PNG class ids 0..20, 255 = void (object boundaries
and difficult regions), exactly as SegmentationClassAug holds them.

Build once (the raw files are only read then):
  reco_jax.data.prepare('reco_voc', data_dir=..., manual_dir='/data/voc')
"""
from etils import epath
import tensorflow_datasets as tfds

from reco_jax.data import base
from reco_jax.data import raw_io

CLASS_NAMES = (
    'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair',
    'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa',
    'train', 'tvmonitor',
)

_INSTRUCTIONS = """\
reco_voc expects in its manual dir:
  JPEGImages/<id>.jpg            e.g. JPEGImages/2007_000032.jpg  (all 17,125 images of the
                                 PASCAL VOC 2012 trainval archive VOCtrainval_11-May-2012.tar,
                                 from the PASCAL VOC challenge website)
  SegmentationClassAug/<id>.png  e.g. SegmentationClassAug/2007_000032.png  (grayscale class ids,
                                 255 = void: the SBD-augmented VOC masks, from the Semantic
                                 Boundaries Dataset converted to PNG, commonly distributed as
                                 SegmentationClassAug.zip)
  train_aug.txt, val.txt         optional: image ids, one per line, replacing the shipped lists
"""

_SPLITS = {
    'train': ('train_aug.txt', 'voc_train_aug.txt'),
    'validation': ('val.txt', 'voc_val.txt'),
}


class RecoVoc(base.SegmentationBuilder):
  """PASCAL VOC 2012 + SBD: 21 classes, train_aug / val."""

  name = 'reco_voc'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  CLASS_NAMES = CLASS_NAMES
  DESCRIPTION = ('PASCAL VOC 2012 semantic segmentation with the SBD augmented training '
                 'masks (train_aug 10,582 / val 1,449).')
  HOMEPAGE = 'http://host.robots.ox.ac.uk/pascal/VOC/voc2012/'

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = raw_io.manual_dir(dl_manager, self.name, _INSTRUCTIONS)
    raw_io.require_dirs(root, ('JPEGImages', 'SegmentationClassAug'), self.name, _INSTRUCTIONS)
    images = raw_io.list_files(root / 'JPEGImages', ('.jpg',))
    labels = raw_io.list_files(root / 'SegmentationClassAug', ('.png',))
    generators = {}
    for split, (filename, shipped) in _SPLITS.items():
      ids = raw_io.read_id_list(root, filename, shipped)
      raw_io.check_unique(ids, filename, self.name)
      missing = ([f'JPEGImages/{i}.jpg' for i in ids if i not in images] +
                 [f'SegmentationClassAug/{i}.png' for i in ids if i not in labels])
      raw_io.raise_if_missing(missing, 2 * len(ids), f'files of the {split} split ({filename})',
                              self.name, _INSTRUCTIONS)
      generators[split] = self._generate_examples([(i, images[i], labels[i]) for i in ids])
    return generators

  def _generate_examples(self, items: list[tuple[str, epath.Path, epath.Path]]):
    yield from raw_io.load_examples(items, len(CLASS_NAMES))

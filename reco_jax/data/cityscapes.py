"""TFDS builder `reco_cityscapes`: Cityscapes fine annotations at half resolution, 19 trainIds.

Splits: `train` (2,975 images) and `validation` (500), from `leftImg8bit/{train,val}` and
`gtFine/{train,val}`. Every image is stored at half its raw resolution, (H // 2, W // 2):
the official 1024x2048 frames become 512x1024. As in the ReCo reference preprocessing (PIL's
default `resize` filter), images are resized bicubically and labels with nearest neighbour.
Labels hold the 19 evaluation trainIds of the official Cityscapes table (labelId 7 road -> 0,
..., 33 bicycle -> 18); every other labelId becomes 255 (void). Images are PNG (lossless).
image_id is the frame name, e.g. `aachen_000000_000019`.

Build once:
  reco_jax.data.prepare('reco_cityscapes', data_dir=..., manual_dir='/data/cityscapes')
"""
from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from reco_jax import names
from reco_jax.data import base
from reco_jax.data import raw_io

CLASS_NAMES = (
    'road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic_light', 'traffic_sign',
    'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck', 'bus', 'train',
    'motorcycle', 'bicycle',
)

# labelId -> trainId for the 19 evaluated classes (cityscapesscripts' labels.py table).
LABEL_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
# 256-entry lookup table; unlisted labelIds (unlabeled, ego vehicle, ..., license plate) are void.
_LUT = np.full(256, names.VOID, np.uint8)
for _label_id, _train_id in LABEL_ID_TO_TRAIN_ID.items():
  _LUT[_label_id] = _train_id

# The reference preprocessing used PIL's default resize filter, bicubic for RGB images.
IMAGE_RESAMPLE = Image.Resampling.BICUBIC

_IMAGE_SUFFIX = '_leftImg8bit.png'
_LABEL_SUFFIX = '_gtFine_labelIds.png'

_INSTRUCTIONS = """\
reco_cityscapes expects in its manual dir (the official Cityscapes archives
leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip, unpacked side by side):
  leftImg8bit/{train,val}/<city>/<frame>_leftImg8bit.png
      e.g. leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png
  gtFine/{train,val}/<city>/<frame>_gtFine_labelIds.png
      e.g. gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png
Download them (free registration) from the Cityscapes dataset website.
"""

_SPLITS = {'train': 'train', 'validation': 'val'}


def half_size(height: int, width: int) -> tuple[int, int]:
  """Stored size of a raw (height, width) frame: (height // 2, width // 2)."""
  return height // 2, width // 2


def to_train_ids(label_ids: np.ndarray) -> np.ndarray:
  """Maps raw labelIds uint8 [H, W] to trainIds uint8 [H, W] (0..18, 255 = void)."""
  return _LUT[label_ids]


class RecoCityscapes(base.SegmentationBuilder):
  """Cityscapes gtFine at half resolution: 19 classes, train / val."""

  name = 'reco_cityscapes'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  CLASS_NAMES = CLASS_NAMES
  DESCRIPTION = ('Cityscapes fine annotations (train 2,975 / val 500) at half resolution, '
                 'labels mapped to the 19 trainIds, 255 = void.')
  HOMEPAGE = 'https://www.cityscapes-dataset.com/'

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = raw_io.manual_dir(dl_manager, self.name, _INSTRUCTIONS)
    raw_io.require_dirs(root, [f'{top}/{raw}' for raw in _SPLITS.values()
                               for top in ('leftImg8bit', 'gtFine')], self.name, _INSTRUCTIONS)
    generators = {}
    for split, raw in _SPLITS.items():
      images = sorted((root / 'leftImg8bit' / raw).glob(f'*/*{_IMAGE_SUFFIX}'))
      if not images:
        raise FileNotFoundError(
            f'{self.name}: no leftImg8bit/{raw}/<city>/*{_IMAGE_SUFFIX} files in {root}.\n'
            f'{_INSTRUCTIONS}')
      labels = {p.name: p for p in (root / 'gtFine' / raw).glob(f'*/*{_LABEL_SUFFIX}')}
      items, missing = [], []
      for image_path in images:
        frame = image_path.name[:-len(_IMAGE_SUFFIX)]
        label_path = labels.get(frame + _LABEL_SUFFIX)
        if label_path is None:
          missing.append(f'gtFine/{raw}/{image_path.parent.name}/{frame}{_LABEL_SUFFIX}')
        items.append((frame, image_path, label_path))
      raw_io.raise_if_missing(missing, len(images), f'label files of the {raw} split',
                              self.name, _INSTRUCTIONS)
      raw_io.check_unique([frame for frame, _, _ in items], f'leftImg8bit/{raw}', self.name)
      generators[split] = self._generate_examples(items)
    return generators

  def _generate_examples(self, items: list[tuple[str, epath.Path, epath.Path]]):
    yield from raw_io.load_examples(items, len(CLASS_NAMES), _half_resolution)


def _half_resolution(image, label):
  size = half_size(*label.shape)
  return (raw_io.resize_image(image, size, IMAGE_RESAMPLE),
          to_train_ids(raw_io.resize_label(label, size)))

"""TFDS builder `reco_sun_rgbd`: SUN RGB-D 37-class segmentation (RGB only) at 384x512.

The raw archives number images per folder: `SUNRGBD-train_images/img-k.jpg` (k = 1..5285) has
the label `img-(k+5050).png`, `SUNRGBD-test_images/img-k.jpg` (k = 1..5050) has `img-k.png`,
both in `sunrgbd_train_test_labels/`. Both image folders reuse the same file names, so examples
are keyed by their label number: image_id `img-%06d` % label number (the ids of the ReCo
reference's renamed layout).
Splits as in ReCo: `validation` = the 475 test images listed in the shipped
`sun_rgbd_val_idx.txt` (1-based test numbers; a `test_idx.txt` in the manual dir replaces it),
`train` = every other image, train and test folders (9,860).
Images are resized to 384x512 (height x width) bicubically, the filter of PIL's default
`resize` that the reference preprocessing used, and stored as PNG; labels with nearest
neighbour, then raw 0 (unlabelled) -> 255 (void) and raw c -> c - 1 (37 classes).

Build once:
  reco_jax.data.prepare('reco_sun_rgbd', data_dir=..., manual_dir='/data/sun_rgbd')
"""
import re

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from reco_jax.data import base
from reco_jax.data import raw_io

CLASS_NAMES = (
    'wall', 'floor', 'cabinet', 'bed', 'chair', 'sofa', 'table', 'door', 'window', 'bookshelf',
    'picture', 'counter', 'blinds', 'desk', 'shelves', 'curtain', 'dresser', 'pillow', 'mirror',
    'floor_mat', 'clothes', 'ceiling', 'books', 'fridge', 'tv', 'paper', 'towel',
    'shower_curtain', 'box', 'whiteboard', 'person', 'night_stand', 'toilet', 'sink', 'lamp',
    'bathtub', 'bag',
)

SIZE = (384, 512)  # (height, width) every example is stored at.
# Offset from a training image's number to its label's number in the raw archives.
TRAIN_LABEL_OFFSET = 5050
IMAGE_RESAMPLE = Image.Resampling.BICUBIC

_TRAIN_DIR = 'SUNRGBD-train_images'
_TEST_DIR = 'SUNRGBD-test_images'
_LABEL_DIR = 'sunrgbd_train_test_labels'
_IMAGE_NAME = re.compile(r'img-(\d+)\.jpg', re.IGNORECASE)
_LABEL_NAME = re.compile(r'img-(\d+)\.png', re.IGNORECASE)

_INSTRUCTIONS = f"""\
reco_sun_rgbd expects in its manual dir the SUN RGB-D 37-class segmentation release (archives
SUNRGBD-train_images.tgz, SUNRGBD-test_images.tgz and sunrgbd_train_test_labels.tar.gz, from
the sunrgbd-meta-data release accompanying the SUN RGB-D benchmark), unpacked, files not
renamed:
  {_TRAIN_DIR}/img-k.jpg  (k = 1..5285)   e.g. {_TRAIN_DIR}/img-000001.jpg
  {_TEST_DIR}/img-k.jpg   (k = 1..5050)   e.g. {_TEST_DIR}/img-000001.jpg
  {_LABEL_DIR}/img-n.png      e.g. {_LABEL_DIR}/img-005051.png
      (training image k has label n = k + 5050, test image k has label n = k)
  test_idx.txt   optional: 1-based test image numbers of the validation split, one per line,
                 replacing the shipped list
"""


def to_class_ids(raw: np.ndarray) -> np.ndarray:
  """Maps raw labels uint8 [H, W] (0 = unlabelled, 1..37) to class ids 0..36, 255 = void."""
  # uint8 wrap-around sends 0 to 255.
  return (raw.astype(np.uint8) - np.uint8(1)).astype(np.uint8)


def _numbered(folder: epath.Path, pattern: re.Pattern[str]) -> dict[int, epath.Path]:
  """Maps k -> path for the files of `folder` named like img-k (any zero padding)."""
  files = {}
  for path in folder.iterdir():
    match = pattern.fullmatch(path.name)
    if match:
      files[int(match.group(1))] = path
  return files


def _image_id(label_number: int) -> str:
  return f'img-{label_number:06d}'


class RecoSunRgbd(base.SegmentationBuilder):
  """SUN RGB-D at 384x512: 37 classes, 9,860 train / 475 validation."""

  name = 'reco_sun_rgbd'
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  CLASS_NAMES = CLASS_NAMES
  DESCRIPTION = ('SUN RGB-D 37-class semantic segmentation (RGB), resized to 384x512; '
                 'validation = 475 test images, train = the other 9,860.')
  HOMEPAGE = 'https://rgbd.cs.princeton.edu/'

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = raw_io.manual_dir(dl_manager, self.name, _INSTRUCTIONS)
    raw_io.require_dirs(root, (_TRAIN_DIR, _TEST_DIR, _LABEL_DIR), self.name, _INSTRUCTIONS)
    train_images = _numbered(root / _TRAIN_DIR, _IMAGE_NAME)
    test_images = _numbered(root / _TEST_DIR, _IMAGE_NAME)
    labels = _numbered(root / _LABEL_DIR, _LABEL_NAME)
    if not train_images or not test_images:
      raise FileNotFoundError(f'{self.name}: no img-k.jpg files in {root / _TRAIN_DIR} or '
                              f'{root / _TEST_DIR}.\n{_INSTRUCTIONS}')

    val_numbers = self._validation_numbers(root)
    raw_io.raise_if_missing(
        [f'{_TEST_DIR}/img-{k:06d}.jpg' for k in val_numbers if k not in test_images],
        len(val_numbers), 'validation images (test_idx.txt)', self.name, _INSTRUCTIONS)
    val_set = set(val_numbers)
    # (label number, image path) per split; the label number is the unique image id.
    train = ([(k + TRAIN_LABEL_OFFSET, path) for k, path in sorted(train_images.items())] +
             [(k, path) for k, path in sorted(test_images.items()) if k not in val_set])
    validation = [(k, test_images[k]) for k in val_numbers]

    numbers = [k for k, _ in train + validation]
    if len(set(numbers)) != len(numbers):
      clash = sorted(k for k in set(numbers) if numbers.count(k) > 1)[:5]
      raise ValueError(
          f'{self.name}: training image img-k and test image img-(k+{TRAIN_LABEL_OFFSET}) would '
          f'share the label numbers {clash}; the raw archives have at most '
          f'{TRAIN_LABEL_OFFSET} test images.')
    raw_io.raise_if_missing(
        [f'{_LABEL_DIR}/img-{k:06d}.png' for k in numbers if k not in labels], len(numbers),
        'label files', self.name, _INSTRUCTIONS)
    return {
        'train': self._generate_examples([(_image_id(k), p, labels[k]) for k, p in train]),
        'validation': self._generate_examples(
            [(_image_id(k), p, labels[k]) for k, p in validation]),
    }

  def _validation_numbers(self, root: epath.Path) -> list[int]:
    lines = raw_io.read_id_list(root, 'test_idx.txt', 'sun_rgbd_val_idx.txt')
    try:
      numbers = [int(line) for line in lines]
    except ValueError:
      raise ValueError(f'{self.name}: test_idx.txt must hold one test image number per line '
                       f'(e.g. 8), got {lines[:3]}.') from None
    raw_io.check_unique(numbers, 'test_idx.txt', self.name)
    return numbers

  def _generate_examples(self, items: list[tuple[str, epath.Path, epath.Path]]):
    yield from raw_io.load_examples(items, len(CLASS_NAMES), _resize)


def _resize(image, label):
  return (raw_io.resize_image(image, SIZE, IMAGE_RESAMPLE),
          to_class_ids(raw_io.resize_label(label, SIZE)))

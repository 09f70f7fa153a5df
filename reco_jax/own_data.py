"""What `configs/folder.py` reads from a user's folder before anything is built.

The folder has the `reco_folder` layout (see `reco_jax.data.folder`): images/, labels/,
train.txt, val.txt and classes.txt. Only text files and image headers are read here (no
TensorFlow), so that a config can be made from the folder cheaply.
"""
import hashlib
import os
import pathlib

from PIL import Image

from reco_jax import names

_LISTS = {'train': 'train.txt', 'validation': 'val.txt'}
_EXIF_ORIENTATION = 0x0112


def class_names(root: str | os.PathLike) -> tuple[str, ...]:
  """Class names from `root/classes.txt`, index = class id; at most 255 (255 is void)."""
  path = pathlib.Path(root) / 'classes.txt'
  if not path.is_file():
    raise FileNotFoundError(f'{path} does not exist: a folder dataset names its classes in '
                            'classes.txt, one per line (line i names class id i).')
  classes = tuple(line.strip() for line in _read_lines(path))
  if len(classes) < 2 or len(classes) > names.VOID:
    raise ValueError(f'{path} names {len(classes)} class(es); expected 2 to {names.VOID}, one '
                     f'per line (class id {names.VOID} is void). Segmentation needs at least '
                     'two classes: name the background as a class of its own.')
  return classes


def _read_lines(path: pathlib.Path) -> list[str]:
  """The non-empty lines of a UTF-8 text file; a byte-order mark at its start is dropped."""
  return [line for line in path.read_text(encoding='utf-8-sig').splitlines() if line.strip()]


def _stems(root: pathlib.Path, split: str) -> list[str]:
  path = root / _LISTS[split]
  if not path.is_file():
    raise FileNotFoundError(f'{path} does not exist: list the image stems of the {split} '
                            'split, one per line.')
  return [line.strip() for line in _read_lines(path)]


def check_splits(root: str | os.PathLike) -> None:
  """Raises ValueError naming the stems that val.txt shares with train.txt: an image in both
  would be trained on and then evaluated as unseen."""
  root = pathlib.Path(root)
  shared = sorted(set(_stems(root, 'train')) & set(_stems(root, 'validation')))
  if shared:
    raise ValueError(f'{root / _LISTS["validation"]} lists {len(shared)} image(s) that '
                     f'{root / _LISTS["train"]} lists too, e.g. {shared[:5]}; evaluation would '
                     'score images the model trained on. Remove them from one of the lists.')


_IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.JPG', '.JPEG', '.PNG')


def _image_path(root: pathlib.Path, stem: str) -> pathlib.Path:
  for suffix in _IMAGE_SUFFIXES:
    path = root / 'images' / f'{stem}{suffix}'
    if path.is_file():
      return path
  raise FileNotFoundError(f'{root / "images"} has no image {stem}.jpg or {stem}.png, listed in '
                          'a split list; add it or remove the stem from the list.')


def image_sizes(root: str | os.PathLike, split: str) -> list[tuple[int, int]]:
  """(height, width) of every image of `split` ('train' or 'validation'), from the headers."""
  root = pathlib.Path(root)
  sizes = []
  for stem in _stems(root, split):
    path = _image_path(root, stem)
    try:
      with Image.open(path) as image:
        # EXIF orientations 5-8 turn the picture a quarter: upright it is width x height.
        turned = image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
        sizes.append((image.width, image.height) if turned else (image.height, image.width))
    except (OSError, SyntaxError) as e:
      raise ValueError(f'{path} cannot be read ({e}): the file is truncated or not an image. '
                       'Replace it, or remove its stem from the split lists.') from None
  if not sizes:
    raise ValueError(f'{root / _LISTS[split]} is empty; list the image stems of the {split} '
                     'split, one per line.')
  return sizes


def fingerprint(root: str | os.PathLike) -> str:
  """A digest of what a build of the folder reads: classes.txt and the split lists (their
  bytes), and the name, size and modification time of every listed image and label.

  A folder edited after its build (a label redrawn, a class renamed, an image added to a
  list) gets another fingerprint, so the build is redone (`reco_jax.data.prepare`).
  """
  root = pathlib.Path(root)
  digest = hashlib.sha256()
  for name in ('classes.txt', *_LISTS.values()):
    path = root / name
    digest.update(name.encode() + b'\0' + (path.read_bytes() if path.is_file() else b'-'))
  for name in _LISTS.values():  # Missing parts count as such: the build names them.
    path = root / name
    for stem in (line.strip() for line in _read_lines(path)) if path.is_file() else ():
      images = [root / 'images' / f'{stem}{s}' for s in _IMAGE_SUFFIXES]
      for path in [*(p for p in images if p.is_file()), root / 'labels' / f'{stem}.png']:
        stat = path.stat() if path.is_file() else None
        entry = (f'{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}' if stat else
                 f'{path.relative_to(root)}:missing')
        digest.update(entry.encode() + b'\0')
  return digest.hexdigest()


def num_train_images(root: str | os.PathLike) -> int:
  """The number of stems train.txt lists."""
  return len(_stems(pathlib.Path(root), 'train'))


def crop_and_eval_size(root: str | os.PathLike, max_crop: int = 321
                       ) -> tuple[tuple[int, int], tuple[int, int]]:
  """Training crop and evaluation size chosen from the images.

  The crop is square: the smallest training image side, at most `max_crop`, rounded down to
  8k + 1 (321 on VOC-sized images, as the paper). The evaluation size holds the largest
  validation image, each side rounded up to 16k + 1 (513 for VOC's 500 px images, as the
  reference pads them).
  """
  smallest = min(min(size) for size in image_sizes(root, 'train'))
  side = max(min(smallest, max_crop) - 1, 8) // 8 * 8 + 1
  val = image_sizes(root, 'validation')
  height, width = (max(size[i] for size in val) for i in (0, 1))
  up = lambda n: -(-(n - 1) // 16) * 16 + 1
  return (side, side), (up(height), up(width))


def data_dir(root: str | os.PathLike) -> str:
  """A TFDS data dir of this folder's own, so that two folder datasets never share a cache.

  Every folder dataset is the builder `reco_folder`; its prepared files go below
  $TFDS_DATA_DIR (or ~/tensorflow_datasets) in `reco_folders/<folder name>-<path hash>`.
  """
  root = pathlib.Path(root).resolve()
  digest = hashlib.sha256(str(root).encode()).hexdigest()[:10]
  base = os.environ.get('TFDS_DATA_DIR') or os.path.join(os.path.expanduser('~'),
                                                         'tensorflow_datasets')
  return os.path.join(base, 'reco_folders', f'{root.name}-{digest}')

"""Reading raw dataset files for the TFDS builders: manual dirs, split lists, images, masks.

Paths are `epath.Path`, so a manual dir may live on a local disk or in a bucket.
Masks are read with PIL: TF decodes palette PNGs to grey levels, not to class ids.
"""
from collections.abc import Callable, Iterable, Iterator, Sequence
import collections
import concurrent.futures
import importlib.resources
import io
import os
from typing import TypeVar

from etils import epath
import numpy as np
from PIL import Image
from PIL import ImageOps
import tensorflow_datasets as tfds

from reco_jax.data import base

_T = TypeVar('_T')
_R = TypeVar('_R')

# Low zlib effort: building is dominated by PNG encoding and the files are written once.
PNG_COMPRESS_LEVEL = 1
# How many missing files an error message lists before summarising.
_MAX_LISTED = 5


def manual_dir(dl_manager: tfds.download.DownloadManager, name: str,
               instructions: str) -> epath.Path:
  """Returns the manual dir, or raises FileNotFoundError saying what belongs in it."""
  try:
    return epath.Path(dl_manager.manual_dir)
  except AssertionError:
    # TFDS only says the dir is missing or empty; name the layout instead.
    path = getattr(dl_manager, '_manual_dir', None)
    raise FileNotFoundError(
        f'{name}: the manual dir {path} is missing or empty. Pass the folder holding the raw '
        f'files as manual_dir (config.manual_dir).\n{instructions}') from None


def require_dirs(root: epath.Path, subdirs: Sequence[str], name: str,
                 instructions: str) -> None:
  """Raises FileNotFoundError listing the `subdirs` of `root` that are absent."""
  missing = [d for d in subdirs if not (root / d).is_dir()]
  if missing:
    raise FileNotFoundError(
        f'{name}: the manual dir {root} lacks {", ".join(missing)} (expected e.g. '
        f'{root / missing[0]}/).\n{instructions}')


def raise_if_missing(missing: Sequence[str], total: int, what: str, name: str,
                     instructions: str) -> None:
  """Raises FileNotFoundError naming a few of the `missing` files out of `total` expected."""
  if not missing:
    return
  listed = ', '.join(str(m) for m in missing[:_MAX_LISTED])
  more = f' and {len(missing) - _MAX_LISTED} more' if len(missing) > _MAX_LISTED else ''
  raise FileNotFoundError(
      f'{name}: {len(missing)} of {total} {what} are missing: {listed}{more}. The manual dir '
      f'is incomplete.\n{instructions}')


def check_unique(ids: Sequence[str], what: str, name: str) -> None:
  """Raises ValueError naming the ids that `what` (e.g. a split list) holds more than once."""
  seen, repeated = set(), []
  for i in ids:
    if i in seen:
      repeated.append(i)
    seen.add(i)
  if repeated:
    raise ValueError(f'{name}: {what} lists {repeated[:_MAX_LISTED]} more than once; each id '
                     'must appear once.')


def list_files(folder: epath.Path, suffixes: Sequence[str]) -> dict[str, epath.Path]:
  """Maps file stem -> path for the files in `folder` whose suffix is in `suffixes`."""
  suffixes = tuple(s.lower() for s in suffixes)
  return {p.name[:p.name.rfind('.')]: p for p in folder.iterdir()
          if p.name.lower().endswith(suffixes)}


def read_id_list(root: epath.Path, filename: str, shipped: str | None = None) -> list[str]:
  """Ids, one per line, from `root/filename` if present, else the shipped `splits/<shipped>`."""
  path = root / filename
  if path.exists():
    text = path.read_bytes().decode('utf-8-sig')  # A byte-order mark is not part of an id.
  elif shipped is None:
    raise FileNotFoundError(f'{path} is missing; it lists ids, one per line.')
  else:
    return shipped_ids(shipped)
  return [line.strip() for line in text.splitlines() if line.strip()]


def shipped_ids(filename: str) -> list[str]:
  """The ids of a split list shipped in reco_jax/data/splits, one per line."""
  text = (importlib.resources.files('reco_jax.data') / 'splits' / filename).read_text()
  return [line.strip() for line in text.splitlines() if line.strip()]


def read_rgb(path: os.PathLike[str]) -> np.ndarray:
  """Decodes an image file with PIL to uint8 [H, W, 3] (grey, palette, CMYK ... become RGB),
  turned upright by its EXIF orientation as image viewers show it (and as a label drawn on
  it was drawn). A file PIL cannot decode whole is a ValueError naming it."""
  try:
    with Image.open(io.BytesIO(epath.Path(path).read_bytes())) as im:
      return np.asarray(ImageOps.exif_transpose(im).convert('RGB'))
  except (OSError, SyntaxError, Image.DecompressionBombError) as e:
    raise ValueError(f'{path} cannot be decoded ({e}): the file is truncated or not an image. '
                     'Replace it, or remove its stem from the split lists.') from None


def read_label(path: os.PathLike[str]) -> np.ndarray:
  """Decodes a single-channel PNG mask to its raw values: uint8 [H, W] (palette indices kept)."""
  try:
    with Image.open(io.BytesIO(epath.Path(path).read_bytes())) as im:
      if im.mode not in ('L', 'P', 'I', 'I;16', 'I;16B', 'I;16L', '1'):
        raise ValueError(f'{path}: a label must be a single-channel PNG of class ids, got PIL '
                         f'mode {im.mode}. Save masks as 8-bit grayscale (mode L).')
      label = np.asarray(im)
  except (OSError, SyntaxError) as e:
    raise ValueError(f'{path} cannot be decoded ({e}): the file is truncated or not a PNG. '
                     'Replace it, or remove its stem from the split lists.') from None
  if label.dtype != np.uint8:
    if label.size and (label.min() < 0 or label.max() > 255):
      raise ValueError(f'{path}: label values span {label.min()}..{label.max()}; expected 8-bit '
                       'class ids 0..255.')
    label = label.astype(np.uint8)
  return label


def check_same_size(image_id: str, image: np.ndarray, label: np.ndarray) -> None:
  """Raises ValueError naming `image_id` if image [H, W, 3] and label [H, W] differ in size."""
  if image.shape[:2] != label.shape[:2]:
    raise ValueError(f'{image_id}: image is {image.shape[0]}x{image.shape[1]} (upright, after '
                     f'its EXIF orientation if it has one) but its label is '
                     f'{label.shape[0]}x{label.shape[1]}; they must have the same size.')


def resize_image(image: np.ndarray, size: tuple[int, int],
                 resample: Image.Resampling) -> np.ndarray:
  """Resizes uint8 [H, W, 3] to `size` = (height, width) with PIL's `resample` filter."""
  return np.asarray(Image.fromarray(image).resize((size[1], size[0]), resample=resample))


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Resizes uint8 [H, W] class ids to `size` = (height, width), nearest neighbour."""
  return np.asarray(Image.fromarray(label).resize((size[1], size[0]),
                                                  resample=Image.Resampling.NEAREST))


def encode_png(array: np.ndarray) -> bytes:
  """PNG bytes of uint8 [H, W, 3] or [H, W] / [H, W, 1] (PIL is faster than TF's encoder)."""
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG', compress_level=PNG_COMPRESS_LEVEL)
  return buffer.getvalue()


def encode_example(example: dict) -> dict:
  """Replaces the arrays of a `base.make_example` dict by PNG bytes, ready for TFDS.

  Images are stored losslessly as PIL decoded them, even when the raw file is a JPEG: TF's
  default JPEG decoder (integer-fast DCT) differs from PIL's by a few levels, and the reference
  reads its images with PIL.
  """
  example = dict(example)
  example['image'] = encode_png(example['image'])
  example['label'] = encode_png(example['label'])
  return example


def ordered_map(fn: Callable[[_T], _R], items: Iterable[_T],
                num_threads: int | None = None) -> Iterator[_R]:
  """Yields fn(item) in order, computing a bounded number ahead in threads.

  PIL releases the GIL while decoding, resizing and encoding, so threads speed up a build on a
  multi-core machine; at most 4 results per thread wait in memory.
  """
  num_threads = num_threads or min(8, os.cpu_count() or 1)
  if num_threads <= 1:
    yield from map(fn, items)
    return
  window = 4 * num_threads
  pending = collections.deque()
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    try:
      for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
          yield pending.popleft().result()
      while pending:
        yield pending.popleft().result()
    finally:
      # On an error or an early stop, drop the work not started yet.
      for future in pending:
        future.cancel()


def load_examples(items: Iterable[tuple[str, epath.Path, epath.Path]], num_classes: int,
                  transform: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
                  | None = None) -> Iterator[tuple[str, dict]]:
  """Reads (image id, image path, label path) items into encoded examples, in order.

  `transform(image, label)` (resize, label mapping) runs after the size check and before
  `base.make_example` validates the labels against `num_classes`.
  """
  def load(item):
    image_id, image_path, label_path = item
    image = read_rgb(image_path)
    label = read_label(label_path)
    try:
      check_same_size(image_id, image, label)
      if transform is not None:
        image, label = transform(image, label)
      example = base.make_example(image_id, image, label, num_classes)
    except ValueError as e:  # Name the files: the user fixes files, not ids.
      raise ValueError(f'{e} (image {image_path}, label {label_path})') from None
    return image_id, encode_example(example)

  return ordered_map(load, items)

"""Tiny fake raw datasets in the official file layouts, for building the TFDS datasets in tests.

Each writer returns what it wrote, as PIL decodes it back, so tests can compare stored examples
with the raw files: {image_id: (image uint8 [H, W, 3], raw label uint8 [H, W])}.
"""
import pathlib

import numpy as np
from PIL import Image


def _image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  # Smooth colour ramps plus noise: distinct per image, and JPEG keeps them recognisable.
  base = rng.integers(0, 256, size=3)
  ramp = np.linspace(0, 80, width)[None, :, None]
  noise = rng.integers(0, 30, size=(height, width, 3))
  return np.clip(base + ramp + noise, 0, 255).astype(np.uint8)


def _blocks(rng: np.random.Generator, height: int, width: int, values, block: int) -> np.ndarray:
  """Label of `block` x `block` constant squares, so nearest resizing by 2 is unambiguous.

  Each label uses a random subset (at least 2) of `values`, so images differ in their classes.
  """
  values = np.asarray(values)
  subset = rng.choice(values, size=rng.integers(2, len(values) + 1), replace=False)
  small = rng.choice(subset, size=(height // block, width // block))
  return np.kron(small, np.ones((block, block), small.dtype)).astype(np.uint8)


def save_jpg(path: pathlib.Path, image: np.ndarray) -> np.ndarray:
  """Writes a JPEG and returns its pixels as PIL decodes them."""
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(image).save(path, quality=90)
  return np.asarray(Image.open(path).convert('RGB'))


def save_png(path: pathlib.Path, array: np.ndarray, palette: bool = False) -> np.ndarray:
  """Writes uint8 [H, W] (or [H, W, 3]) as PNG and returns `array`."""
  path.parent.mkdir(parents=True, exist_ok=True)
  if palette:
    # Palette PNG: pixel values are palette indices (the class ids), colours arbitrary.
    im = Image.frombytes('P', (array.shape[1], array.shape[0]), array.tobytes())
    im.putpalette([(i * m) % 256 for i in range(256) for m in (7, 13, 29)])
  else:
    im = Image.fromarray(array)
  im.save(path)
  return array


def write_lines(path: pathlib.Path, lines) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(''.join(f'{line}\n' for line in lines))


def make_voc(root: pathlib.Path, train=('2007_000001', '2007_000002', '2008_000003',
                                        '2009_000004'),
             val=('2010_000005', '2011_000006'), size=(40, 60), seed=0, lists=True) -> dict:
  """JPEGImages/<id>.jpg, SegmentationClassAug/<id>.png (0..20 and 255), train_aug.txt, val.txt."""
  rng = np.random.default_rng(seed)
  written = {}
  for image_id in (*train, *val):
    image = save_jpg(root / 'JPEGImages' / f'{image_id}.jpg', _image(rng, *size))
    label = _blocks(rng, *size, values=[0, 1, 7, 15, 20, 255], block=1)
    written[image_id] = (image, save_png(root / 'SegmentationClassAug' / f'{image_id}.png', label))
  if lists:
    write_lines(root / 'train_aug.txt', train)
    write_lines(root / 'val.txt', val)
  return written


def make_cityscapes(root: pathlib.Path, size=(64, 128), seed=0) -> dict:
  """leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and gtFine/.../*_gtFine_labelIds.png.

  Labels use every labelId 0..33 in 2x2 blocks. 4 train frames (2 cities), 2 val frames.
  """
  rng = np.random.default_rng(seed)
  frames = {'train': ['aachen_000000_000019', 'aachen_000001_000019', 'bochum_000000_000313',
                      'bochum_000000_001097'],
            'val': ['frankfurt_000000_000294', 'frankfurt_000001_000538']}
  written = {}
  for split, names in frames.items():
    for frame in names:
      city = frame.split('_')[0]
      image = _image(rng, *size)
      Image.fromarray(image).save(
          _mkdir(root / 'leftImg8bit' / split / city) / f'{frame}_leftImg8bit.png')
      label = _blocks(rng, *size, values=np.arange(34), block=2)
      save_png(root / 'gtFine' / split / city / f'{frame}_gtFine_labelIds.png', label)
      # The official archives also hold colour, instance and polygon files next to labelIds.
      save_png(root / 'gtFine' / split / city / f'{frame}_gtFine_instanceIds.png', label + 1)
      written[frame] = (image, label)
  return written


def make_sun(root: pathlib.Path, num_train=3, num_test=4, val=(2, 4), size=(192, 256),
             seed=0) -> dict:
  """SUNRGBD-{train,test}_images/img-%06d.jpg, sunrgbd_train_test_labels/img-%06d.png (0..37).

  Training image k has label k + 5050, test image k label k; labels in 2x2 blocks so that the
  nearest upsampling of 192x256 to 384x512 is unambiguous. Keyed by the expected image ids.
  """
  rng = np.random.default_rng(seed)
  written = {}
  for folder, count, offset in (('SUNRGBD-train_images', num_train, 5050),
                                ('SUNRGBD-test_images', num_test, 0)):
    for k in range(1, count + 1):
      image = save_jpg(root / folder / f'img-{k:06d}.jpg', _image(rng, *size))
      label = _blocks(rng, *size, values=np.arange(38), block=2)
      save_png(root / 'sunrgbd_train_test_labels' / f'img-{k + offset:06d}.png', label)
      written[f'img-{k + offset:06d}'] = (image, label)
  if val is not None:
    write_lines(root / 'test_idx.txt', val)
  return written


def make_folder(root: pathlib.Path, classes=('sky', 'road', 'car'),
                train=('a', 'b', 'c', 'd'), val=('e', 'f'), size=(40, 60), seed=0) -> dict:
  """images/<stem>.{jpg,png}, labels/<stem>.png (palette PNG for one), lists and classes.txt."""
  rng = np.random.default_rng(seed)
  written = {}
  for n, stem in enumerate((*train, *val)):
    image = _image(rng, *size)
    if n % 2:
      Image.fromarray(image).save(_mkdir(root / 'images') / f'{stem}.png')
    else:
      image = save_jpg(root / 'images' / f'{stem}.jpg', image)
    label = _blocks(rng, *size, values=[*range(len(classes)), 255], block=1)
    written[stem] = (image, save_png(root / 'labels' / f'{stem}.png', label, palette=n == 0))
  write_lines(root / 'train.txt', train)
  write_lines(root / 'val.txt', val)
  write_lines(root / 'classes.txt', classes)
  return written


def _mkdir(path: pathlib.Path) -> pathlib.Path:
  path.mkdir(parents=True, exist_ok=True)
  return path

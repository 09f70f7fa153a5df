"""`reco_toy`: a small procedurally generated segmentation dataset that builds in seconds.

Scenes of 1-4 overlapping objects on a textured background, at sizes between 64x64 and 96x96 so
that evaluation padding is exercised. Object colours are random, so classes differ only by shape
or texture, and some pairs are easily confused (disc/ring, square/diamond, striped/checkered);
'cross' and 'checkered' are rare. A thin void (255) band separates regions, as in VOC.
Every example is drawn from its own numpy generator seeded by (split, index): a build is
reproducible bit for bit.
"""
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from reco_jax import names
from reco_jax.data import base

CLASS_NAMES = ('background', 'disc', 'ring', 'square', 'diamond', 'triangle', 'cross',
               'striped', 'checkered')
NUM_CLASSES = len(CLASS_NAMES)

# Relative frequency of each object class (class ids 1..8) when an object is drawn.
_OBJECT_WEIGHTS = np.array([1.0, 1.0, 1.0, 1.0, 0.8, 0.2, 0.8, 0.3])
_SPLIT_SEEDS = {'train': 1, 'validation': 2}


@dataclasses.dataclass(eq=False)
class RecoToyConfig(tfds.core.BuilderConfig):
  """Example counts and the range of image sides (height and width drawn independently)."""
  num_train: int = 2000
  num_validation: int = 200
  min_size: int = 64
  max_size: int = 96


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
  """[H, W] float32 in about [0, 1]: bilinear upsampling of a coarse random grid."""
  grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
  y = np.linspace(0, cells, height, dtype=np.float32)
  x = np.linspace(0, cells, width, dtype=np.float32)
  y0 = np.minimum(y.astype(np.int32), cells - 1)
  x0 = np.minimum(x.astype(np.int32), cells - 1)
  fy = (y - y0)[:, None]
  fx = (x - x0)[None, :]
  top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
  bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
  return top * (1 - fy) + bottom * fy


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """[H, W, 3] float32 in [0, 1]: two random colours mixed by smooth noise and a faint grating."""
  c0, c1 = rng.random(3), rng.random(3)
  mix = _smooth_noise(rng, height, width, int(rng.integers(2, 6)))
  yy, xx = np.mgrid[:height, :width].astype(np.float32)
  angle = rng.uniform(0, np.pi)
  period = rng.uniform(10, 30)
  grating = 0.15 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
  mix = np.clip(mix + grating, 0, 1)[..., None]
  return (c0 * (1 - mix) + c1 * mix).astype(np.float32)


def _object_mask(cls: int, u: np.ndarray, v: np.ndarray, r: float,
                 rng: np.random.Generator) -> np.ndarray:
  """Boolean mask of object class `cls` in its own rotated frame (u, v), radius `r` pixels."""
  name = CLASS_NAMES[cls]
  rho2 = u * u + v * v
  if name == 'disc':
    return rho2 <= r * r
  if name == 'ring':
    inner = r * rng.uniform(0.45, 0.7)
    return (rho2 <= r * r) & (rho2 >= inner * inner)
  if name in ('square', 'diamond'):  # the frame is turned by ~0 or ~45 degrees; see `_draw`
    return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
  if name == 'triangle':
    inside = np.ones_like(u, bool)
    for k in range(3):
      a = 2 * np.pi * k / 3
      inside &= u * np.cos(a) + v * np.sin(a) <= 0.5 * r
    return inside
  if name == 'cross':
    arm = 0.3 * r
    return (((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r)))
  # striped / checkered: ellipses told apart by their texture only.
  aspect = rng.uniform(0.6, 1.0)
  return (u / r) ** 2 + (v / (aspect * r)) ** 2 <= 1


def _object_colour(cls: int, u: np.ndarray, v: np.ndarray, r: float,
                   rng: np.random.Generator) -> np.ndarray:
  """[H, W, 3] float32 object appearance: shaded random colour, or a two-colour texture."""
  c0 = rng.random(3)
  shade = 1 + 0.25 * (u * rng.normal() + v * rng.normal()) / (3 * r)
  name = CLASS_NAMES[cls]
  if name in ('striped', 'checkered'):
    c1 = rng.random(3)
    period = rng.uniform(4, 8)
    if name == 'striped':
      t = np.sin(2 * np.pi * u / period) > 0
    else:
      t = (np.sin(2 * np.pi * u / period) * np.sin(2 * np.pi * v / period)) > 0
    colour = np.where(t[..., None], c0, c1)
  else:
    colour = np.broadcast_to(c0, u.shape + (3,))
  return (colour * shade[..., None]).astype(np.float32)


def _void_border(label: np.ndarray) -> np.ndarray:
  """Marks void every pixel with a differently labelled 8-neighbour (a 2-pixel band)."""
  padded = np.pad(label, 1, mode='edge')
  h, w = label.shape
  edge = np.zeros(label.shape, bool)
  for dy in range(3):
    for dx in range(3):
      edge |= padded[dy:dy + h, dx:dx + w] != label
  return np.where(edge, names.VOID, label).astype(np.uint8)


def render(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """Draws one scene.

  Returns:
    image: [height, width, 3] uint8; label: [height, width] uint8 class ids, 255 = void.
  """
  image = _background(rng, height, width)
  label = np.zeros((height, width), np.uint8)
  yy, xx = np.mgrid[:height, :width].astype(np.float32)
  side = min(height, width)
  for _ in range(int(rng.integers(1, 5))):
    cls = int(rng.choice(NUM_CLASSES - 1, p=_OBJECT_WEIGHTS / _OBJECT_WEIGHTS.sum())) + 1
    r = rng.uniform(0.12, 0.28) * side
    cy, cx = rng.uniform(0.1, 0.9) * height, rng.uniform(0.1, 0.9) * width
    if CLASS_NAMES[cls] == 'square':
      angle = np.deg2rad(rng.uniform(-15, 15))
    elif CLASS_NAMES[cls] == 'diamond':
      angle = np.deg2rad(45 + rng.uniform(-15, 15))
    else:
      angle = rng.uniform(0, 2 * np.pi)
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    mask = _object_mask(cls, u, v, r, rng)
    colour = _object_colour(cls, u, v, r, rng)
    image = np.where(mask[..., None], colour, image)  # later objects occlude earlier ones
    label[mask] = cls
  image = image + rng.normal(0, rng.uniform(0.02, 0.08), image.shape)
  image = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
  return image, _void_border(label)


def example(split: str, index: int, config: RecoToyConfig) -> dict:
  """The example `index` of `split` (a base.make_example dict), drawn from its own seed."""
  rng = np.random.default_rng([_SPLIT_SEEDS[split], index])
  height, width = rng.integers(config.min_size, config.max_size + 1, size=2)
  image, label = render(rng, int(height), int(width))
  return base.make_example(f'{split}_{index:05d}', image, label, NUM_CLASSES)


class RecoToy(base.SegmentationBuilder):
  """Procedural shapes-and-textures segmentation: 8 object classes + background."""

  BUILDER_CONFIGS = [
      RecoToyConfig(name='default', description='2000 train / 200 validation images.'),
      RecoToyConfig(name='tiny', description='48 train / 12 validation images, for tests.',
                    num_train=48, num_validation=12),
  ]

  CLASS_NAMES = CLASS_NAMES
  DESCRIPTION = __doc__

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {
        'train': self._generate_examples('train', self.builder_config.num_train),
        'validation': self._generate_examples('validation', self.builder_config.num_validation),
    }

  def _generate_examples(self, split, count):
    for index in range(count):
      ex = example(split, index, self.builder_config)
      yield ex['image_id'], ex

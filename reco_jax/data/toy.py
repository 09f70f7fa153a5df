"""`reco_toy`: a small procedurally generated segmentation dataset that builds in seconds.

Scenes of 1-4 overlapping lobed blobs on a smooth greyish background, at sizes between 64x64
and 96x96 so that evaluation padding is exercised. Each of the 8 object classes is a two-tone
texture (stripes, waves, zigzag, checker, dots, grid, speckle, rings) of random period,
orientation and shading, in a colour drawn from the class's own band of hues; neighbouring
bands touch, so colour narrows a pixel down to two or three classes and the texture decides.
Several pairs are easily confused (stripes/waves/zigzag, checker/grid/dots); 'rings' is rare.
A thin void (255) band separates regions, as in VOC. The wide variation within each class
(hue, period, orientation, shape, noise) is what a few labelled images do not cover.
Every example is drawn from its own numpy generator seeded by (split, index): a build is
reproducible bit for bit.
"""
import colorsys
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from reco_jax import names
from reco_jax.data import base

CLASS_NAMES = ('background', 'stripes', 'waves', 'zigzag', 'checker', 'dots', 'grid', 'speckle',
               'rings')
NUM_CLASSES = len(CLASS_NAMES)

# Relative frequency of each object class (class ids 1..8) when an object is drawn.
_OBJECT_WEIGHTS = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.25])
_SPLIT_SEEDS = {'train': 1, 'validation': 2}
_HUE_SPREAD = 0.1

# What the README's main job budget (configs/toy.py) reaches per method: eval mIoU, mean and
# range over the seeds of benchmarks/results/label_efficiency.md, printed at the end of a toy
# run so that its console says where the gain is. Keyed by labelled images (0 = all).
REFERENCE_MIOU = {
    30: (('Supervised', 0.260, 0.241, 0.276), ('ClassMix', 0.360, 0.355, 0.366),
         ('ReCo + ClassMix', 0.419, 0.345, 0.480)),
    50: (('Supervised', 0.338, 0.326, 0.347), ('ClassMix', 0.383, 0.351, 0.440),
         ('ReCo + ClassMix', 0.430, 0.368, 0.467)),
    100: (('Supervised', 0.472, 0.406, 0.584), ('ClassMix', 0.487, 0.421, 0.559),
          ('ReCo + ClassMix', 0.488, 0.384, 0.569)),
    0: (('Supervised', 0.589, 0.550, 0.614),),
}
REFERENCE_STEPS = 2000  # configs/toy.py's num_train_steps, the budget of REFERENCE_MIOU


@dataclasses.dataclass(eq=False)
class RecoToyConfig(tfds.core.BuilderConfig):
  """Example counts and the range of image sides (height and width drawn independently)."""
  num_train: int = 2000
  num_validation: int = 500
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
  """[H, W, 3] float32 in [0, 1]: two greyish colours mixed by smooth noise, no texture."""
  c0 = 0.75 * rng.random() + 0.25 * rng.random(3)
  c1 = 0.75 * rng.random() + 0.25 * rng.random(3)
  mix = _smooth_noise(rng, height, width, int(rng.integers(2, 6)))[..., None]
  return (c0 * (1 - mix) + c1 * mix).astype(np.float32)


def _pattern(name: str, u: np.ndarray, v: np.ndarray, period: float,
             rng: np.random.Generator) -> np.ndarray:
  """Boolean [H, W]: where texture `name` takes its second tone, in the frame (u, v)."""
  wave = lambda t: np.sin(2 * np.pi * t / period)
  if name == 'stripes':
    return wave(u) > 0
  if name in ('waves', 'zigzag'):  # stripes bent by a sine or a triangle wave
    amplitude, length = rng.uniform(0.3, 0.6) * period, rng.uniform(2.0, 3.5) * period
    if name == 'waves':
      bend = np.sin(2 * np.pi * v / length)
    else:
      bend = 4 * np.abs((v / length) % 1 - 0.5) - 1
    return wave(u + amplitude * bend) > 0
  if name == 'checker':
    return wave(u) * wave(v) > 0
  fu, fv = (u / period) % 1 - 0.5, (v / period) % 1 - 0.5
  if name == 'dots':
    return fu * fu + fv * fv < rng.uniform(0.06, 0.12)
  if name == 'grid':
    width = rng.uniform(0.12, 0.2)
    return (np.abs(fu) < width) | (np.abs(fv) < width)
  if name == 'speckle':
    return rng.random(u.shape) < rng.uniform(0.3, 0.5)
  if name == 'rings':
    return wave(np.sqrt(u * u + v * v)) > 0
  raise ValueError(f'Unknown toy texture {name!r}.')


def _blob(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float,
          r: float) -> np.ndarray:
  """Boolean mask of a random lobed blob of mean radius `r` around (cy, cx)."""
  angle = np.arctan2(yy - cy, xx - cx)
  radius = r * np.ones_like(angle)
  for lobes in (2, 3, 5):
    radius += r * rng.uniform(0, 0.25) * np.sin(lobes * angle + rng.uniform(0, 2 * np.pi))
  return np.hypot(yy - cy, xx - cx) <= radius


def _object_colours(cls: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """The two tones of an object: a saturated colour of the class's hue band, and a darker one.

  Class k's hues lie within +-`_HUE_SPREAD` (of the colour wheel) of k/8, so neighbouring
  classes' bands touch and only the texture tells them apart near the band edges.
  """
  hue = ((cls - 1) / (NUM_CLASSES - 1) + rng.uniform(-_HUE_SPREAD, _HUE_SPREAD)) % 1
  c0 = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.5, 1), rng.uniform(0.5, 1)))
  return c0, c0 * rng.uniform(0.2, 0.6)


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
    r = rng.uniform(0.15, 0.32) * side
    cy, cx = rng.uniform(0.15, 0.85) * height, rng.uniform(0.15, 0.85) * width
    mask = _blob(rng, yy, xx, cy, cx, r)
    angle = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    tone = _pattern(CLASS_NAMES[cls], u, v, rng.uniform(6, 12), rng)[..., None]
    c0, c1 = _object_colours(cls, rng)
    shade = 1 + 0.25 * (u * rng.normal() + v * rng.normal()) / (3 * r)
    colour = np.where(tone, c1, c0) * shade[..., None]
    image = np.where(mask[..., None], colour, image)  # later objects occlude earlier ones
    label[mask] = cls
  image = image + rng.normal(0, rng.uniform(0.02, 0.08), image.shape)
  image = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
  return image, _void_border(label)


def reference_line(dataset: str, labels: int, num_train_steps: int) -> str | None:
  """The benchmark's figures for a full-toy run of the reference budget, as a console line."""
  if (dataset != 'reco_toy' or labels not in REFERENCE_MIOU
      or num_train_steps != REFERENCE_STEPS):
    return None
  figures = lambda n: ', '.join(f'{name} {mean:.2f} ({low:.2f}-{high:.2f})'
                                for name, mean, low, high in REFERENCE_MIOU[n])
  every = f'all {RecoToyConfig.num_train:,} labels'
  budget = f'{labels} labels' if labels else every
  text = (f'The toy with {budget} in this budget reaches (mean and range over seeds, '
          f'benchmarks/results/label_efficiency.md): {figures(labels)}')
  if labels:
    text += f'; {every}, {figures(0)}'
  return text + ('. One run varies with its seed and with the CPU (its vector instructions '
                 'round float32 differently): compare methods over seeds, not single runs.')


def example(split: str, index: int, config: RecoToyConfig) -> dict:
  """The example `index` of `split` (a base.make_example dict), drawn from its own seed."""
  rng = np.random.default_rng([_SPLIT_SEEDS[split], index])
  height, width = rng.integers(config.min_size, config.max_size + 1, size=2)
  image, label = render(rng, int(height), int(width))
  return base.make_example(f'{split}_{index:05d}', image, label, NUM_CLASSES)


class RecoToy(base.SegmentationBuilder):
  """Procedural texture segmentation: 8 object classes + background."""

  BUILDER_CONFIGS = [
      RecoToyConfig(name='default', description='2000 train / 500 validation images.'),
      RecoToyConfig(name='tiny', description='48 train / 12 validation images, for tests.',
                    num_train=48, num_validation=12),
  ]

  VERSION = tfds.core.Version('2.0.0')
  RELEASE_NOTES = {'1.0.0': 'Shapes and textures.', '2.0.0': 'Texture classes.'}
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

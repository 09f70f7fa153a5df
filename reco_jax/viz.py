"""Colour maps and image | ground truth | prediction panels for segmentation summaries."""
import numpy as np

from reco_jax import normalization

VOID = 255


def voc_palette(num_colors: int = 256) -> np.ndarray:
  """The Pascal VOC colour map: uint8 [num_colors, 3].

  Class k's colour spreads the bits of k over the high bits of R, G and B, so neighbouring
  ids get distinct colours; id 0 is black and id 255 (void) is (224, 224, 192) as in VOC.
  """
  if not 1 <= num_colors <= 256:
    raise ValueError(f'voc_palette: num_colors must be in 1..256, got {num_colors}.')
  ids = np.arange(num_colors)
  palette = np.zeros((num_colors, 3), np.int64)
  for shift in range(8):
    for channel in range(3):
      bit = (ids >> (3 * shift + channel)) & 1
      palette[:, channel] |= bit << (7 - shift)
  return palette.astype(np.uint8)


def colorize(labels: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
  """Class-id maps to RGB: labels int [..., H, W] (0..255, 255 = void) -> uint8 [..., H, W, 3]."""
  labels = np.asarray(labels)
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'colorize expects integer class ids, got {labels.dtype}.')
  palette = voc_palette() if palette is None else np.asarray(palette, np.uint8)
  if labels.size and (labels.min() < 0 or labels.max() >= len(palette)):
    raise ValueError(f'colorize: class ids must be in 0..{len(palette) - 1}, got '
                     f'{labels.min()}..{labels.max()}.')
  return palette[labels]


def to_uint8_image(images: np.ndarray) -> np.ndarray:
  """ImageNet-normalised float [..., H, W, 3] -> uint8 RGB [..., H, W, 3]."""
  rgb = normalization.denormalize(np.asarray(images, np.float32))
  return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


def segmentation_panels(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                        gap: int = 4) -> np.ndarray:
  """Side-by-side panels for image summaries.

  images: [B, H, W, 3] ImageNet-normalised float; labels, predictions: [B, H, W] integer class
  ids (255 = void in labels). Returns uint8 [B, H, 3 * W + 2 * gap, 3]: image | ground truth |
  prediction, separated by white columns.
  """
  images, labels, predictions = map(np.asarray, (images, labels, predictions))
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'segmentation_panels: images must be [B, H, W, 3], got {images.shape}.')
  if labels.shape != images.shape[:3] or predictions.shape != images.shape[:3]:
    raise ValueError(f'segmentation_panels: labels {labels.shape} and predictions '
                     f'{predictions.shape} must both be [B, H, W] = {images.shape[:3]}.')
  separator = np.full(images.shape[:2] + (gap, 3), 255, np.uint8)
  return np.concatenate([to_uint8_image(images), separator, colorize(labels), separator,
                         colorize(predictions)], axis=2)

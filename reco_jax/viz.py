"""Colour maps, segmentation panels and the figures of the analysis tools.

Panels are uint8 arrays (TensorBoard images); figures (confusion matrix, class relation
heatmap, dendrogram) are matplotlib Figures, drawn without pyplot so that no GUI backend or
global figure state is involved, and `figure_to_image` turns one into a uint8 image.
matplotlib and SciPy are imported only by the functions that draw.
"""
from collections.abc import Sequence

import numpy as np

from reco_jax import names
from reco_jax import normalization

VOID = names.VOID
# The Cityscapes trainId colours (the 19 evaluated classes), as in the reference's
# build_data.py create_cityscapes_label_colormap.
CITYSCAPES_COLORS = np.array([
    [128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153],
    [153, 153, 153], [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152],
    [70, 130, 180], [220, 20, 60], [255, 0, 0], [0, 0, 142], [0, 0, 70], [0, 60, 100],
    [0, 80, 100], [0, 0, 230], [119, 11, 32]], np.uint8)
# Pixels that are not queries in the query panels: the image washed out towards white.
_WASH = 0.7


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


def dataset_palette(dataset: str) -> np.ndarray:
  """uint8 [256, 3] colours of a dataset's class ids (255 = void).

  Cityscapes ('reco_cityscapes') gets its standard trainId colours, every other dataset
  (VOC, SUN RGB-D, the toy and folder datasets) the VOC colour map, whose bit-spread colours
  keep neighbouring ids apart; void is VOC's (224, 224, 192) in both.
  """
  palette = voc_palette()
  if dataset.split('/')[0] == 'reco_cityscapes':
    palette[:len(CITYSCAPES_COLORS)] = CITYSCAPES_COLORS
  return palette


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


def overlay(image: np.ndarray, labels: np.ndarray, palette: np.ndarray | None = None,
            alpha: float = 0.7) -> np.ndarray:
  """A colour-coded class map blended over its image, as the reference's visual.py does.

  image: uint8 [H, W, 3]; labels: int [H, W] class ids; alpha: weight of the colours
  (the reference's Image.blend(image, colours, alpha=0.7)). Returns uint8 [H, W, 3].
  """
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'overlay: image must be uint8 [H, W, 3], got {image.dtype} '
                     f'{image.shape}.')
  if np.shape(labels) != image.shape[:2]:
    raise ValueError(f'overlay: labels {np.shape(labels)} must be [H, W] = {image.shape[:2]}.')
  colours = colorize(labels, palette).astype(np.float32)
  blend = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
  return np.clip(np.round(blend), 0, 255).astype(np.uint8)


def query_panels(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                 confidence: np.ndarray, strong_threshold: float,
                 palette: np.ndarray | None = None, gap: int = 4) -> np.ndarray:
  """The ReCo paper's Fig. 2 panel: easy and hard queries beside the prediction.

  ReCo draws its queries among the labelled pixels of each class whose predicted probability
  of that class is below the strong threshold (hard queries, section 3.2; the reference's
  `prob_seg < strong_threshold`); the others are easy. Query pixels are drawn in their class
  colour, every other pixel (void, or a query of the other kind) as the image washed out.

  images: [B, H, W, 3] ImageNet-normalised float; labels, predictions: int [B, H, W] class ids
  (255 = void in labels); confidence: float [B, H, W], the predicted probability of each
  pixel's labelled class (any value on void pixels); strong_threshold: delta_s.
  Returns uint8 [B, H, 5 * W + 4 * gap, 3]: image | ground truth | prediction | easy queries
  | hard queries, separated by white columns.
  """
  images, labels, predictions, confidence = map(
      np.asarray, (images, labels, predictions, confidence))
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'query_panels: images must be [B, H, W, 3], got {images.shape}.')
  for name, x in (('labels', labels), ('predictions', predictions),
                  ('confidence', confidence)):
    if x.shape != images.shape[:3]:
      raise ValueError(f'query_panels: {name} {x.shape} must be [B, H, W] = '
                       f'{images.shape[:3]}.')
  rgb = to_uint8_image(images)
  grey = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
  washed = np.round(_WASH * 255 + (1 - _WASH) * grey).astype(np.uint8)
  washed = np.repeat(washed[..., None], 3, axis=-1)
  labelled = labels != VOID
  colours = colorize(np.where(labelled, labels, 0), palette)
  easy = labelled & (confidence >= strong_threshold)
  hard = labelled & (confidence < strong_threshold)
  easy_map = np.where(easy[..., None], colours, washed)
  hard_map = np.where(hard[..., None], colours, washed)
  separator = np.full(images.shape[:2] + (gap, 3), 255, np.uint8)
  parts = [rgb, colorize(labels, palette), colorize(predictions, palette), easy_map, hard_map]
  out = [parts[0]]
  for part in parts[1:]:
    out.extend([separator, part])
  return np.concatenate(out, axis=2)


# --------------------------------------------------------------------------- figures


def _figure(width: float, height: float):
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  return figure.Figure(figsize=(width, height), dpi=100, layout='constrained')


def figure_to_image(fig) -> np.ndarray:
  """A matplotlib Figure rendered to uint8 RGB [1, H, W, 3] (a TensorBoard image batch)."""
  from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
  canvas = backend_agg.FigureCanvasAgg(fig)
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[None, ..., :3].copy()


def _side(num_classes: int) -> float:
  """Figure side in inches that leaves each class name a readable row."""
  return float(np.clip(1.6 + 0.38 * num_classes, 4.5, 16.0))


def _annotate(ax, values: np.ndarray, fmt: str, dark_above: float,
              dark_below: float = -np.inf) -> None:
  """Writes each cell's value, black on light cells and white on dark ones."""
  for (i, j), v in np.ndenumerate(values):
    if np.isfinite(v):
      dark = v > dark_above or v < dark_below
      text = format(v, fmt)
      if text.startswith('-') and float(text) == 0:
        text = text[1:]  # -0.00 reads as a negative value
      ax.text(j, i, text, ha='center', va='center', fontsize=7,
              color='white' if dark else 'black')


def confusion_figure(confusion: np.ndarray, class_names: Sequence[str], title: str = ''):
  """Row-normalised confusion matrix (each ground-truth class sums to 100 %).

  confusion: int [C, C] pixel counts, rows = ground truth, columns = prediction. A class with
  no ground-truth pixel has an empty row. Cells show percentages when C <= 30.
  """
  confusion = np.asarray(confusion, np.float64)
  num_classes = len(class_names)
  if confusion.shape != (num_classes, num_classes):
    raise ValueError(f'confusion_figure: confusion {confusion.shape} does not match the '
                     f'{num_classes} class names.')
  totals = confusion.sum(1, keepdims=True)
  with np.errstate(invalid='ignore', divide='ignore'):
    rows = np.where(totals > 0, 100.0 * confusion / np.maximum(totals, 1), np.nan)
  side = _side(num_classes)
  fig = _figure(side + 1.2, side)
  ax = fig.add_subplot()
  image = ax.imshow(rows, cmap='Blues', vmin=0, vmax=100)
  fig.colorbar(image, ax=ax, shrink=0.8, label='% of the ground-truth class')
  ticks = np.arange(num_classes)
  ax.set_xticks(ticks, class_names, rotation=60, ha='right', rotation_mode='anchor')
  ax.set_yticks(ticks, class_names)
  ax.set_xlabel('prediction')
  ax.set_ylabel('ground truth')
  if num_classes <= 30:
    _annotate(ax, rows, '.0f', dark_above=60)
  if title:
    ax.set_title(title)
  return fig


def relation_figure(relation: np.ndarray, class_names: Sequence[str], title: str = ''):
  """Heatmap of a class relation graph (cosine similarities in [-1, 1], NaN = absent class).

  relation: float [C, C], e.g. relations.relation_graph of the class mean embeddings. The
  colours span [-1, 1], or [lowest off-diagonal value, 1] when no value is negative.
  """
  relation = np.asarray(relation, np.float64)
  num_classes = len(class_names)
  if relation.shape != (num_classes, num_classes):
    raise ValueError(f'relation_figure: relation {relation.shape} does not match the '
                     f'{num_classes} class names.')
  off = relation[~np.eye(num_classes, dtype=bool) & np.isfinite(relation)]
  if off.size and off.min() >= 0:
    # Non-negative features (e.g. after a ReLU) have only positive cosines: a colour scale
    # from the lowest one up shows their differences, which [-1, 1] would flatten.
    vmin, cmap = np.floor(10 * off.min()) / 10, 'Reds'
  else:
    vmin, cmap = -1.0, 'RdBu_r'
  side = _side(num_classes)
  fig = _figure(side + 1.2, side)
  ax = fig.add_subplot()
  image = ax.imshow(relation, cmap=cmap, vmin=vmin, vmax=1)
  fig.colorbar(image, ax=ax, shrink=0.8, label='cosine similarity of the class means')
  ticks = np.arange(num_classes)
  ax.set_xticks(ticks, class_names, rotation=60, ha='right', rotation_mode='anchor')
  ax.set_yticks(ticks, class_names)
  if num_classes <= 30:
    _annotate(ax, relation, '.2f', dark_above=vmin + 0.8 * (1 - vmin),
              dark_below=-0.6 if vmin < 0 else -np.inf)
  if title:
    ax.set_title(title)
  return fig


def dendrogram_figure(linkage: np.ndarray, class_names: Sequence[str], title: str = '',
                      distance: str = 'cosine distance (1 - cosine similarity)'):
  """A SciPy dendrogram of the classes, leaves labelled with their names.

  linkage: the [n - 1, 4] matrix of scipy.cluster.hierarchy.linkage over n classes (the
  classes of `class_names`, in that order).
  """
  from scipy.cluster import hierarchy  # pylint: disable=g-import-not-at-top
  if len(class_names) < 2 or np.shape(linkage) != (len(class_names) - 1, 4):
    raise ValueError(f'dendrogram_figure: a linkage of {len(class_names)} classes must be '
                     f'[{len(class_names) - 1}, 4], got {np.shape(linkage)}.')
  fig = _figure(max(5.0, 1.5 + 0.45 * len(class_names)), 4.5)
  ax = fig.add_subplot()
  hierarchy.dendrogram(linkage, labels=list(class_names), ax=ax, leaf_rotation=60,
                       color_threshold=0, above_threshold_color='tab:blue')
  for label in ax.get_xticklabels():
    label.set_ha('right')
    label.set_rotation_mode('anchor')
  ax.set_ylabel(distance)
  ax.spines[['top', 'right']].set_visible(False)
  if title:
    ax.set_title(title)
  return fig

"""Inference beyond the training-time evaluation: sliding windows and images of any size.

Sliding-window evaluation follows mmsegmentation's "slide" test mode: windows of the training
crop size tile the evaluation image with a stride of about 2/3 of a window (the last window of
each row and column is moved back inside the image), each window's logits are upsampled to the
window, summed where windows overlap and divided by the number of windows covering each pixel,
then the argmax is taken. The windows tile the image the whole-image evaluation sees (the
`eval_size` canvas of the input pipeline: the full image for Cityscapes and SUN RGB-D, the
reflect-padded image for VOC). An image no larger than a window is one window: exactly the
whole-image prediction.

All window positions are static, so the jitted functions have fixed shapes: one model pass per
window inside a `lax.scan` (one compilation whatever the number of windows).
"""
from collections.abc import Callable, Sequence
import collections
import functools
import math

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np

from reco_jax import parallel
from reco_jax import steps
from reco_jax.models import resize

DEFAULT_STRIDE_FRACTION = 2 / 3


def window_offsets(size: int, window: int, stride: int) -> list[int]:
  """Start positions of windows along one axis of length `size` (mmsegmentation's grid).

  window: the window length, at most `size` (clip it first); stride: the step between starts.
  The last window ends at `size`: ceil((size - window) / stride) + 1 windows in all.
  """
  if not 1 <= window <= size or stride < 1:
    raise ValueError(f'window_offsets needs 1 <= window <= size and stride >= 1, got '
                     f'size={size}, window={window}, stride={stride}.')
  count = math.ceil((size - window) / stride) + 1
  return [min(i * stride, size - window) for i in range(count)]


def window_grid(size: Sequence[int], window: Sequence[int],
                stride_fraction: float = DEFAULT_STRIDE_FRACTION
                ) -> tuple[tuple[int, int], list[tuple[int, int]]]:
  """(window size clipped to the image, [(y, x) start of every window]) for an image `size`.

  The stride is floor(stride_fraction * window) per axis (mmsegmentation's VOC setting: 341
  for 512), at least 1.
  """
  if not 0 < stride_fraction <= 1:
    raise ValueError(f'stride_fraction must be in (0, 1], got {stride_fraction}.')
  (height, width), (wh, ww) = (tuple(int(s) for s in size), tuple(int(w) for w in window))
  if min(wh, ww) < 1:
    raise ValueError(f'The window must be at least 1x1, got {tuple(window)}.')
  wh, ww = min(wh, height), min(ww, width)
  ys = window_offsets(height, wh, max(1, int(stride_fraction * wh)))
  xs = window_offsets(width, ww, max(1, int(stride_fraction * ww)))
  return (wh, ww), [(y, x) for y in ys for x in xs]


def window_counts(size: Sequence[int], window: Sequence[int],
                  stride_fraction: float = DEFAULT_STRIDE_FRACTION) -> np.ndarray:
  """int32 [H, W]: how many windows of `window_grid` cover each pixel (all >= 1)."""
  (wh, ww), offsets = window_grid(size, window, stride_fraction)
  counts = np.zeros(tuple(int(s) for s in size), np.int32)
  for y, x in offsets:
    counts[y:y + wh, x:x + ww] += 1
  return counts


def sliding_window_logits(model: nn.Module, variables, images: jax.Array,
                          window: Sequence[int],
                          stride_fraction: float = DEFAULT_STRIDE_FRACTION) -> jax.Array:
  """Averaged logits of overlapping windows: float32 [B, H, W, C] for images [B, H, W, 3].

  model: a linen model returning (logits, rep) at a fraction of its input size.
  variables: {'params', 'batch_stats'}; images: float32 ImageNet-normalised.
  window: (height, width) of a window (the training crop size), clipped to the image.
  Each window's logits are upsampled to the window (bilinear, align_corners=True, as
  steps.predict does), summed into the canvas and divided by the window count per pixel.
  """
  size = images.shape[1:3]
  (wh, ww), offsets = window_grid(size, window, stride_fraction)

  def window_logits(crop):
    logits, _ = model.apply(variables, crop, train=False)
    return resize.bilinear_align_corners(logits.astype(jnp.float32), (wh, ww))

  if len(offsets) == 1:
    # One window is the whole image: the very computation of the whole-image evaluation.
    return window_logits(images)
  batch = images.shape[0]
  num_classes = jax.eval_shape(window_logits, images[:, :wh, :ww]).shape[-1]

  def add_window(total, offset):
    y, x = offset[0], offset[1]
    crop = lax.dynamic_slice(images, (0, y, x, 0), (batch, wh, ww, images.shape[-1]))
    here = lax.dynamic_slice(total, (0, y, x, 0), (batch, wh, ww, num_classes))
    return lax.dynamic_update_slice(total, here + window_logits(crop), (0, y, x, 0)), None

  total = jnp.zeros((batch, *size, num_classes), jnp.float32)
  total, _ = lax.scan(add_window, total, jnp.asarray(offsets, jnp.int32))
  counts = jnp.asarray(window_counts(size, window, stride_fraction), jnp.float32)
  return total / counts[None, :, :, None]


def make_sliding_eval_step(config: ml_collections.ConfigDict, model: nn.Module,
                           mesh: jax.sharding.Mesh | None = None,
                           window: Sequence[int] | None = None,
                           stride_fraction: float = DEFAULT_STRIDE_FRACTION) -> Callable:
  """The sliding-window counterpart of steps.make_eval_step (same batch, same result type).

  eval_step(variables, batch) -> int32 [C, C] confusion (rows = ground truth) with
  batch = {'image': float32 [B, H, W, 3], 'label': int32 [B, H, W], 'valid': bool [B]}; void,
  out-of-range and padding pixels are not counted, as in steps.make_eval_step.
  window: the window size, default config.crop_size.
  """
  num_classes = int(config.num_classes)
  window = tuple(int(w) for w in (window or config.crop_size))

  def eval_step(variables, batch):
    labels = batch['label'].astype(jnp.int32)
    if labels.shape[1:3] != batch['image'].shape[1:3]:
      raise ValueError(f'Sliding-window evaluation needs labels at the image size; got images '
                       f'{batch["image"].shape} and labels {labels.shape}.')
    logits = sliding_window_logits(model, variables, batch['image'], window, stride_fraction)
    preds = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    mask = (labels >= 0) & (labels < num_classes)
    if 'valid' in batch:
      mask = mask & batch['valid'].astype(bool)[:, None, None]
    return steps.confusion_matrix(labels, preds, mask, num_classes)

  out = parallel.replicated(mesh) if mesh is not None else None
  return jax.jit(eval_step, out_shardings=out)


# --------------------------------------------------------------------------- any image size

# Bucket sides grow in steps of 64 pixels beyond the evaluation size: few compiled shapes,
# and sides of the 16k + 1 form (513, 577, ...) stay of that form.
BUCKET_STEP = 64


def bucket_size(size: Sequence[int], base: Sequence[int],
                step: int = BUCKET_STEP) -> tuple[int, int]:
  """The padded (H, W) an image of `size` is predicted at.

  An image no larger than `base` (the config's eval_size) gets exactly `base`, the canvas it
  would have in evaluation; larger sides grow by multiples of `step`.
  """
  out = []
  for side, base_side in zip(size, base, strict=True):
    side, base_side = int(side), int(base_side)
    out.append(base_side if side <= base_side else
               base_side + math.ceil((side - base_side) / step) * step)
  return tuple(out)


def make_predict_fn(model: nn.Module, mesh: jax.sharding.Mesh | None = None) -> Callable:
  """Jitted predict_fn(variables, images) -> int32 [B, H, W] class ids at the images' size.

  steps.predict with size = the input size; one compilation per input shape, so callers pad
  images to a few bucket sizes and batches to one size.
  """
  def predict_fn(variables, images):
    return steps.predict(model, variables, images, images.shape[1:3])

  out = parallel.data_sharding(mesh) if mesh is not None else None
  return jax.jit(predict_fn, out_shardings=out)


@functools.cache
def _tf():
  import tensorflow as tf  # The input pipeline's ops, only where images are read.
  return tf


def preprocess(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """uint8 [h, w, 3] -> float32 [H, W, 3] ImageNet-normalised, padded as in evaluation.

  Pads bottom/right to `size` by reflection with the input pipeline's own ops
  (image_ops.pad_to_size), so an image predicted here sees the very input it gets in
  evaluation. size must be at least the image size.
  """
  from reco_jax import normalization
  from reco_jax.data import image_ops
  tf = _tf()
  h, w = image.shape[:2]
  if h > size[0] or w > size[1]:
    raise ValueError(f'preprocess pads only: the image is {h}x{w}, the size {tuple(size)}.')
  x = tf.image.convert_image_dtype(tf.constant(image, tf.uint8), tf.float32)
  x, _ = image_ops.pad_to_size(x, None, int(size[0]), int(size[1]))
  return np.asarray(normalization.normalize(x), np.float32)


def map_in_buckets(fn: Callable[[np.ndarray], np.ndarray], images: Sequence[np.ndarray],
                   eval_size: Sequence[int], batch_size: int) -> list[np.ndarray]:
  """fn over uint8 [h, w, 3] images in fixed-shape batches, each output cropped to its image.

  Images are grouped by `bucket_size(size, eval_size)`, preprocessed (padded) to it and run
  in batches of `batch_size` (the last one zero-padded); fn(float32 [batch_size, H, W, 3])
  returns [batch_size, H, W, ...] per-pixel outputs. Returns [h, w, ...] per image, in order.
  """
  buckets = collections.defaultdict(list)
  for i, image in enumerate(images):
    buckets[bucket_size(image.shape[:2], eval_size)].append(i)
  out = [None] * len(images)
  for size, indices in buckets.items():
    for start in range(0, len(indices), batch_size):
      chunk = indices[start:start + batch_size]
      batch = np.zeros((batch_size, *size, 3), np.float32)
      for row, i in enumerate(chunk):
        batch[row] = preprocess(images[i], size)
      result = np.asarray(fn(batch))
      for row, i in enumerate(chunk):
        h, w = images[i].shape[:2]
        out[i] = result[row, :h, :w]
  return out

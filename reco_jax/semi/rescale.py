"""Random rescale, pad and crop of the pseudo-labelled batch before mixing (reference ReCo).

The reference rescales every unlabelled image with its pseudo-label and confidence after
pseudo-labelling and before mixing (`batch_transform(..., scale_size, apply_augmentation=False)`),
per sample and in this order:

1. draw a factor s uniformly from the dataset's scale range and resize the H x W image to
   floor(H * s) x floor(W * s): the image with PIL's bilinear filter (half-pixel centres,
   widened to antialias when shrinking), label and confidence with PIL's nearest rule;
2. where the result is smaller than the crop, pad it at the right and the bottom only: the
   image by reflection (numpy's 'reflect', edge not repeated, repeated as often as needed),
   the label with void and the confidence with 0;
3. crop the crop size at an offset drawn uniformly over all positions inside the padded image.

Here the three steps are one resampling with fixed shapes. Per axis, output pixel i lies at
i + offset in the padded image; reflection maps that to a pixel r of the rescaled image, whose
source is known in closed form: PIL's nearest pixel floor((r + 0.5) * in / out) (one lower
where PIL's floating-point accumulation of that position rounds down), or PIL's
bilinear weights max(0, 1 - |j + 0.5 - c| / f) around c = (r + 0.5) * in / out, normalised over
the source pixels j that exist, with f = max(in / out, 1). That is PIL's antialiased bilinear
exactly (a fixed 2x2 bilinear would alias on downscale), without the 8-bit rounding PIL applies
between and after its two passes. The filter covers fewer than 2f + 1 source pixels, and the
scale range bounds f, so each axis is a fixed number of gathered taps summed in a fixed order:
elementwise work, cheaper than a [crop, in] matmul per sample and giving the same bits however
the batch is sharded (a batched matmul does not, and a one-ulp change can move max-pooling
gradients where reflection creates ties).

Unlike the reference, nothing is quantised to 8 bits: it rounds the image and truncates the
confidence to multiples of 1/255 on the way through PIL (which moves its 0.97 and 0.7
thresholds to about 0.9725 and 0.702). Interpolation and reflection commute with the
per-channel ImageNet normalisation, so normalised images are resampled directly.
"""
from collections.abc import Sequence
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class ScaleCrop(NamedTuple):
  """Per-sample parameters of a rescale and crop.

  scale: float32 [B], the drawn factor. resized: int32 [B, 2], (height, width) after the
  rescale. offset: int32 [B, 2], (top, left) of the crop in the padded image.
  """
  scale: jax.Array
  resized: jax.Array
  offset: jax.Array


def _check_scale_range(scale_range) -> tuple[float, float]:
  try:
    low, high = (float(s) for s in scale_range)
  except (TypeError, ValueError):
    raise ValueError(f'scale_range must be (low, high) floats, got {scale_range!r}.') from None
  if not 0 < low <= high:
    raise ValueError(f'scale_range must be (low, high) with 0 < low <= high, got '
                     f'{(low, high)}; use (1.0, 1.0) for no rescale.')
  return low, high


def _check_size(size, name) -> tuple[int, int]:
  try:
    size = tuple(int(s) for s in size)
  except (TypeError, ValueError):
    raise ValueError(f'{name} must be (height, width) ints, got {size!r}.') from None
  if len(size) != 2 or min(size) < 1:
    raise ValueError(f'{name} must be two positive ints (height, width), got {size}.')
  return size


def _max_resized(in_size: tuple[int, int], high: float) -> tuple[int, int]:
  """A bound on floor(size * s) for s < high, with room for float32 rounding."""
  return tuple(math.floor(n * high) + 1 for n in in_size)


def _min_resized(in_size: tuple[int, int], low: float) -> tuple[int, int]:
  """A bound below floor(size * s) for s >= low, with room for float32 rounding."""
  return tuple(max(math.floor(n * low) - 1, 1) for n in in_size)


def sample_scale_crop(key: jax.Array, batch: int, in_size: Sequence[int], *,
                      scale_range: tuple[float, float],
                      crop_size: Sequence[int]) -> ScaleCrop:
  """Draws each sample's scale factor and crop offset.

  Args:
    key: typed PRNG key.
    batch: B.
    in_size: (H, W) of the input images.
    scale_range: (low, high), 0 < low <= high; s is uniform in [low, high).
    crop_size: (crop_h, crop_w) of the output.

  Returns:
    ScaleCrop: resized = floor((H, W) * s) like the reference's int(size * s), and an
    offset uniform over {0, ..., max(resized, crop) - crop} per axis.
  """
  low, high = _check_scale_range(scale_range)
  in_size = _check_size(in_size, 'in_size')
  min_resized = jnp.asarray(_min_resized(in_size, low), jnp.int32)
  max_resized = jnp.asarray(_max_resized(in_size, high), jnp.int32)
  in_size = jnp.asarray(in_size, jnp.float32)
  crop = jnp.asarray(_check_size(crop_size, 'crop_size'), jnp.int32)
  k_scale, k_offset = jax.random.split(key)
  scale = jax.random.uniform(k_scale, (batch,), jnp.float32, low, high)
  resized = jnp.floor(in_size[None, :] * scale[:, None]).astype(jnp.int32)
  # A no-op but for float32 rounding; the resampling relies on these bounds.
  resized = jnp.clip(resized, min_resized[None, :], max_resized[None, :])
  padded = jnp.maximum(resized, crop[None, :])
  offset = jax.random.randint(k_offset, (batch, 2), 0, padded - crop[None, :] + 1, jnp.int32)
  return ScaleCrop(scale=scale, resized=resized, offset=offset)


def _rescaled_index(resized: jax.Array, offset: jax.Array, crop: int):
  """Pixel of the rescaled image each output pixel shows, along one axis.

  resized, offset: int32 [B]. Returns (index int32 [B, crop], inside bool [B, crop]); inside
  is False in the padding, where index is the reflected pixel (numpy 'reflect': period
  2 * (n - 1), and a single pixel repeats).
  """
  padded_pos = offset[:, None] + jnp.arange(crop, dtype=jnp.int32)[None, :]
  n = resized[:, None]
  inside = padded_pos < n
  period = jnp.maximum(2 * (n - 1), 1)
  folded = padded_pos % period
  index = jnp.where(folded < n, folded, period - folded)
  return index.astype(jnp.int32), inside


@functools.lru_cache(maxsize=32)
def _pil_nearest_exceptions(in_size: int, max_out: int) -> np.ndarray:
  """Sorted int32 keys out * (max_out + 1) + r where PIL's NEAREST picks one pixel lower.

  PIL finds the source of output pixel r as floor(x_r) with x_0 = in / out / 2 and
  x_{r+1} = x_r + in / out accumulated in double precision. Where (r + 0.5) * in / out is an
  exact integer (only possible for an even input size) the accumulated rounding can fall
  just below it; elsewhere the value is at least 1 / (2 out) away from an integer and the
  exact floor agrees. Simulating PIL's sum on the host for every possible output size gives
  the few exceptions (none for odd sizes, 1617 for 512 -> up to 768).
  """
  keys = []
  for out in range(1, max_out + 1):
    step = np.full((out,), in_size / out, np.float64)
    step[0] = in_size / out * 0.5
    pil = np.floor(np.add.accumulate(step)).astype(np.int64)
    exact = ((2 * np.arange(out) + 1) * in_size) // (2 * out)
    lower = np.nonzero(pil < exact)[0]
    keys.extend(out * (max_out + 1) + lower)
  return np.asarray(sorted(keys), np.int32)


def _nearest_source(index: jax.Array, resized: jax.Array, in_size: int,
                    max_out: int) -> jax.Array:
  """PIL's NEAREST source pixel of each rescaled pixel `index` (int32 [B, crop]).

  resized: int32 [B], at most max_out. The exact floor((r + 0.5) * in / out) in integer
  arithmetic, lowered by one where PIL's accumulated floating-point position is.
  """
  out = resized[:, None]
  src = ((2 * index + 1) * in_size) // (2 * out)
  exceptions = _pil_nearest_exceptions(in_size, max_out)
  if exceptions.size:
    query = out * (max_out + 1) + index
    table = jnp.asarray(exceptions)
    pos = jnp.clip(jnp.searchsorted(table, query), 0, table.size - 1)
    src = src - (table[pos] == query).astype(src.dtype)
  return jnp.minimum(src, in_size - 1)


def _bilinear_taps(index: jax.Array, resized: jax.Array, in_size: int,
                   min_out: int) -> tuple[list[jax.Array], list[jax.Array]]:
  """PIL's BILINEAR source pixels and weights of each rescaled pixel `index` (int32 [B, crop]).

  resized: int32 [B], at least min_out. The triangle filter is widened by f = in / out when
  shrinking (PIL's antialiasing) and normalised over the source pixels that exist, which is
  how PIL treats the border. Returns (sources, weights): lists of int32 and float32
  [B, crop] arrays, one per tap, weights summing to 1 over the taps.
  """
  num_taps = math.ceil(2 * max(in_size / min_out, 1.0)) + 1
  out = resized[:, None]
  # In units of 1 / (2 out) source pixels, the centre (r + 0.5) * in / out is (2r + 1) * in
  # and the filter's half-width f is d = 2 max(in, out): the weight of pixel j is
  # max(0, d - |(2j + 1) out - (2r + 1) in|) / d. Integers keep every weight exact up to
  # the one final division, so the result does not depend on how XLA fuses the arithmetic.
  centre = (2 * index + 1) * in_size
  half_width = 2 * jnp.maximum(out, in_size)
  # The first pixel with (2j + 1) out > centre - half_width.
  first = (centre - half_width) // (2 * out)
  first = jnp.where((2 * first + 1) * out > centre - half_width, first, first + 1)
  sources, weights = [], []
  for k in range(num_taps):
    j = first + k
    w = jnp.maximum(0, half_width - jnp.abs((2 * j + 1) * out - centre))
    weights.append(jnp.where((j >= 0) & (j < in_size), w, 0))
    sources.append(jnp.clip(j, 0, in_size - 1))
  # The nearest pixel centre is within half a pixel of the centre, so the total is positive.
  total = functools.reduce(jnp.add, weights).astype(jnp.float32)
  return sources, [w.astype(jnp.float32) / total for w in weights]


def _resample_axis(x: jax.Array, sources: list[jax.Array], weights: list[jax.Array],
                   axis: int) -> jax.Array:
  """sum_k weights[k] * x gathered at sources[k] along `axis` (1 or 2) of x [B, H, W, C]."""
  take = jax.vmap(lambda x, i: jnp.take(x, i, axis=axis - 1))
  shape = [-1, 1, 1, 1]
  shape[axis] = sources[0].shape[1]
  out = None
  for src, w in zip(sources, weights):
    term = w.reshape(shape) * take(x, src)
    out = term if out is None else out + term
  return out


def scale_crop(images: jax.Array, labels: jax.Array, confidence: jax.Array,
               params: ScaleCrop, *, scale_range: tuple[float, float],
               crop_size: Sequence[int],
               ignore_label: int = 255) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Rescales, pads and crops each sample with the given parameters (see module docstring).

  Args:
    images: [B, H, W, C] float (ImageNet-normalised; any values).
    labels: [B, H, W] int.
    confidence: [B, H, W] float.
    params: ScaleCrop from `sample_scale_crop` for the same B, (H, W), scale_range and
      crop_size.
    scale_range: (low, high), static: bounds the rescaled sizes.
    crop_size: (crop_h, crop_w), static.
    ignore_label: label of the padding.

  Returns:
    images [B, crop_h, crop_w, C], labels and confidence [B, crop_h, crop_w], with the input
    dtypes; padding has label `ignore_label` and confidence 0.
  """
  crop_h, crop_w = _check_size(crop_size, 'crop_size')
  _, in_h, in_w = labels.shape
  low, high = _check_scale_range(scale_range)
  min_resized = _min_resized((in_h, in_w), low)
  max_resized = _max_resized((in_h, in_w), high)
  rows, rows_inside = _rescaled_index(params.resized[:, 0], params.offset[:, 0], crop_h)
  cols, cols_inside = _rescaled_index(params.resized[:, 1], params.offset[:, 1], crop_w)

  src_rows = _nearest_source(rows, params.resized[:, 0], in_h, max_out=max_resized[0])
  src_cols = _nearest_source(cols, params.resized[:, 1], in_w, max_out=max_resized[1])
  gather = jax.vmap(lambda x, r, c: x[r[:, None], c[None, :]])
  inside = rows_inside[:, :, None] & cols_inside[:, None, :]
  out_labels = jnp.where(inside, gather(labels, src_rows, src_cols),
                         jnp.asarray(ignore_label, labels.dtype))
  out_confidence = jnp.where(inside, gather(confidence, src_rows, src_cols),
                             jnp.zeros((), confidence.dtype))

  taps_h = _bilinear_taps(rows, params.resized[:, 0], in_h, min_resized[0])
  taps_w = _bilinear_taps(cols, params.resized[:, 1], in_w, min_resized[1])
  out = _resample_axis(images.astype(jnp.float32), *taps_h, axis=1)
  out = _resample_axis(out, *taps_w, axis=2)
  return out.astype(images.dtype), out_labels, out_confidence


def random_scale_crop(key: jax.Array, images: jax.Array, labels: jax.Array,
                      confidence: jax.Array, *, scale_range: tuple[float, float],
                      crop_size: Sequence[int] | None = None,
                      ignore_label: int = 255) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-sample random rescale, pad and crop of (image, label, confidence), as the reference.

  Args:
    key: typed PRNG key.
    images: [B, H, W, C] float, ImageNet-normalised.
    labels: [B, H, W] int (pseudo-)labels.
    confidence: [B, H, W] float pseudo-label confidence.
    scale_range: (low, high) rescale factor range, static (e.g. config.scale_range).
    crop_size: (crop_h, crop_w), static; None keeps (H, W).
    ignore_label: label of padded pixels (void).

  Returns:
    (images [B, crop_h, crop_w, C], labels, confidence [B, crop_h, crop_w]) with the input
    dtypes. scale_range (1, 1) with the input size as crop returns the inputs unchanged.
  """
  if images.ndim != 4 or images.shape[:3] != labels.shape or confidence.shape != labels.shape:
    raise ValueError(f'random_scale_crop: expected images [B, H, W, C], labels and confidence '
                     f'[B, H, W], got {images.shape}, {labels.shape}, {confidence.shape}.')
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(f'random_scale_crop: images must be floating, got {images.dtype}.')
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f'random_scale_crop: labels must be integers, got {labels.dtype}.')
  batch, height, width = labels.shape
  crop_size = (height, width) if crop_size is None else _check_size(crop_size, 'crop_size')
  if _check_scale_range(scale_range) == (1.0, 1.0) and crop_size == (height, width):
    return images, labels, confidence
  params = sample_scale_crop(key, batch, (height, width), scale_range=scale_range,
                             crop_size=crop_size)
  return scale_crop(images, labels, confidence, params, scale_range=scale_range,
                    crop_size=crop_size, ignore_label=ignore_label)

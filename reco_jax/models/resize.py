"""Resizing with PyTorch's `F.interpolate` semantics (NHWC).

`jax.image.resize` follows the half-pixel (align_corners=False) convention; the reference
decoder and the logits upsampling use align_corners=True, and labels are brought to the
representation size with PyTorch's 'nearest' rule. Both are done here exactly, with index
tables computed at trace time (sizes are static).
"""
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _check_size(size: Sequence[int]) -> tuple[int, int]:
  size = tuple(int(s) for s in size)
  if len(size) != 2 or min(size) < 1:
    raise ValueError(f'size must be two positive ints (height, width), got {size}.')
  return size


def _align_corners_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] float32 linear-interpolation weights, align_corners=True."""
  if out_size == 1:
    # PyTorch samples the first input pixel when the output has a single pixel.
    src = np.zeros((1,), np.float64)
  else:
    src = np.arange(out_size, dtype=np.float64) * ((in_size - 1) / (out_size - 1))
  lo = np.clip(np.floor(src).astype(np.int64), 0, in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  matrix = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(matrix, (rows, lo), 1.0 - frac)
  np.add.at(matrix, (rows, hi), frac)
  return matrix.astype(np.float32)


def bilinear_align_corners(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Bilinear resize with `align_corners=True`, like `F.interpolate(..., align_corners=True)`.

  Args:
    x: [B, h, w, C] floating array.
    size: (H, W) output size.

  Returns:
    [B, H, W, C] array of x's dtype.
  """
  if x.ndim != 4:
    raise ValueError(f'bilinear_align_corners expects [B, h, w, C], got shape {x.shape}.')
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f'bilinear_align_corners expects a floating array, got {x.dtype}; '
                    'resize labels with `nearest`, or cast images to float first.')
  out_h, out_w = _check_size(size)
  _, in_h, in_w, _ = x.shape
  if (in_h, in_w) == (out_h, out_w):
    return x
  mh = jnp.asarray(_align_corners_matrix(in_h, out_h))
  mw = jnp.asarray(_align_corners_matrix(in_w, out_w))
  # Interpolation weights stay float32 so that bf16 inputs only lose precision once.
  hp = jax.lax.Precision.HIGHEST
  y = jnp.einsum('Hh,bhwc->bHwc', mh, x, precision=hp, preferred_element_type=jnp.float32)
  y = jnp.einsum('Ww,bhwc->bhWc', mw, y, precision=hp, preferred_element_type=jnp.float32)
  return y.astype(x.dtype)


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source indices of PyTorch's 'nearest' mode: floor(dst * (in / out)) in float32."""
  dst = np.arange(out_size, dtype=np.int64)
  if out_size == in_size:
    return dst
  if out_size == 2 * in_size:
    return dst >> 1
  # PyTorch computes the scale and the product in float32; doing the same keeps the rare
  # sizes where float32 rounding moves an index in agreement with the reference.
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.floor(dst.astype(np.float32) * scale).astype(np.int64)
  return np.minimum(src, in_size - 1)


def nearest(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Nearest-neighbour resize like `F.interpolate(mode='nearest')` (labels, masks).

  Args:
    x: [B, h, w] or [B, h, w, C] array of any dtype.
    size: (H, W) output size.

  Returns:
    [B, H, W] or [B, H, W, C] array of x's dtype; values are copied, never mixed.
  """
  if x.ndim not in (3, 4):
    raise ValueError(f'nearest expects [B, h, w] or [B, h, w, C], got shape {x.shape}.')
  out_h, out_w = _check_size(size)
  in_h, in_w = x.shape[1], x.shape[2]
  if (in_h, in_w) == (out_h, out_w):
    return x
  rows = jnp.asarray(_nearest_indices(in_h, out_h))
  cols = jnp.asarray(_nearest_indices(in_w, out_w))
  return jnp.take(jnp.take(x, rows, axis=1), cols, axis=2)


def _nearest_align_corners_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source indices of TF's resize_nearest_neighbor(align_corners=True): the source pixel
  nearest to the position i (in - 1) / (out - 1) that bilinear align_corners samples, halves
  rounded away from zero (C's roundf), the scale and product in float32 as TF computes them."""
  dst = np.arange(out_size, dtype=np.float32)
  if out_size == 1:
    return np.zeros(1, np.int64)
  scale = np.float32(in_size - 1) / np.float32(out_size - 1)
  position = dst * scale
  whole = np.floor(position)  # positions are >= 0; position - whole is exact in float32
  src = (whole + (position - whole >= np.float32(0.5))).astype(np.int64)
  return np.minimum(src, in_size - 1)


def nearest_align_corners(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Nearest-neighbour resize on the align_corners grid (TF's
  `resize_nearest_neighbor(..., align_corners=True)`): output pixel i takes the source pixel
  nearest to where `bilinear_align_corners` samples it, so labels resized with it land on the
  features resized with that.

  x: [B, h, w] or [B, h, w, C] of any dtype; size: (H, W). Returns x's dtype, values copied.
  """
  if x.ndim not in (3, 4):
    raise ValueError(f'nearest_align_corners expects [B, h, w] or [B, h, w, C], got shape '
                     f'{x.shape}.')
  out_h, out_w = _check_size(size)
  rows = jnp.asarray(_nearest_align_corners_indices(x.shape[1], out_h))
  cols = jnp.asarray(_nearest_align_corners_indices(x.shape[2], out_w))
  return jnp.take(jnp.take(x, rows, axis=1), cols, axis=2)

"""Random rescale, pad and crop of the pseudo-labelled batch (reference `batch_transform`)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from reco_jax import parallel
from reco_jax.semi import rescale

B, H, W = 6, 24, 20
# Everything runs jitted: op-by-op execution compiles each small op and is much slower here.
scale_crop = jax.jit(rescale.scale_crop, static_argnames=('scale_range', 'crop_size',
                                                          'ignore_label'))
random_scale_crop = jax.jit(rescale.random_scale_crop,
                            static_argnames=('scale_range', 'crop_size', 'ignore_label'))
sample_scale_crop = jax.jit(rescale.sample_scale_crop,
                            static_argnames=('batch', 'in_size', 'scale_range', 'crop_size'))


def random_inputs(seed=0, batch=B, height=H, width=W):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, height, width, 3)).astype(np.float32)
  labels = rng.integers(0, 5, (batch, height, width)).astype(np.int32)
  confidence = rng.uniform(0.1, 1.0, (batch, height, width)).astype(np.float32)
  return images, labels, confidence


def reference_transform(image, label, conf, resized, offset, crop):
  """The reference's steps with PIL and numpy: resize, pad right/bottom, crop."""
  rh, rw = (int(v) for v in resized)
  # Float ('F') PIL images resample with the same filters as 8-bit ones, without rounding.
  image = np.stack([np.asarray(Image.fromarray(image[..., c]).resize((rw, rh), Image.BILINEAR))
                    for c in range(image.shape[-1])], -1)
  label = np.asarray(Image.fromarray(label.astype(np.uint8)).resize((rw, rh), Image.NEAREST))
  conf = np.asarray(Image.fromarray(conf).resize((rw, rh), Image.NEAREST))
  pad = ((0, max(crop[0] - rh, 0)), (0, max(crop[1] - rw, 0)))
  image = np.pad(image, pad + ((0, 0),), mode='reflect')
  label = np.pad(label.astype(np.int32), pad, constant_values=255)
  conf = np.pad(conf, pad, constant_values=0)
  y, x = (int(v) for v in offset)
  window = (slice(y, y + crop[0]), slice(x, x + crop[1]))
  return image[window], label[window], conf[window]


@pytest.mark.parametrize('crop', [(H, W), (30, 14)])
def test_matches_pil_resize_reflect_pad_and_crop(crop):
  images, labels, conf = random_inputs()
  key = jax.random.key(3)
  out = random_scale_crop(key, images, labels, conf, scale_range=(0.4, 1.6), crop_size=crop)
  # The same key draws the same parameters.
  params = sample_scale_crop(key, B, (H, W), scale_range=(0.4, 1.6), crop_size=crop)
  resized, offset = np.asarray(params.resized), np.asarray(params.offset)
  # The draws cover shrinking (with reflection beyond one period) and enlarging.
  assert resized[:, 0].min() < crop[0] // 2 and resized[:, 0].max() > crop[0]
  for b in range(B):
    want = reference_transform(images[b], labels[b], conf[b], resized[b], offset[b], crop)
    np.testing.assert_allclose(np.asarray(out[0][b]), want[0], atol=2e-5)
    np.testing.assert_array_equal(np.asarray(out[1][b]), want[1])
    np.testing.assert_array_equal(np.asarray(out[2][b]), want[2])


def test_every_rescaled_size_matches_pil():
  """All heights 11..36 from 24 rows, including those where PIL's NEAREST rounds down."""
  sizes = np.arange(11, 37)
  batch = sizes.size
  images, labels, conf = random_inputs(seed=1, batch=batch)
  labels = np.broadcast_to(np.arange(H, dtype=np.int32)[None, :, None], (batch, H, W))
  params = rescale.ScaleCrop(
      scale=jnp.asarray(sizes / H, jnp.float32),
      resized=jnp.asarray(np.stack([sizes, np.full_like(sizes, W)], -1), jnp.int32),
      offset=jnp.zeros((batch, 2), jnp.int32))
  crop = (H, W)
  out = scale_crop(images, labels, conf, params, scale_range=(0.5, 1.5), crop_size=crop)
  for b, size in enumerate(sizes):
    want = reference_transform(images[b], labels[b], conf[b], (size, W), (0, 0), crop)
    np.testing.assert_allclose(np.asarray(out[0][b]), want[0], atol=2e-5)
    np.testing.assert_array_equal(np.asarray(out[1][b]), want[1], err_msg=f'height {size}')
    np.testing.assert_array_equal(np.asarray(out[2][b]), want[2])


def test_scale_one_is_the_identity():
  images, labels, conf = random_inputs()
  key = jax.random.key(1)
  same = random_scale_crop(key, images, labels, conf, scale_range=(1.0, 1.0))
  # A range that only contains factors rounding to the input size takes the general path.
  general = random_scale_crop(key, images, labels, conf, scale_range=(1.0, 1.0 + 1e-6),
                              crop_size=(H, W))
  for out in (same, general):
    np.testing.assert_array_equal(np.asarray(out[0]), images)
    np.testing.assert_array_equal(np.asarray(out[1]), labels)
    np.testing.assert_array_equal(np.asarray(out[2]), conf)


def test_constant_class_keeps_its_label_and_padding_is_void():
  _, _, conf = random_inputs()
  images = np.full((B, H, W, 3), -1.5, np.float32)
  labels = np.full((B, H, W), 3, np.int32)
  crop = (H, W)
  params = sample_scale_crop(jax.random.key(2), B, (H, W), scale_range=(0.4, 0.9),
                             crop_size=crop)
  out = scale_crop(images, labels, conf, params, scale_range=(0.4, 0.9), crop_size=crop)
  out_images, out_labels, out_conf = (np.asarray(x) for x in out)
  resized, offset = np.asarray(params.resized), np.asarray(params.offset)
  rows = np.arange(crop[0])[None, :, None] + offset[:, 0, None, None]
  cols = np.arange(crop[1])[None, None, :] + offset[:, 1, None, None]
  padding = (rows >= resized[:, 0, None, None]) | (cols >= resized[:, 1, None, None])
  assert padding.any() and (~padding).any()
  np.testing.assert_array_equal(out_labels, np.where(padding, 255, 3))
  assert np.all(out_conf[padding] == 0) and np.all(out_conf[~padding] >= 0.1)
  # The image is reflected into the padding, not filled: a constant stays constant.
  np.testing.assert_allclose(out_images, -1.5, rtol=1e-6)


def test_image_and_label_stay_aligned():
  """Images encode their pixel coordinates; the label map names its source pixel."""
  height, width = 40, 36
  rr, cc = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
  images = np.stack([rr, cc, np.zeros_like(rr)], -1).astype(np.float32)[None].repeat(B, 0)
  labels = (rr * width + cc).astype(np.int32)[None].repeat(B, 0)
  conf = np.ones((B, height, width), np.float32)
  crop = (32, 28)
  params = sample_scale_crop(jax.random.key(3), B, (height, width), scale_range=(0.5, 1.5),
                             crop_size=crop)
  out = scale_crop(images, labels, conf, params, scale_range=(0.5, 1.5), crop_size=crop,
                   ignore_label=-1)
  out_images, out_labels, _ = (np.asarray(x) for x in out)
  inside = out_labels >= 0
  src_rows, src_cols = out_labels // width, out_labels % width
  # Nearest and bilinear sample the same footprint: at most one source pixel apart.
  assert np.abs(out_images[..., 0] - src_rows)[inside].max() <= 1.0
  assert np.abs(out_images[..., 1] - src_cols)[inside].max() <= 1.0
  # Away from the borders the image ramps by in / out per output pixel: the drawn scale (a
  # size one pixel off would change the slope by 2% or more).
  resized = np.asarray(params.resized)
  for b in range(B):
    rows = np.nonzero(inside[b, :, 0])[0][3:-3]
    cols = np.nonzero(inside[b, 0, :])[0][3:-3]
    slope_y = np.polyfit(rows, out_images[b, rows, 0, 0], 1)[0]
    slope_x = np.polyfit(cols, out_images[b, 0, cols, 1], 1)[0]
    assert slope_y == pytest.approx(height / resized[b, 0], rel=5e-3)
    assert slope_x == pytest.approx(width / resized[b, 1], rel=5e-3)


def test_scale_and_offset_distribution():
  low, high = 0.5, 1.5
  crop = (321, 321)
  params = sample_scale_crop(jax.random.key(4), 4096, (321, 400), scale_range=(low, high),
                             crop_size=crop)
  scale, resized, offset = (np.asarray(x) for x in params)
  assert scale.min() >= low and scale.max() < high
  assert scale.min() < low + 0.01 and scale.max() > high - 0.01
  assert scale.mean() == pytest.approx((low + high) / 2, abs=0.02)
  assert np.histogram(scale, bins=4, range=(low, high))[0].min() > 900  # roughly uniform
  np.testing.assert_array_equal(resized, np.floor(np.float32([321, 400]) * scale[:, None]))
  max_offset = np.maximum(resized, crop) - crop
  assert np.all(offset >= 0) and np.all(offset <= max_offset)
  # Offsets reach both ends of their range, and no offset where there is nothing to crop.
  assert np.any((offset == max_offset) & (max_offset > 0))
  assert np.all(offset[max_offset == 0] == 0)
  big = max_offset[:, 0] > 100
  assert offset[big, 0].mean() / max_offset[big, 0].mean() == pytest.approx(0.5, abs=0.05)


def test_shapes_and_dtypes_are_kept():
  images, labels, conf = random_inputs(seed=5)
  key = jax.random.key(6)
  out = random_scale_crop(key, images.astype(jnp.bfloat16), labels.astype(jnp.uint8), conf,
                          scale_range=(0.5, 1.5), crop_size=(16, 22))
  assert [x.shape for x in out] == [(B, 16, 22, 3), (B, 16, 22), (B, 16, 22)]
  assert [x.dtype for x in out] == [jnp.bfloat16, jnp.uint8, jnp.float32]
  # Each sample draws its own scale.
  assert len(set(np.asarray(jnp.sum(out[1] == 255, axis=(1, 2))).tolist())) > 1


def test_sharded_batch_gives_the_global_result():
  images, labels, conf = random_inputs(seed=7, batch=8)
  fn = functools.partial(random_scale_crop, scale_range=(0.5, 1.5))
  key = jax.random.key(8)
  mesh = parallel.make_mesh(jax.devices()[:4])
  sharded = parallel.shard_batch(mesh, {'i': images, 'l': labels, 'c': conf})
  one = fn(key, images, labels, conf)
  four = fn(key, sharded['i'], sharded['l'], sharded['c'])
  for a, b in zip(one, four):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize('kwargs,error', [
    (dict(scale_range=(0.0, 1.0)), '0 < low <= high'),
    (dict(scale_range=(1.5, 0.5)), '0 < low <= high'),
    (dict(scale_range=(0.5, 1.5), crop_size=(0, 4)), 'crop_size'),
])
def test_bad_arguments_raise(kwargs, error):
  images, labels, conf = random_inputs(batch=2)
  with pytest.raises(ValueError, match=error):
    rescale.random_scale_crop(jax.random.key(0), images, labels, conf, **kwargs)


def test_bad_shapes_and_dtypes_raise():
  images, labels, conf = random_inputs(batch=2)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match=r'labels and confidence \[B, H, W\]'):
    rescale.random_scale_crop(key, images, labels[:, :-1], conf, scale_range=(0.5, 1.5))
  with pytest.raises(TypeError, match='labels must be integers'):
    rescale.random_scale_crop(key, images, conf, conf, scale_range=(0.5, 1.5))

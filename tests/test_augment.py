"""Strong augmentation against torchvision's float-tensor formulas in NumPy."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reco_jax import normalization
from reco_jax.semi import augment


# ---- torchvision.transforms.functional_tensor, written out in NumPy. ----
def _np_grey(img):
  # PIL's convert('L') (ITU-R 601-2), which the reference's PIL-image ColorJitter uses.
  return (0.299 * img[..., 0] + 0.587 * img[..., 1]
          + 0.114 * img[..., 2])[..., None]


def _np_blend(img1, img2, ratio):
  return np.clip(ratio * img1 + (1.0 - ratio) * img2, 0.0, 1.0)


def _np_brightness(img, f):
  return _np_blend(img, np.zeros_like(img), f)


def _np_contrast(img, f):
  return _np_blend(img, _np_grey(img).mean(), f)


def _np_saturation(img, f):
  return _np_blend(img, _np_grey(img), f)


def _np_rgb2hsv(img):
  r, g, b = img[..., 0], img[..., 1], img[..., 2]
  maxc, minc = img.max(-1), img.min(-1)
  eqc = maxc == minc
  cr = maxc - minc
  s = cr / np.where(eqc, 1.0, maxc)
  cr_div = np.where(eqc, 1.0, cr)
  rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
  hr = (maxc == r) * (bc - gc)
  hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
  hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
  h = np.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
  return h, s, maxc


def _np_hsv2rgb(h, s, v):
  i = np.floor(h * 6.0)
  f = h * 6.0 - i
  i = i.astype(np.int64) % 6
  p = np.clip(v * (1.0 - s), 0.0, 1.0)
  q = np.clip(v * (1.0 - s * f), 0.0, 1.0)
  t = np.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
  a1 = np.stack([v, q, p, p, t, v])
  a2 = np.stack([t, v, v, q, p, p])
  a3 = np.stack([p, p, t, v, v, q])
  pick = lambda a: np.take_along_axis(a, i[None], 0)[0]
  return np.stack([pick(a1), pick(a2), pick(a3)], -1)


def _np_hue(img, shift):
  h, s, v = _np_rgb2hsv(img)
  return _np_hsv2rgb((h + shift) % 1.0, s, v)


_NP_OPS = (_np_brightness, _np_contrast, _np_saturation, _np_hue)


def _image(seed, h=5, w=6):
  img = np.random.default_rng(seed).uniform(size=(h, w, 3))
  img[0, 0] = [0.5, 0.5, 0.5]  # grey: hue undefined, saturation 0
  img[0, 1] = [1.0, 0.2, 0.2]  # red is the maximum
  img[0, 2] = [0.3, 0.9, 0.9]  # green and blue tie for the maximum
  img[0, 3] = [0.0, 0.0, 0.0]
  return img.astype(np.float32)


def test_colour_ops_match_hand_computed_pixel():
  px = np.asarray([[[0.6, 0.9, 0.2]]], np.float32)
  # brightness 1.25: 0.75, 1.125 -> clipped 1.0, 0.25.
  np.testing.assert_allclose(augment.adjust_brightness(px, 1.25),
                             [[[0.75, 1.0, 0.25]]], atol=1e-6)
  # Grey = 0.299*0.6 + 0.587*0.9 + 0.114*0.2 = 0.7305; a single pixel is its
  # own mean, so contrast and saturation both blend with it.
  grey = 0.7305
  expected = np.clip(0.8 * np.array([0.6, 0.9, 0.2]) + 0.2 * grey, 0, 1)
  np.testing.assert_allclose(augment.adjust_contrast(px, 0.8), [[expected]],
                             atol=1e-6)
  np.testing.assert_allclose(augment.adjust_saturation(px, 0.8), [[expected]],
                             atol=1e-6)
  # HSV of (0.6, 0.9, 0.2): v 0.9, s 0.7/0.9, h = (2 + (0.2-0.6)/0.7)/6.
  # Shifting the hue by 1/3 moves green's sector to blue's: (0.2, 0.6, 0.9).
  np.testing.assert_allclose(augment.adjust_hue(px, 1.0 / 3.0),
                             [[[0.2, 0.6, 0.9]]], atol=1e-5)


@pytest.mark.parametrize('op,np_op,factor', [
    (augment.adjust_brightness, _np_brightness, 1.2),
    (augment.adjust_brightness, _np_brightness, 0.75),
    (augment.adjust_contrast, _np_contrast, 1.25),
    (augment.adjust_contrast, _np_contrast, 0.8),
    (augment.adjust_saturation, _np_saturation, 1.25),
    (augment.adjust_saturation, _np_saturation, 0.75),
    (augment.adjust_hue, _np_hue, 0.23),
    (augment.adjust_hue, _np_hue, -0.25),
])
def test_colour_op_matches_the_pil_image_formula(op, np_op, factor):
  img = _image(0)
  expected = np_op(img.astype(np.float64), factor)
  np.testing.assert_allclose(jax.jit(op)(img, factor), expected, atol=2e-5)


def test_colour_jitter_applies_ops_in_given_order():
  img = _image(1)
  factors = (1.2, 0.8, 1.25, 0.2)
  results = []
  for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]):
    expected = img.astype(np.float64)
    for op in order:
      expected = _NP_OPS[op](expected, factors[op])
    got = jax.jit(augment.color_jitter)(jnp.asarray(img),
                                        jnp.asarray(order), *factors)
    np.testing.assert_allclose(got, expected, atol=3e-5)
    results.append(np.asarray(got))
  assert np.abs(results[0] - results[1]).max() > 1e-3


def _np_blur(img, sigma, radius=4):
  x = np.arange(-radius, radius + 1)
  k = np.exp(-x**2 / (2 * sigma**2))
  k /= k.sum()
  padded = np.pad(img.astype(np.float64), ((radius,) * 2, (radius,) * 2,
                                           (0, 0)), mode='symmetric')
  out = np.zeros_like(img, np.float64)
  h, w = img.shape[:2]
  for dy in range(2 * radius + 1):
    for dx in range(2 * radius + 1):
      out += k[dy] * k[dx] * padded[dy:dy + h, dx:dx + w]
  return out


_blur = jax.jit(augment.gaussian_blur)


def test_blur_matches_gaussian_and_keeps_constant_image_and_mean():
  img = _image(2, 12, 10)
  for sigma in (0.15, 0.7, 1.15):
    got = np.asarray(_blur(img, sigma))
    np.testing.assert_allclose(got, _np_blur(img, sigma), atol=1e-5)
    np.testing.assert_allclose(got.mean((0, 1)), img.mean((0, 1)), atol=5e-3)
  blurred = np.asarray(_blur(img, 1.15))
  assert blurred.std() < img.std() * 0.8  # it does smooth
  const = jnp.full((7, 8, 3), 0.3, jnp.float32)
  np.testing.assert_allclose(jax.jit(augment.gaussian_blur)(const, 1.0), const,
                             atol=1e-6)


# Probabilities and ranges are traced: one compilation serves every test that
# passes the same keyword arguments.
_augment = jax.jit(augment.strong_augment)
_SIGMA = (0.15, 1.15)
_N = 600  # samples per test batch (tiny images)


def _batch(seed, b, h=4, w=5):
  rng = np.random.default_rng(seed)
  x01 = rng.uniform(0.05, 0.95, size=(b, h, w, 3)).astype(np.float32)
  images = normalization.normalize(x01).astype(np.float32)
  labels = rng.integers(0, 21, size=(b, h, w)).astype(np.int32)
  conf = rng.uniform(size=(b, h, w)).astype(np.float32)
  return images, labels, conf


def _flipped(a):
  return a[:, :, ::-1]


def test_flip_moves_image_label_and_confidence_together():
  images, labels, conf = _batch(3, _N)
  out_im, out_lab, out_conf = map(np.asarray, _augment(
      jax.random.key(3), images, labels, conf, jitter_prob=0.0,
      blur_prob=0.0, flip_prob=0.5, sigma=_SIGMA))
  flipped = np.all(out_lab == _flipped(labels), axis=(1, 2))
  kept = np.all(out_lab == labels, axis=(1, 2))
  assert np.all(flipped ^ kept)
  assert 0.4 < flipped.mean() < 0.6
  np.testing.assert_array_equal(
      out_conf, np.where(flipped[:, None, None], _flipped(conf), conf))
  np.testing.assert_allclose(
      out_im, np.where(flipped[:, None, None, None], _flipped(images), images),
      atol=1e-5)


def test_op_probabilities_are_roughly_right():
  images, labels, conf = _batch(4, _N)
  x01 = normalization.denormalize(images)

  def changed(seed, **probs):
    # sigma 1: a blur with sigma near 0.15 hardly changes an image.
    out, _, _ = _augment(jax.random.key(seed), images, labels, conf,
                         sigma=(1.0, 1.0), **probs)
    diff = np.abs(normalization.denormalize(np.asarray(out)) - x01)
    return diff.max(axis=(1, 2, 3)) > 1e-4

  jitter = changed(0, jitter_prob=0.8, blur_prob=0.0, flip_prob=0.0)
  blur = changed(1, jitter_prob=0.0, blur_prob=0.5, flip_prob=0.0)
  flip = changed(2, jitter_prob=0.0, blur_prob=0.0, flip_prob=0.5)
  none = changed(3, jitter_prob=0.0, blur_prob=0.0, flip_prob=0.0)
  # Binomial(600, p) stays within +-0.065 with overwhelming probability.
  assert abs(jitter.mean() - 0.8) < 0.065
  assert abs(blur.mean() - 0.5) < 0.065
  assert abs(flip.mean() - 0.5) < 0.065
  assert not none.any()


def test_output_is_normalised_image_in_unit_range_and_keeps_dtypes():
  images, labels, conf = _batch(5, _N)
  images[0, 0, 0] = [9.0, -9.0, 0.0]  # outside normalize([0, 1]): clipped
  out_im, out_lab, out_conf = _augment(
      jax.random.key(5), images, labels, conf, jitter_prob=1.0, blur_prob=1.0,
      flip_prob=0.5, sigma=_SIGMA)
  assert out_im.dtype == jnp.float32 and out_lab.dtype == jnp.int32
  assert out_conf.dtype == jnp.float32
  x01 = normalization.denormalize(np.asarray(out_im))
  assert x01.min() >= -1e-5 and x01.max() <= 1 + 1e-5
  # Colour jitter changes pixel values but not the image statistics wildly.
  assert abs(x01.mean() - normalization.denormalize(images).clip(0, 1).mean()
             ) < 0.2
  np.testing.assert_array_equal(np.sort(np.asarray(out_lab).ravel()),
                                np.sort(labels.ravel()))


def test_strong_augment_rejects_bad_shapes():
  images, labels, conf = _batch(6, 2)
  with pytest.raises(ValueError, match='expected images'):
    augment.strong_augment(jax.random.key(0), images, labels[:, :2], conf)
  with pytest.raises(ValueError, match='odd'):
    functools.partial(augment.strong_augment, blur_kernel_size=8)(
        jax.random.key(0), images, labels, conf)

"""The tf.data and the on-device photometric augmentations are one augmentation."""
import itertools

import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from reco_jax import photometric
from reco_jax.data import image_ops
from reco_jax.semi import augment


def _image(seed, height=23, width=31):
  return np.random.default_rng(seed).random((height, width, 3)).astype(np.float32)


def test_grey_weights_are_pils():
  rgb = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
  pil = np.asarray(Image.fromarray(rgb).convert('L')).astype(np.float64)
  ours = (rgb.astype(np.float64) * photometric.GREY_WEIGHTS).sum(-1)
  # PIL rounds to 8 bits; torchvision's tensor weights (0.2989, ...) are another formula.
  assert np.abs(ours - pil).max() <= 0.5 + 1e-6


@pytest.mark.parametrize('order', [(0, 1, 2, 3), (3, 2, 1, 0), (1, 3, 0, 2), (2, 0, 3, 1)])
def test_colour_jitter_agrees_on_the_same_draws(order):
  image = _image(1)
  factors = dict(brightness=1.2, contrast=0.8, saturation=1.22, hue=0.17)
  ours = jax.jit(augment.color_jitter)(image, np.asarray(order), *factors.values())
  theirs = image_ops.colour_jitter_with(tf.constant(image), tf.constant(order),
                                       *factors.values())
  np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=2e-5)


def test_colour_jitter_contrast_and_saturation_use_the_shared_grey():
  image = _image(2)
  for op, factor in itertools.product((1, 2), (0.75, 1.25)):
    order = np.asarray([op] + [o for o in range(4) if o != op])
    args = [1.0, 1.0, 1.0, 0.0]
    args[op] = factor  # contrast or saturation
    ours = np.asarray(jax.jit(augment.color_jitter)(image, order, *args))
    theirs = image_ops.colour_jitter_with(tf.constant(image), tf.constant(order), *args).numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-5)
    # A grey image that no longer matched would move the result measurably.
    assert np.abs(ours - image).max() > 1e-3


@pytest.mark.parametrize('sigma', [0.15, 0.6, 1.15])
def test_gaussian_blur_agrees_including_the_border(sigma):
  image = _image(3)
  ours = np.asarray(jax.jit(augment.gaussian_blur)(image, sigma))
  theirs = image_ops.gaussian_blur(tf.constant(image), tf.constant(sigma, tf.float32)).numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-6)
  # Both extend the border symmetrically (edge pixel repeated), as a numpy blur does.
  radius = photometric.BLUR_RADIUS
  taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma ** 2))
  taps /= taps.sum()
  padded = np.pad(image.astype(np.float64), ((radius, radius), (radius, radius), (0, 0)),
                  mode='symmetric')
  rows = sum(w * padded[i:i + image.shape[0]] for i, w in enumerate(taps))
  want = sum(w * rows[:, i:i + image.shape[1]] for i, w in enumerate(taps))
  np.testing.assert_allclose(theirs, want, atol=1e-5)

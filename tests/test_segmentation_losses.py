"""Cross-entropy and the reference ReCo unsupervised loss against NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reco_jax.losses import segmentation

VOID = 255


def _np_pixel_ce(logits, labels):
  logits = logits.astype(np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  valid = labels != VOID
  safe = np.where(valid, labels, 0)
  picked = np.take_along_axis(log_probs, safe[..., None], -1)[..., 0]
  return np.where(valid, -picked, 0.0), valid


def _np_unsup(logits, labels, conf, threshold):
  """Literal NumPy port of the reference compute_unsupervised_loss."""
  b = logits.shape[0]
  loss, valid = _np_pixel_ce(logits, labels)
  weighting = (conf.reshape(b, -1) >= threshold).sum(-1) / valid.reshape(
      b, -1).sum(-1)
  weighted = weighting[:, None, None] * loss
  return weighted[loss > 0].mean()


def _random_inputs(seed, b=2, h=3, w=4, c=5):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(b, h, w, c)).astype(np.float32) * 2
  labels = rng.integers(0, c, size=(b, h, w)).astype(np.int32)
  labels[rng.random((b, h, w)) < 0.3] = VOID
  return logits, labels


def test_cross_entropy_matches_numpy_mean_over_non_void_pixels():
  logits, labels = _random_inputs(0)
  assert (labels == VOID).any()
  loss, valid = _np_pixel_ce(logits, labels)
  expected = loss.sum() / valid.sum()
  got = segmentation.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # Averaging over all pixels (void as zero) would be a different number.
  assert abs(loss.mean() - expected) > 1e-3


def test_cross_entropy_bf16_logits_computed_in_float32():
  logits, labels = _random_inputs(1, c=21)
  bf16 = jnp.asarray(logits, jnp.bfloat16)
  got = segmentation.cross_entropy(bf16, jnp.asarray(labels))
  assert got.dtype == jnp.float32
  loss, valid = _np_pixel_ce(np.asarray(bf16.astype(jnp.float32)), labels)
  np.testing.assert_allclose(got, loss.sum() / valid.sum(), rtol=1e-5)


def test_cross_entropy_with_no_valid_pixel_is_zero_with_finite_gradient():
  logits, _ = _random_inputs(2)
  labels = jnp.full(logits.shape[:3], VOID, jnp.int32)
  value, grad = jax.value_and_grad(segmentation.cross_entropy)(
      jnp.asarray(logits), labels)
  assert value == 0.0
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad) == 0)


def test_unsupervised_loss_matches_reference_formula():
  logits, labels = _random_inputs(3, b=3, h=4, w=5, c=4)
  rng = np.random.default_rng(3)
  conf = rng.uniform(0.9, 1.0, size=labels.shape).astype(np.float32)
  # A confident void pixel: the reference counts it in eta's numerator.
  labels[0, 0, 0] = VOID
  conf[0, 0, 0] = 0.99
  # A pixel with exactly zero loss in float32 is left out of the mean.
  logits[1, 0, 0] = [200.0, 0.0, 0.0, 0.0]
  labels[1, 0, 0] = 0
  threshold = 0.97
  expected = _np_unsup(logits, labels, conf, threshold)
  got = segmentation.unsupervised_loss(
      jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(conf),
      strong_threshold=threshold)
  np.testing.assert_allclose(got, expected, rtol=1e-5)

  # The inputs separate the reference from plausible misreadings of it.
  loss, valid = _np_pixel_ce(logits, labels)
  assert loss[1, 0, 0] == 0.0 and valid[1, 0, 0]
  eta = (conf.reshape(3, -1) >= threshold).sum(-1) / valid.reshape(3, -1).sum(
      -1)
  eta_valid_only = ((conf >= threshold) & valid).reshape(3, -1).sum(
      -1) / valid.reshape(3, -1).sum(-1)
  over_valid = (eta[:, None, None] * loss)[valid].mean()
  misread = (eta_valid_only[:, None, None] * loss)[loss > 0].mean()
  unweighted = loss[loss > 0].mean()
  for other in (over_valid, misread, unweighted):
    assert abs(other - expected) > 1e-6


def test_unsupervised_loss_is_finite_when_no_pixel_qualifies():
  logits, _ = _random_inputs(4)
  labels = jnp.full(logits.shape[:3], VOID, jnp.int32)
  conf = jnp.ones(logits.shape[:3])
  fn = jax.jit(jax.value_and_grad(
      lambda x: segmentation.unsupervised_loss(x, labels, conf)))
  value, grad = fn(jnp.asarray(logits))
  assert value == 0.0 and np.all(np.isfinite(grad))


def test_unsupervised_loss_image_weight_is_confident_fraction():
  # One valid image, 3 of its 4 pixels confident: weight 3/4 of the plain CE.
  logits = jnp.asarray(np.random.default_rng(5).normal(size=(1, 2, 2, 3)),
                       jnp.float32)
  labels = jnp.asarray([[[0, 1], [2, 0]]], jnp.int32)
  conf = jnp.asarray([[[0.99, 0.98], [0.97, 0.5]]], jnp.float32)
  got = segmentation.unsupervised_loss(logits, labels, conf)
  plain = segmentation.cross_entropy(logits, labels)
  np.testing.assert_allclose(got, 0.75 * plain, rtol=1e-6)


def test_losses_reject_mismatched_shapes_with_clear_error():
  with pytest.raises(ValueError, match='same resolution'):
    segmentation.cross_entropy(jnp.zeros((1, 4, 4, 3)),
                               jnp.zeros((1, 8, 8), jnp.int32))
  with pytest.raises(ValueError, match='confidence'):
    segmentation.unsupervised_loss(jnp.zeros((1, 4, 4, 3)),
                                   jnp.zeros((1, 4, 4), jnp.int32),
                                   jnp.zeros((1, 4, 3)))

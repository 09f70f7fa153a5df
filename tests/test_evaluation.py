"""Confusion matrices, IoU and the eval step against NumPy on small inputs."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from reco_jax import evaluation
from reco_jax import parallel
from reco_jax import steps

C = 4


def numpy_confusion(labels, preds, mask, num_classes):
  conf = np.zeros((num_classes, num_classes), np.int64)
  for t, p in zip(labels[mask], preds[mask]):
    conf[t, p] += 1
  return conf


class ImageChannelsAsLogits(nn.Module):
  """Parameter-free stand-in model: logits are the first C image channels at 1/2 resolution."""

  @nn.compact
  def __call__(self, x, train=False):
    logits = x[:, ::2, ::2, :C]
    return logits, logits


def test_confusion_matrix_matches_numpy_and_respects_mask():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, C, (3, 7, 5))
  preds = rng.integers(0, C, (3, 7, 5))
  mask = rng.random((3, 7, 5)) > 0.3
  got = steps.confusion_matrix(jnp.asarray(labels), jnp.asarray(preds), jnp.asarray(mask), C)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), numpy_confusion(labels, preds, mask, C))


def test_eval_step_ignores_void_and_invalid_examples_on_four_devices():
  rng = np.random.default_rng(1)
  images = rng.normal(size=(4, 9, 9, C)).astype(np.float32)
  labels = rng.integers(0, C, (4, 9, 9)).astype(np.int32)
  labels[rng.random(labels.shape) < 0.2] = 255
  labels[0, 0, :3] = 7  # out-of-range ids are not counted either
  valid = np.array([True, False, True, True])
  config = ml_collections.ConfigDict({'num_classes': C})
  model = ImageChannelsAsLogits()
  mesh = parallel.make_mesh(jax.devices()[:4])
  batch = parallel.shard_batch(mesh, {'image': images, 'label': labels, 'valid': valid})
  conf = steps.make_eval_step(config, model, mesh)({}, batch)

  # The model's logits live on the 5x5 grid; upsampling (align_corners) to 9x9 puts the odd
  # pixels exactly on grid points, so predictions there are the image argmax.
  preds = np.asarray(steps.predict(model, {}, jnp.asarray(images), (9, 9)))
  np.testing.assert_array_equal(preds[:, ::2, ::2], images[:, ::2, ::2].argmax(-1))
  mask = (labels < C) & valid[:, None, None]
  want = numpy_confusion(labels, preds, mask, C)
  np.testing.assert_array_equal(np.asarray(conf), want)
  assert want.sum() == mask.sum() and mask.sum() < labels.size * 3 // 4


def test_iou_and_mean_iou_against_hand_computation():
  conf = np.array([[5, 1, 0, 0],
                   [2, 3, 0, 0],
                   [0, 0, 0, 0],   # class 2: absent and never predicted -> NaN
                   [1, 0, 0, 0]], np.int64)  # class 3: present, never right -> 0
  iou = evaluation.iou_from_confusion(conf)
  np.testing.assert_allclose(iou[:2], [5 / (6 + 8 - 5), 3 / (5 + 4 - 3)])
  assert np.isnan(iou[2]) and iou[3] == 0.0
  assert evaluation.mean_iou(conf) == pytest.approx((5 / 9 + 3 / 6 + 0.0) / 3)
  assert evaluation.pixel_accuracy(conf) == pytest.approx(8 / 12)


def test_mean_iou_equals_reference_formula_when_all_classes_present():
  rng = np.random.default_rng(2)
  conf = rng.integers(1, 50, (5, 5)).astype(np.int64)
  h = conf.astype(np.float64)
  ref = np.mean(np.diag(h) / (h.sum(1) + h.sum(0) - np.diag(h)))
  assert evaluation.mean_iou(conf) == pytest.approx(ref)


def test_bad_confusion_is_rejected():
  with pytest.raises(ValueError, match='square'):
    evaluation.iou_from_confusion(np.zeros((3, 4), np.int64))
  with pytest.raises(ValueError, match='integer'):
    evaluation.mean_iou(np.zeros((3, 3), np.float32))

"""Pixel-wise cross-entropy losses for supervised and pseudo-labelled images.

Both losses take logits already resized to the label resolution, NHWC, and
compute in float32 whatever the logits' dtype (bf16 logits lose too much in a
log-softmax over many classes).
"""
import jax
import jax.numpy as jnp


def _check_shapes(logits, labels, name):
  if logits.ndim != 4 or labels.shape != logits.shape[:3]:
    raise ValueError(
        f'{name}: expected logits [B, H, W, C] and labels [B, H, W] at the '
        f'same resolution, got logits {logits.shape} and labels '
        f'{labels.shape}; resize the logits to the label size first.')


def pixel_cross_entropy(logits, labels, ignore_label=255):
  """Per-pixel cross-entropy and validity mask.

  Args:
    logits: [B, H, W, C] float (any float dtype; computed in float32).
    labels: [B, H, W] int. `ignore_label`, and any value outside [0, C), marks
      a void pixel.
    ignore_label: the void label.

  Returns:
    (loss, valid): loss [B, H, W] float32, zero on void pixels; valid
    [B, H, W] bool.
  """
  _check_shapes(logits, labels, 'pixel_cross_entropy')
  num_classes = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.int32)
  valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
  safe_labels = jnp.where(valid, labels, 0)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)
  loss = jnp.where(valid, -picked[..., 0], 0.0)
  return loss, valid


def cross_entropy(logits, labels, ignore_label=255):
  """Mean cross-entropy over non-void pixels (PyTorch `ignore_index` semantics).

  Args:
    logits: [B, H, W, C] float (bf16 allowed; computed in float32).
    labels: [B, H, W] int; `ignore_label` pixels are left out.
    ignore_label: the void label.

  Returns:
    Scalar float32; 0.0 when no pixel is valid (PyTorch would give NaN).
  """
  loss, valid = pixel_cross_entropy(logits, labels, ignore_label)
  count = jnp.sum(valid)
  return jnp.sum(loss) / jnp.maximum(count, 1).astype(jnp.float32)


def unsupervised_loss(logits, pseudo_labels, confidence, *,
                      strong_threshold=0.97, ignore_label=255):
  """Confidence-weighted cross-entropy on mixed, pseudo-labelled images.

  Follows the reference ReCo `compute_unsupervised_loss`: each image is
  weighted by eta = (number of its pixels with confidence >= threshold) /
  (number of its non-void pixels); the numerator counts every pixel, as the
  reference does (void pixels carry confidence 0 after CutOut, so they do not
  count in practice). The weighted per-pixel loss is averaged over the pixels
  whose unweighted loss is positive, which leaves out void pixels.

  Args:
    logits: [B, H, W, C] student logits at label resolution (any float dtype).
    pseudo_labels: [B, H, W] int, `ignore_label` where void.
    confidence: [B, H, W] float, the teacher's max softmax probability.
    strong_threshold: delta_s.
    ignore_label: the void label.

  Returns:
    Scalar float32; 0.0 when no pixel has a positive loss (the reference would
    give NaN). An image with no valid pixel gets weight 0 (the reference would
    divide by zero, though such an image adds no positive-loss pixel anyway).
  """
  if confidence.shape != pseudo_labels.shape:
    raise ValueError(
        f'unsupervised_loss: confidence {confidence.shape} must have the shape '
        f'of pseudo_labels {pseudo_labels.shape} ([B, H, W]).')
  loss, valid = pixel_cross_entropy(logits, pseudo_labels, ignore_label)
  batch = loss.shape[0]
  confident = jnp.sum(
      (confidence >= strong_threshold).reshape(batch, -1), axis=-1)
  num_valid = jnp.sum(valid.reshape(batch, -1), axis=-1)
  weight = jnp.where(
      num_valid > 0,
      confident.astype(jnp.float32) / jnp.maximum(num_valid, 1), 0.0)
  positive = loss > 0
  weighted = weight[:, None, None] * loss
  count = jnp.sum(positive)
  return (jnp.sum(jnp.where(positive, weighted, 0.0))
          / jnp.maximum(count, 1).astype(jnp.float32))

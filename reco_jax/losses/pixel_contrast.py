"""Label-based pixel contrastive loss of Zhao et al. (ICCV 2021).

For an anchor pixel i and each positive j (same label, j may equal i, neither
ignored) the loss is

  -log( e^{l_ij} / (e^{l_ij} + sum_{k negative of i} e^{l_ik}) ),
  l = f f^T / temperature,

averaged over the anchor's positives, then over the anchors that have any
positive, then over the batch (an image without valid pixels adds 0 to the
batch mean, as in the reference). Features are used as given: the projection
head below L2-normalises them.
"""
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from reco_jax.models import resize


def _torch_conv_kernel_init():
  # kaiming_uniform(a=sqrt(5)): bound = 1 / sqrt(fan_in), PyTorch's default.
  return nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def _torch_bias_init(fan_in):
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class ProjectionHead(nn.Module):
  """Projection head used before the pixel contrastive loss.

  Features are resized bilinearly (align_corners=True) to `size`, then go
  through `num_layers - 1` blocks of 1x1 conv (no bias) + BatchNorm + ReLU,
  a final 1x1 conv (with bias) and L2 normalisation over channels.

  Attributes:
    num_layers: total number of 1x1 convs (>= 1).
    hidden_dim: channels of the intermediate convs.
    out_dim: channels of the output embedding.
    size: (h, w) to resize to first; None keeps the input size.
    dtype: computation dtype (parameters stay float32; output is float32).
  """
  num_layers: int = 2
  hidden_dim: int = 256
  out_dim: int = 128
  size: Optional[Tuple[int, int]] = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    """x: [B, H, W, C] float -> [B, h, w, out_dim] float32, unit L2 norm."""
    if self.num_layers < 1:
      raise ValueError(
          f'ProjectionHead: num_layers must be >= 1, got {self.num_layers}.')
    if x.ndim != 4:
      raise ValueError(
          f'ProjectionHead: expected features [B, H, W, C], got {x.shape}.')
    x = x.astype(self.dtype)
    if self.size is not None:
      x = resize.bilinear_align_corners(x, tuple(self.size))
    for i in range(self.num_layers - 1):
      x = nn.Conv(self.hidden_dim, (1, 1), use_bias=False, dtype=self.dtype,
                  kernel_init=_torch_conv_kernel_init(), name=f'conv{i}')(x)
      # PyTorch BatchNorm defaults (momentum 0.1, eps 1e-5), as everywhere.
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                       epsilon=1e-5, dtype=self.dtype, name=f'bn{i}')(x)
      x = nn.relu(x)
    fan_in = x.shape[-1]
    x = nn.Conv(self.out_dim, (1, 1), use_bias=True, dtype=self.dtype,
                kernel_init=_torch_conv_kernel_init(),
                bias_init=_torch_bias_init(fan_in), name='conv_final')(x)
    x = x.astype(jnp.float32)
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, 1e-12))


def _valid_mask(labels, ignore_labels):
  valid = jnp.ones(labels.shape, bool)
  for ignore in ignore_labels:
    valid &= labels != ignore
  return valid


def _contrastive_loss(logits, labels, ignore_labels, negative_allowed=None):
  """The loss from pairwise logits.

  Args:
    logits: [B, M, M] float32 pairwise logits.
    labels: [B, M] int.
    ignore_labels: labels whose pixels take no part.
    negative_allowed: optional [M, M] bool; pairs that may be negatives.

  Returns:
    Scalar float32.
  """
  valid = _valid_mask(labels, ignore_labels)
  pair_valid = valid[:, :, None] & valid[:, None, :]
  same = labels[:, :, None] == labels[:, None, :]
  positive = same & pair_valid
  negative = ~same & pair_valid
  if negative_allowed is not None:
    negative &= negative_allowed[None]

  # log-sum-exp over each anchor's negatives, safe for anchors with none
  # (their loss is -log(1) = 0) and for gradients.
  has_negative = jnp.any(negative, axis=-1)
  row_max = jnp.max(jnp.where(negative, logits, -jnp.inf), axis=-1)
  row_max = jax.lax.stop_gradient(jnp.where(has_negative, row_max, 0.0))
  shifted = jnp.where(negative, logits - row_max[..., None], -jnp.inf)
  sum_exp = jnp.sum(jnp.exp(shifted), axis=-1)
  neg_lse = row_max + jnp.log(jnp.where(has_negative, sum_exp, 1.0))

  # -log(e^a / (e^a + e^b)) = softplus(b - a).
  pair_loss = jax.nn.softplus(neg_lse[..., None] - logits)
  pair_loss = jnp.where(positive & has_negative[..., None], pair_loss, 0.0)

  num_positive = jnp.sum(positive, axis=-1)
  anchor_loss = jnp.sum(pair_loss, axis=-1) / jnp.maximum(num_positive, 1)
  has_positive = num_positive > 0
  image_loss = (jnp.sum(jnp.where(has_positive, anchor_loss, 0.0), axis=-1)
                / jnp.maximum(jnp.sum(has_positive, axis=-1), 1))
  return jnp.mean(image_loss)


def _check(features, labels, name):
  if features.ndim != 3 or labels.shape != features.shape[:2]:
    raise ValueError(
        f'{name}: expected features [B, N, D] and labels [B, N], got '
        f'{features.shape} and {labels.shape}; flatten the spatial dims and '
        'resize the labels to the feature size first.')


def within_image_loss(features, labels, *, ignore_labels=(255,),
                      temperature=0.07):
  """Within-image pixel contrastive loss.

  Args:
    features: [B, N, D] float, used as given (normalise beforehand).
    labels: [B, N] int.
    ignore_labels: labels whose pixels are neither anchors nor keys.
    temperature: tau.

  Returns:
    Scalar float32.
  """
  _check(features, labels, 'within_image_loss')
  features = features.astype(jnp.float32)
  logits = jnp.einsum('bnd,bmd->bnm', features, features) / temperature
  return _contrastive_loss(logits, labels, tuple(ignore_labels))


def cross_image_loss(features1, features2, labels1, labels2, *,
                     ignore_labels=(255,), temperature=0.07):
  """Cross-image pixel contrastive loss.

  Pixels of image b of both inputs are pooled: positives come from both
  images, negatives only from the anchor's own image.

  Args:
    features1: [B, N1, D] float, used as given.
    features2: [B, N2, D] float, used as given.
    labels1: [B, N1] int.
    labels2: [B, N2] int.
    ignore_labels: labels whose pixels are neither anchors nor keys.
    temperature: tau.

  Returns:
    Scalar float32.
  """
  _check(features1, labels1, 'cross_image_loss')
  _check(features2, labels2, 'cross_image_loss')
  if features1.shape[0] != features2.shape[0]:
    raise ValueError(
        f'cross_image_loss: batch sizes differ, {features1.shape[0]} vs '
        f'{features2.shape[0]}.')
  n1 = features1.shape[1]
  n2 = features2.shape[1]
  features = jnp.concatenate([features1, features2], axis=1)
  features = features.astype(jnp.float32)
  labels = jnp.concatenate([labels1, labels2.astype(labels1.dtype)], axis=1)
  image_id = np.concatenate([np.zeros(n1, bool), np.ones(n2, bool)])
  same_image = jnp.asarray(image_id[:, None] == image_id[None, :])
  logits = jnp.einsum('bnd,bmd->bnm', features, features) / temperature
  return _contrastive_loss(logits, labels, tuple(ignore_labels), same_image)


def _flatten(features, labels, name):
  """[B, h, w, D] features and [B, H, W] labels -> [B, N, D], [B, N]."""
  features, labels = jnp.asarray(features), jnp.asarray(labels)
  if features.ndim == 4:
    if labels.ndim != 3:
      raise ValueError(
          f'{name}: features {features.shape} are [B, h, w, D], so labels '
          f'must be [B, H, W], got {labels.shape}.')
    size = features.shape[1:3]
    if labels.shape[1:] != size:
      labels = resize.nearest_align_corners(labels, size)
    return (features.reshape(features.shape[0], -1, features.shape[-1]),
            labels.reshape(labels.shape[0], -1))
  return features, labels


def two_view_loss(key, feats_orig, feats_dist, labels_orig, labels_dist, *,
                  mode='within', ignore_labels=(255,), temperature=0.07):
  """The pretraining loss on an original and a distorted view of each image.

  Args:
    key: typed PRNG key; used for the shuffle in 'cross' mode.
    feats_orig: [B, N, D] or [B, h, w, D] projected features of the original
      views.
    feats_dist: same shape, projected features of the distorted views.
    labels_orig: [B, N] int, or [B, H, W] int when the features are 4-D
      (resized to (h, w) when the sizes differ, with nearest on the
      align_corners grid of the features' bilinear resize, as the released
      TF code's resize_nearest_neighbor(align_corners=True)).
    labels_dist: same, for the distorted views.
    mode: 'within' (loss on each view, summed) or 'cross' (original view of
      image i with the distorted view of image perm[i], perm a random
      permutation drawn from `key`).
    ignore_labels: labels whose pixels take no part.
    temperature: tau.

  Returns:
    Scalar float32.
  """
  if mode not in ('within', 'cross'):
    raise ValueError(
        f"two_view_loss: mode must be 'within' or 'cross', got {mode!r}.")
  f1, l1 = _flatten(feats_orig, labels_orig, 'two_view_loss')
  f2, l2 = _flatten(feats_dist, labels_dist, 'two_view_loss')
  kwargs = dict(ignore_labels=ignore_labels, temperature=temperature)
  if mode == 'within':
    return within_image_loss(f1, l1, **kwargs) + within_image_loss(
        f2, l2, **kwargs)
  perm = jax.random.permutation(key, f2.shape[0])
  return cross_image_loss(f1, f2[perm], l1, l2[perm], **kwargs)


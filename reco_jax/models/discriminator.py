"""The S4GAN discriminator (Mittal et al., "Semi-Supervised Semantic Segmentation with
High- and Low-level Consistency", TPAMI 2019; the authors' `model/discriminator.py`).

It scores a segmentation map given with its image: class probabilities (or a one-hot ground
truth) and the image scaled to [0, 1], concatenated on the channel axis. Four strided 4x4
convolutions (pad 1) with leaky ReLU 0.2, whole-channel dropout after the first three, global
average pooling to the features that S4GAN's feature-matching loss compares, then a linear
layer and a sigmoid to the score: the probability that the map is ground truth.
"""
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from reco_jax.models import resnet

LEAKY_SLOPE = 0.2
DROPOUT_RATE = 0.5


class DiscriminatorOutput(NamedTuple):
  """score: float32 [B] in (0, 1), sigmoid(logit); logit: float32 [B];
  features: float32 [B, 8 * width], the pooled last feature map."""
  score: jax.Array
  logit: jax.Array
  features: jax.Array


class Discriminator(nn.Module):
  """S4GAN's image-level discriminator (float32 throughout).

  Attributes:
    width: channels of the first convolution (the authors' ndf = 64); the next three have
      2, 4 and 8 times as many.

  Convolutions and the linear layer are initialised like PyTorch's defaults, which the
  authors keep.
  """
  width: int = 64

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> DiscriminatorOutput:
    """x: float [B, H, W, C + 3] (maps, then the image). With `train`, dropout draws from the
    'dropout' rng: Dropout2d, each (image, channel) is zeroed with probability 0.5 and the
    rest scaled by 2."""
    x = x.astype(jnp.float32)
    for i, multiple in enumerate((1, 2, 4, 8)):
      kernel_init, bias_init = resnet.torch_conv_init(16 * x.shape[-1])
      x = nn.Conv(self.width * multiple, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)),
                  kernel_init=kernel_init, bias_init=bias_init, name=f'conv{i + 1}')(x)
      x = nn.leaky_relu(x, LEAKY_SLOPE)
      if i < 3:
        # broadcast_dims: one draw per image and channel, shared over the spatial positions.
        x = nn.Dropout(DROPOUT_RATE, broadcast_dims=(1, 2), deterministic=not train,
                       name=f'dropout{i + 1}')(x)
    features = jnp.mean(x, axis=(1, 2))
    kernel_init, bias_init = resnet.torch_conv_init(features.shape[-1])
    logit = nn.Dense(1, kernel_init=kernel_init, bias_init=bias_init, name='fc')(features)[:, 0]
    return DiscriminatorOutput(jax.nn.sigmoid(logit), logit, features)

"""ResNet backbones in the torchvision layout (ResNet v1.5), NHWC, for DeepLab.

Module and parameter names follow torchvision (`conv1`, `bn1`, `layer3_5/conv2`,
`layer1_0/downsample_conv`, ...) so that `convert.py` maps checkpoints name by name.
Padding is explicit and symmetric, `dilation * (k - 1) // 2`, as in PyTorch: "SAME" would pad
even-sized inputs asymmetrically and give different outputs.
"""
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch BatchNorm2d defaults: eps 1e-5 and running-average momentum 0.1, which is Flax's
# momentum 0.9 (Flax weighs the old value).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


class ResNetSpec(NamedTuple):
  """Depth and width of a bottleneck ResNet.

  stage_sizes: bottleneck blocks in layer1..layer4.
  width: planes of layer1 and stem channels (64 in torchvision); stage i has width * 2**i
    planes and 4x that many output channels.
  """
  stage_sizes: tuple[int, int, int, int]
  width: int = 64


BACKBONES = {
    'resnet50': ResNetSpec((3, 4, 6, 3), 64),
    'resnet101': ResNetSpec((3, 4, 23, 3), 64),
    # One block per stage and narrow: for tests and the toy dataset.
    'resnet_tiny': ResNetSpec((1, 1, 1, 1), 8),
}


def get_spec(backbone: 'str | ResNetSpec') -> ResNetSpec:
  """Returns the ResNetSpec of a backbone name (or passes a ResNetSpec through)."""
  if isinstance(backbone, ResNetSpec):
    return backbone
  if backbone not in BACKBONES:
    raise ValueError(f'Unknown backbone {backbone!r}; expected one of {sorted(BACKBONES)} '
                     'or a ResNetSpec.')
  return BACKBONES[backbone]


def stage_dilations(output_stride: int) -> tuple[tuple[int, int], ...]:
  """(stride, dilation) of layer1..layer4 for an output stride of 32, 16 or 8.

  A stage whose stride 2 became a dilation d runs its first block with dilation d // 2
  (torchvision's `replace_stride_with_dilation`, and the reference's `_nostride_dilate`).
  """
  if output_stride == 32:
    return ((1, 1), (2, 1), (2, 1), (2, 1))
  if output_stride == 16:
    return ((1, 1), (2, 1), (2, 1), (1, 2))
  if output_stride == 8:
    return ((1, 1), (2, 1), (1, 2), (1, 4))
  raise ValueError(f'output_stride must be 8, 16 or 32, got {output_stride}.')


def torch_conv_init(fan_in: int):
  """PyTorch's default Conv2d init (kaiming-uniform a=sqrt(5)): kernel and bias initialisers.

  Both are uniform in +-1/sqrt(fan_in); the bias needs fan_in explicitly because its
  initialiser only sees the bias shape.
  """
  bound = 1.0 / float(fan_in) ** 0.5

  def bias_init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
  return kernel_init, bias_init


# torchvision's ResNet init: kaiming-normal (fan_out, relu gain), not truncated.
_resnet_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def conv(features: int, kernel: int, *, stride: int = 1, dilation: int = 1,
         dtype: Any = jnp.float32, name: str | None = None,
         kernel_init=_resnet_kernel_init, **kwargs) -> nn.Conv:
  """A bias-free conv with PyTorch's symmetric padding `dilation * (kernel - 1) // 2`."""
  pad = dilation * (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), kernel_dilation=(dilation, dilation),
                 use_bias=kwargs.pop('use_bias', False), dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=kernel_init, name=name, **kwargs)


def batch_norm(train: bool, dtype: Any = jnp.float32, name: str | None = None) -> nn.BatchNorm:
  """BatchNorm2d with PyTorch's eps and momentum; scale 1, bias 0 at init."""
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                      epsilon=BN_EPSILON, dtype=dtype, param_dtype=jnp.float32, name=name)


class Bottleneck(nn.Module):
  """torchvision Bottleneck (v1.5): 1x1 -> 3x3 (stride, dilation) -> 1x1 (4x planes)."""
  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c = functools.partial(conv, dtype=self.dtype)
    bn = functools.partial(batch_norm, train, self.dtype)
    y = nn.relu(bn(name='bn1')(c(self.planes, 1, name='conv1')(x)))
    y = c(self.planes, 3, stride=self.stride, dilation=self.dilation, name='conv2')(y)
    y = nn.relu(bn(name='bn2')(y))
    y = bn(name='bn3')(c(self.planes * 4, 1, name='conv3')(y))
    if self.downsample:
      x = c(self.planes * 4, 1, stride=self.stride, name='downsample_conv')(x)
      x = bn(name='downsample_bn')(x)
    return nn.relu(y + x)


class ResNet(nn.Module):
  """Bottleneck ResNet trunk (no pooling head, no fc).

  Attributes:
    backbone: 'resnet50', 'resnet101', 'resnet_tiny' or a ResNetSpec.
    output_stride: 32, 16 or 8; 16 and 8 replace the last strides by dilation.
    dtype: compute dtype; parameters are float32.
  """
  backbone: 'str | ResNetSpec' = 'resnet101'
  output_stride: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    """x: [B, H, W, 3] -> {'layer1': [B, H/4, W/4, 4w], ..., 'layer4': [B, H/os, W/os, 32w]}.

    Sizes follow PyTorch's floor rules (321 -> 161 -> 81 for layer1). Features are in the
    compute dtype.
    """
    spec = get_spec(self.backbone)
    x = x.astype(self.dtype)
    x = conv(spec.width, 7, stride=2, dtype=self.dtype, name='conv1')(x)
    x = nn.relu(batch_norm(train, self.dtype, name='bn1')(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    features = {}
    in_channels = spec.width
    for stage, (blocks, (stride, dilation)) in enumerate(
        zip(spec.stage_sizes, stage_dilations(self.output_stride))):
      planes = spec.width * 2**stage
      for i in range(blocks):
        first = i == 0
        # A stage turned dilated keeps half the dilation in its first block.
        block_dilation = max(dilation // 2, 1) if first else dilation
        x = Bottleneck(
            planes=planes,
            stride=stride if first else 1,
            dilation=block_dilation,
            downsample=first and (stride != 1 or in_channels != planes * 4),
            dtype=self.dtype,
            name=f'layer{stage + 1}_{i}')(x, train)
        in_channels = planes * 4
      features[f'layer{stage + 1}'] = x
    return features

"""DeepLabV3+ and DeepLabV2 with a ReCo representation head, as in the reference code.

Both return `(logits, rep)` at the decoder resolution (1/4 for V3+, 1/8 for V2), float32,
NHWC. Heads are initialised like PyTorch's default Conv2d (the reference never re-initialises
them), except V2's classifier, whose weights the reference draws from N(0, 0.01).
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from reco_jax import names
from reco_jax.models import resize
from reco_jax.models import resnet


def _head_conv(features: int, kernel: int, in_channels: int, *, dilation: int = 1,
               use_bias: bool = False, dtype: Any = jnp.float32, name: str | None,
               kernel_init=None) -> nn.Conv:
  """A head conv with PyTorch's default init (fan_in = in_channels * kernel**2) and padding."""
  default_kernel_init, bias_init = resnet.torch_conv_init(in_channels * kernel * kernel)
  return resnet.conv(features, kernel, dilation=dilation, use_bias=use_bias, dtype=dtype,
                     name=name, kernel_init=kernel_init or default_kernel_init,
                     bias_init=bias_init)


class ASPP(nn.Module):
  """Atrous spatial pyramid pooling: 1x1, three dilated 3x3 and an image-pooling branch."""
  rates: tuple[int, int, int]
  features: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """x: [B, h, w, Cin] -> [B, h, w, features]."""
    cin = x.shape[-1]
    hc = functools.partial(_head_conv, self.features, in_channels=cin, dtype=self.dtype)
    bn = functools.partial(resnet.batch_norm, train, self.dtype)
    branches = [nn.relu(bn(name='branch0_bn')(hc(1, name='branch0_conv')(x)))]
    for i, rate in enumerate(self.rates, start=1):
      y = hc(3, dilation=rate, name=f'branch{i}_conv')(x)
      branches.append(nn.relu(bn(name=f'branch{i}_bn')(y)))
    # Image pooling: a [B,1,1,C] summary; upsampling a 1x1 map is a broadcast.
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
    pooled = nn.relu(bn(name='pool_bn')(hc(1, name='pool_conv')(pooled)))
    branches.append(jnp.broadcast_to(pooled, branches[0].shape))
    y = jnp.concatenate(branches, axis=-1)
    y = _head_conv(self.features, 1, y.shape[-1], dtype=self.dtype, name='project_conv')(y)
    return nn.relu(bn(name='project_bn')(y))


class DeepLabV3Plus(nn.Module):
  """DeepLabV3+ (ResNet, ASPP, low-level decoder) with classifier and representation heads.

  Attributes:
    num_classes: classifier outputs.
    backbone: 'resnet50' | 'resnet101' | 'resnet_tiny' (or a resnet.ResNetSpec).
    output_stride: 16 (ASPP rates 6/12/18) or 8 (layer3 dilated too, rates 12/24/36).
    rep_dim: channels of the ReCo representation.
    dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32.
    aspp_dim, low_level_dim, head_dim: widths of ASPP, the layer1 projection and the
      hidden layer of both heads (the paper's 256, 48, 256 by default).
    features_only: return the segmentation network's last hidden feature map instead, the
      classifier head's 3x3 conv + BN + ReLU (float32 [B, h, w, head_dim]): everything but
      the final 1x1 classifier layer, the feature Zhao et al. pretrain (their released loss
      was written for TF DeepLab, whose decoder convolutions precede a single 1x1 logits
      layer). The final layer and the representation head then have no parameters.

  Called with perturb_features=True (UniMatch's feature perturbation, `methods/unimatch.py`)
  it returns (logits, rep, perturbed logits): the decoder and the classifier run on the
  concatenation of the clean layer1 and layer4 features and a copy of them under channel
  dropout (p 0.5: whole channels zeroed, the rest scaled by 2; rng 'dropout'), so their
  BatchNorm sees both halves, as the UniMatch authors' decoder does; the representation head
  runs on the clean half only.
  """
  num_classes: int
  backbone: 'str | resnet.ResNetSpec' = 'resnet101'
  output_stride: int = 16
  rep_dim: int = 256
  dtype: Any = jnp.float32
  aspp_dim: int = 256
  low_level_dim: int = 48
  head_dim: int = 256
  features_only: bool = False

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False,
               perturb_features: bool = False) -> tuple[jax.Array, ...]:
    """images: [B, H, W, 3] normalised -> (logits [B,h,w,num_classes], rep [B,h,w,rep_dim]).

    h, w = layer1 size (ceil(H/4) for the usual sizes: 321 -> 81); both float32.
    perturb_features: also return the logits of the feature-perturbed copy (class doc).
    """
    _check_images(images)
    rates = {16: (6, 12, 18), 8: (12, 24, 36)}.get(self.output_stride)
    if rates is None:
      raise ValueError(f'DeepLabV3Plus output_stride must be 16 or 8, got {self.output_stride}.')
    feats = resnet.ResNet(self.backbone, self.output_stride, self.dtype,
                          name='backbone')(images, train)
    low, high = feats['layer1'], feats['layer4']
    if perturb_features:
      drop = nn.Dropout(0.5, broadcast_dims=(1, 2), deterministic=False)
      low = jnp.concatenate([low, drop(low)], axis=0)
      high = jnp.concatenate([high, drop(high)], axis=0)
    bn = functools.partial(resnet.batch_norm, train, self.dtype)

    high = ASPP(rates, self.aspp_dim, self.dtype, name='aspp')(high, train)
    low = _head_conv(self.low_level_dim, 1, low.shape[-1], dtype=self.dtype,
                     name='project_conv')(low)
    low = nn.relu(bn(name='project_bn')(low))
    high = resize.bilinear_align_corners(high, low.shape[1:3])
    x = jnp.concatenate([low, high], axis=-1)

    def hidden(x: jax.Array, prefix: str) -> jax.Array:
      y = _head_conv(self.head_dim, 3, x.shape[-1], dtype=self.dtype, name=f'{prefix}_conv')(x)
      return nn.relu(bn(name=f'{prefix}_bn')(y))

    def head(x: jax.Array, out_dim: int, prefix: str) -> jax.Array:
      y = _head_conv(out_dim, 1, self.head_dim, use_bias=True, dtype=self.dtype,
                     name=f'{prefix}_out')(hidden(x, prefix))
      return y.astype(jnp.float32)

    if self.features_only:
      return hidden(x, 'classifier').astype(jnp.float32)

    if perturb_features:
      logits, perturbed = jnp.split(head(x, self.num_classes, 'classifier'), 2, axis=0)
      return logits, head(x[:images.shape[0]], self.rep_dim, 'representation'), perturbed
    return head(x, self.num_classes, 'classifier'), head(x, self.rep_dim, 'representation')


class DeepLabV2(nn.Module):
  """DeepLabV2: ResNet at output stride 8, classifier = sum of four dilated 3x3 convs.

  Attributes:
    num_classes: classifier outputs.
    backbone: 'resnet50' | 'resnet101' | 'resnet_tiny' (or a resnet.ResNetSpec).
    rep_dim: channels of the ReCo representation (one 1x1 conv on layer4).
    dtype: compute dtype; parameters stay float32.
    features_only: return layer4 (the input of the classifier's dilated convs, float32
      [B, h, w, 2048 for ResNet-50/101]) instead; the heads then have no parameters. V2's
      classifier is the sum of four dilated 3x3 convs straight into the classes, with no
      hidden layer of its own, so layer4 is its last hidden feature map.
  """
  num_classes: int
  backbone: 'str | resnet.ResNetSpec' = 'resnet101'
  rep_dim: int = 256
  dtype: Any = jnp.float32
  features_only: bool = False

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """images: [B, H, W, 3] -> (logits [B,h,w,num_classes], rep [B,h,w,rep_dim]), h = H/8."""
    _check_images(images)
    x = resnet.ResNet(self.backbone, 8, self.dtype, name='backbone')(images, train)['layer4']
    if self.features_only:
      return x.astype(jnp.float32)
    cin = x.shape[-1]
    logits = None
    for i, rate in enumerate((6, 12, 18, 24)):
      y = _head_conv(self.num_classes, 3, cin, dilation=rate, use_bias=True, dtype=self.dtype,
                     name=f'classifier_{i}',
                     kernel_init=nn.initializers.normal(0.01))(x)
      logits = y if logits is None else logits + y
    rep = _head_conv(self.rep_dim, 1, cin, use_bias=True, dtype=self.dtype,
                     name='representation')(x)
    return logits.astype(jnp.float32), rep.astype(jnp.float32)


def _check_images(images: jax.Array) -> None:
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'Expected normalised images [B, H, W, 3] (NHWC), got shape {images.shape}.')


# Keyed by the model names of `names.MODELS`, in that order.
MODELS = dict(zip(names.MODELS, (DeepLabV3Plus, DeepLabV2), strict=True))


def build_model(name: str, **kwargs) -> nn.Module:
  """Builds 'deeplabv3p' or 'deeplabv2' with the given fields (num_classes, backbone, ...).

  Raises ValueError naming the valid choices for an unknown model, field or backbone.
  """
  if name not in MODELS:
    raise ValueError(f'Unknown model {name!r}; expected one of {sorted(MODELS)}.')
  cls = MODELS[name]
  fields = [f for f in cls.__dataclass_fields__ if f not in ('parent', 'name')]
  unknown = sorted(set(kwargs) - set(fields))
  if unknown:
    raise ValueError(f'{name} has no fields {unknown}; its fields are {fields}.')
  if 'backbone' in kwargs:
    resnet.get_spec(kwargs['backbone'])  # Fails early, naming the valid backbones.
  if isinstance(kwargs.get('dtype'), str):
    kwargs['dtype'] = jnp.dtype(kwargs['dtype'])  # Configs may say 'bfloat16'.
  return cls(**kwargs)


# The DeepLabV3+ fields a config carries that DeepLabV2 (output stride 8, no ASPP or decoder)
# does not take; dropped for it so that one config serves both models.
_DEEPLABV3P_ONLY = ('output_stride', 'aspp_dim', 'low_level_dim', 'head_dim')


def model_from_config(config, *, features_only: bool = False) -> nn.Module:
  """The model of a run's config: config.model.name selects it, its other keys are its fields.

  features_only: the network up to its last feature map before the classifier (pretraining).
  """
  kwargs = dict(config.model.to_dict())
  name = kwargs.pop('name')
  if name == 'deeplabv2':
    for key in _DEEPLABV3P_ONLY:
      kwargs.pop(key, None)
  kwargs['dtype'] = jnp.dtype(kwargs.get('dtype', 'float32'))
  if features_only:
    kwargs['features_only'] = True
  try:
    return build_model(name, num_classes=config.num_classes, **kwargs)
  except TypeError as e:
    raise ValueError(f'config.model has a key the {name} model does not take ({e}); its '
                     f'fields are those of deeplab.{MODELS[name].__name__}.') from e

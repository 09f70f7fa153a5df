"""Label-based pixel contrastive pretraining (Zhao et al., ICCV 2021), the first stage of a run.

Zhao et al. pretrain the segmentation network with a pixel-wise contrastive loss on the labels
(section 3, Eq. 1 within-image and Eq. 2 cross-image), then fine-tune it with cross-entropy.
One step here:
1. each labelled image gives two views: the image as the input pipeline delivers it and a
   colour distortion of it that keeps the pixel grid, so the labels serve both (`distort`:
   brightness, contrast, saturation and hue jitter in a random order, then greying, SimCLR's
   colour distortion; its strengths are config.distortion, ours to choose);
2. both views run through the segmentation network minus its final layer (its last hidden
   feature map: for DeepLabV3+ through the classifier head's 3x3 conv, BN and ReLU; for
   DeepLabV2 layer4; `features_only` models, the same definition as the segmentation
   network) and a projection head (1x1 conv + BN + ReLU layers, a final 1x1 conv,
   L2-normalised; 256 channels throughout in the released code, config.projection_dims)
   whose input is first resized to the embedding map (`embedding_size`; bilinear with
   align_corners);
3. labels are resized to the embedding map with nearest on the same align_corners grid (as
   the released code's resize_nearest_neighbor(align_corners=True)), and the within-image or
   cross-image loss of `losses/pixel_contrast.py` (temperature config.contrast_temperature,
   0.07 in the paper) is minimised with the pretraining optimiser (config.pretrain_optimizer).
The final classifier layer does not exist in this stage. The fine-tuning stage restores every
pretrained layer and initialises only the final 1x1 classifier layer and ReCo's
representation head afresh (`finetune_variables`).
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from reco_jax import names
from reco_jax import normalization
from reco_jax import state as state_lib
from reco_jax.losses import pixel_contrast
from reco_jax.methods import common
from reco_jax.methods import interface
from reco_jax.semi import augment

BRANCHES = (2, 0)  # Every image of the step is labelled: 2 x batch_size, as supervised runs.
LOSS_PARTS = ('contrast_loss',)


class PretrainingNetwork(nn.Module):
  """The segmentation network's feature extractor with a projection head.

  Attributes:
    segmenter: a segmentation model built with features_only=True; its parameters are those
      of the full model minus the final classifier layer and the representation head.
    head_dims: widths of the projection head's 1x1 convs, the last one its output.
    embedding_size: (h, w) the features are resized to (bilinear, align_corners) before the
      head; None keeps the decoder resolution.
  Parameters live under 'segmenter' and 'projection'; the head computes in the segmenter's
  dtype and returns float32.
  """
  segmenter: nn.Module
  head_dims: tuple[int, ...] = (256, 128)
  embedding_size: tuple[int, int] | None = None

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """images: float32 [B, H, W, 3] normalised -> unit embeddings float32 [B, h, w, D]."""
    features = self.segmenter(images, train)
    head = pixel_contrast.ProjectionHead(
        num_layers=len(self.head_dims), hidden_dim=self.head_dims[0],
        out_dim=self.head_dims[-1], size=self.embedding_size, dtype=self.segmenter.dtype,
        name='projection')
    return head(features, train)


def embedding_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """The embedding map of a training crop: ceil(crop / config.embedding_stride)."""
  stride = int(config.embedding_stride)
  return tuple(math.ceil(int(s) / stride) for s in config.crop_size)


def build_network(config: ml_collections.ConfigDict, segmenter: nn.Module, *,
                  train_size: bool = True) -> PretrainingNetwork:
  """The pretraining network around `segmenter` (a features_only model).

  train_size: resize to the training crop's embedding map; False keeps the decoder
  resolution (evaluation images of any size, as the probe uses).
  """
  return PretrainingNetwork(segmenter, tuple(int(d) for d in config.projection_dims),
                            embedding_size(config) if train_size else None)


def distort(key: jax.Array, images: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
  """The distorted views: per image, colour jitter with probability jitter_prob (brightness,
  contrast and saturation factors in [1 - s, 1 + s], a hue shift in [-hue, hue], in a random
  order), then grey with probability grey_prob. Strengths from config.distortion.

  images: float32 [B, H, W, 3] ImageNet-normalised -> the same shape, normalised again.
  """
  d = config.distortion
  batch = images.shape[0]
  keys = jax.random.split(key, 7)
  factor = lambda k, s: jax.random.uniform(k, (batch,), minval=1.0 - s, maxval=1.0 + s)
  order = jnp.argsort(jax.random.uniform(keys[0], (batch, 4)), axis=-1)
  hue = jax.random.uniform(keys[4], (batch,), minval=-d.hue, maxval=d.hue)
  x = jnp.clip(normalization.denormalize(images.astype(jnp.float32)), 0.0, 1.0)
  jittered = jax.vmap(augment.color_jitter)(
      x, order, factor(keys[1], d.brightness), factor(keys[2], d.contrast),
      factor(keys[3], d.saturation), hue)
  per_image = lambda flags: flags[:, None, None, None]
  x = jnp.where(per_image(jax.random.uniform(keys[5], (batch,)) < d.jitter_prob), jittered, x)
  grey = jnp.broadcast_to(jax.vmap(augment.grey)(x), x.shape)
  x = jnp.where(per_image(jax.random.uniform(keys[6], (batch,)) < d.grey_prob), grey, x)
  return normalization.normalize(x).astype(images.dtype)


def two_views(key: jax.Array, images: jax.Array, config: ml_collections.ConfigDict
              ) -> jax.Array:
  """[original; distorted] views of `images` stacked on the batch axis: [2B, H, W, 3]."""
  return jnp.concatenate([images, distort(key, images, config)], axis=0)


def contrast_loss(key: jax.Array, embeddings: jax.Array, labels: jax.Array,
                  config: ml_collections.ConfigDict) -> jax.Array:
  """The pretraining loss of the [original; distorted] embeddings [2B, h, w, D] of images
  labelled int32 [B, H, W] (255 = void; resized to (h, w) with nearest)."""
  originals, distorted = jnp.split(embeddings, 2, axis=0)
  return pixel_contrast.two_view_loss(
      key, originals, distorted, labels, labels, mode=config.pretrain,
      ignore_labels=(names.VOID,), temperature=float(config.contrast_temperature))


def train_step(state: state_lib.TrainState, batch, key: jax.Array, *, model_fn,
               mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict):
  """One pretraining step: (state, metrics {contrast_loss, loss, learning_rate, grad_norm}).

  model_fn: the PretrainingNetwork's apply; batch: {'labelled': {'image', 'label'}} as
  `steps.make_train_step` describes. Both views go through the network in one pass.
  """
  del mesh  # Data parallel through jit: the loss is a mean over the global batch.
  k_view, _, k_loss = common.step_keys(key, state.step)
  images, labels = batch['labelled']['image'], batch['labelled']['label']
  views = two_views(k_view, images, config)

  def loss_fn(params):
    embeddings, updates = model_fn({'params': params, 'batch_stats': state.batch_stats},
                                   views, train=True, mutable=['batch_stats'])
    loss = contrast_loss(k_loss, embeddings, labels, config)
    return loss, updates['batch_stats']

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state, metrics = common.apply_update(state, grads, batch_stats)
  return (state.replace(step=state.step + 1),
          common.as_float32({'loss': loss, 'contrast_loss': loss, **metrics}))


def eval_variables(state: state_lib.TrainState) -> dict:
  """The pretrained network (student; this stage has no teacher)."""
  return state.student_variables()


def finetune_variables(pretrained: dict, fresh: dict) -> dict:
  """The fine-tuning model's initial variables: every pretrained layer (backbone, decoder,
  and for DeepLabV3+ the classifier head's 3x3 conv and BatchNorm), the rest (the final 1x1
  classifier layer and the representation head) as initialised in `fresh`.

  pretrained: the pretraining state's {'params', 'batch_stats'} (with 'segmenter' and
  'projection' entries); fresh: a freshly initialised segmentation model's variables. The
  projection head is dropped. Raises ValueError if a pretrained entry has no counterpart of
  the same shape in the segmentation model (a different architecture).
  """
  out = {}
  for collection in ('params', 'batch_stats'):
    source = pretrained.get(collection, {}).get('segmenter', {})
    out[collection] = _overlay(dict(fresh.get(collection, {})), source, collection)
  return out


def _overlay(target: dict, source: dict, path: str) -> dict:
  for name, value in source.items():
    where = f'{path}/{name}'
    if name not in target:
      raise ValueError(f'The pretrained {where} has no counterpart in the segmentation model; '
                       'pretraining and fine-tuning must use the same config.model.')
    if isinstance(value, dict) or hasattr(value, 'items'):
      target[name] = _overlay(dict(target[name]), dict(value), where)
    else:
      if np.shape(value) != np.shape(target[name]):
        raise ValueError(f'The pretrained {where} has shape {np.shape(value)}, the model '
                         f'expects {np.shape(target[name])}; pretraining and fine-tuning '
                         'must use the same config.model.')
      target[name] = value
  return target


def probe_embedding(network: PretrainingNetwork):
  """embed(variables, images) -> {'P': the eval-mode embeddings}, for the embedding probe
  (`class_stats.make_stats_step`, `class_stats.embedding_probe`). network: with
  embedding_size None (the decoder resolution), so evaluation images of any size work."""
  return lambda variables, images: {'P': network.apply(variables, images, train=False)}


METHOD = interface.Method(
    name='contrastive_pretraining', branches=BRANCHES, loss_parts=LOSS_PARTS,
    train_step=train_step, eval_variables=eval_variables)

"""The jitted steps: training (by method, see `reco_jax.methods`), evaluation, prediction.

Data parallel under `jax.jit` on a ('data',) mesh: the state is replicated, batches are global
arrays sharded on their leading axis. BatchNorm then sees the global batch, mixing partners and
random numbers are those of the global batch, so results do not depend on the number of
devices. Only ReCo samples per device (shard_map inside `reco_loss_per_device`).
"""
from collections.abc import Callable
import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from reco_jax import methods
from reco_jax import parallel
from reco_jax import state as state_lib
from reco_jax.methods import common

# Per-batch confusion counts come from a float32 one-hot matmul, exact below 2**24 pixels.
_MAX_EXACT_PIXELS = 2**24


def make_train_step(config: ml_collections.ConfigDict, model: nn.Module,
                    mesh: jax.sharding.Mesh, method: types.ModuleType | None = None
                    ) -> Callable:
  """The jitted training step of config.method (reco and partial variants included).

  method: the method module whose train_step is used (default: config.method's; the
  pretraining stage passes `methods.contrastive_pretraining`).

  Returns train_step(state, batch, key) -> (state, metrics), jitted with the state donated.
    state: TrainState replicated on `mesh`.
    batch: {'labelled': {'image': float32 [B, H, W, 3], 'label': int32 [B, H, W]},
            'unlabelled': {'image': float32 [B, H, W, 3]}} as global arrays sharded on 'data'
      (no 'unlabelled' for methods without unlabelled images; in partial-label mode
      (config.partial != '') the unlabelled branch also carries the partial 'label' int32
      [B, H, W], 255 = void). Images are ImageNet-normalised.
    key: the run's base jax.random key, the same at every step; the step folds in state.step
      itself, so a resumed run draws the same numbers.
    metrics: dict of float32 scalars: loss, sup_loss, unsup_loss, reco_loss, learning_rate,
      grad_norm; Mean Teacher methods add pseudo_confidence (mean teacher confidence on the
      unlabelled images), confident_fraction (share of those pixels >= strong_threshold) and
      teacher_decay; S4GAN's are listed in `reco_jax.methods.s4gan.train_step`.
  """
  method = method or methods.get(config.method)
  step = functools.partial(method.train_step, model_fn=model.apply, mesh=mesh, config=config)
  replicated = parallel.replicated(mesh)
  return jax.jit(step, donate_argnums=0, out_shardings=(replicated, replicated))


def predict(model: nn.Module, variables, images: jax.Array, size) -> jax.Array:
  """Class map of `images` at `size` (eval mode; bilinear align_corners=True upsampling).

  variables: {'params', 'batch_stats'}; images: float32 [B, H, W, 3] ImageNet-normalised;
  size: (H', W'). Returns int32 [B, H', W'].
  """
  logits, _ = model.apply(variables, images, train=False)
  return jnp.argmax(common.upsample(logits, size), axis=-1).astype(jnp.int32)


def confusion_matrix(labels: jax.Array, predictions: jax.Array, mask: jax.Array,
                     num_classes: int) -> jax.Array:
  """int32 [C, C] pixel counts, rows = ground truth, columns = prediction, over `mask`.

  labels, predictions: int [...] (same shape); mask: bool [...]. Labels outside 0..C-1 must be
  masked out by the caller. A one-hot matmul keeps shapes fixed and runs well on accelerators.
  """
  n = labels.size
  if n >= _MAX_EXACT_PIXELS:
    raise ValueError(f'confusion_matrix counts {n} pixels per call, at most {_MAX_EXACT_PIXELS} '
                     '- 1 are counted exactly; lower config.eval_batch_size.')
  truth = jax.nn.one_hot(labels.reshape(-1), num_classes, dtype=jnp.float32)
  truth = truth * mask.reshape(-1, 1).astype(jnp.float32)
  pred = jax.nn.one_hot(predictions.reshape(-1), num_classes, dtype=jnp.float32)
  counts = jnp.einsum('nc,nd->cd', truth, pred, precision=jax.lax.Precision.HIGHEST)
  return jnp.round(counts).astype(jnp.int32)


def make_eval_step(config: ml_collections.ConfigDict, model: nn.Module,
                   mesh: jax.sharding.Mesh | None = None) -> Callable:
  """Builds the jitted eval step: eval_step(variables, batch) -> confusion int32 [C, C].

  variables: {'params', 'batch_stats'} (see eval_variables).
  batch: {'image': float32 [B, H, W, 3], 'label': int32 [B, H, W] (255 = void),
          'valid': bool [B] (False for padding examples; optional)}.
  Logits are upsampled to the label size; pixels that are void, outside 0..C-1 or in an
  invalid example are not counted. Rows = ground truth. Sum the results on the host in int64.
  mesh: when given, the result is replicated on it (readable from every process).
  """
  num_classes = int(config.num_classes)

  def eval_step(variables, batch):
    labels = batch['label'].astype(jnp.int32)
    preds = predict(model, variables, batch['image'], labels.shape[1:3])
    mask = (labels >= 0) & (labels < num_classes)
    if 'valid' in batch:
      mask = mask & batch['valid'].astype(bool)[:, None, None]
    return confusion_matrix(labels, preds, mask, num_classes)

  out = parallel.replicated(mesh) if mesh is not None else None
  return jax.jit(eval_step, out_shardings=out)


def eval_variables(config: ml_collections.ConfigDict, state: state_lib.TrainState) -> dict:
  """The evaluated model of config.method: the teacher for Mean Teacher, else the student."""
  return methods.get(config.method).eval_variables(state)

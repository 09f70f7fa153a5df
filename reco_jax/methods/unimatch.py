"""UniMatch: weak-to-strong consistency with two strong views and feature perturbation.

Yang et al., "Revisiting Weak-to-Strong Consistency in Semi-Supervised Semantic
Segmentation" (CVPR 2023), as the authors' `unimatch.py` trains it (LiheYoung/UniMatch), on
the project's DeepLabV3+. One step, with x the labelled batch, u the unlabelled batch and u'
a second unlabelled batch (the second half of the unlabelled branch, see BRANCHES) that only
serves as CutMix source:
1. the weak view of u and of u': a random rescale (config.scale_range), pad and crop, and a
   horizontal flip, on device; padded pixels form the ignore mask;
2. two strong views of each weak view, each with its own draws: colour jitter (brightness,
   contrast and saturation 0.5-1.5, hue +-config.hue_jitter, 0.25) with p 0.8, grey with p 0.2, Gaussian blur
   (sigma 0.1-2.0) with p 0.5; and a CutMix box per view (`mixing.unimatch_box_mask`):
   u's strong view takes u''s strong view of the same index inside its box;
3. the network in eval mode (running BatchNorm statistics, no gradient) labels u''s weak view:
   argmax and softmax confidence of the upsampled logits;
4. one train-mode pass on [x, u_w] whose decoder also runs on a copy of the features under
   channel dropout (p 0.5 on layer1 and layer4; `DeepLabV3Plus(perturb_features=True)`), and
   one train-mode pass on [u_s1, u_s2]; BatchNorm sees each concatenation whole;
5. u_w's clean prediction, detached, gives the pseudo-labels and confidences; a strong
   view's targets take u''s inside its box (label, confidence and ignore mask);
6. loss = (CE(x) + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2, where each unsupervised L sums the
   per-pixel CE of the pixels with confidence >= unimatch_threshold (0.95) that are not
   ignored, divided by the number of pixels that are not ignored.
One network, no teacher: the student is updated, evaluated and kept.

Where the project differs from the authors' code, it says so:
- the authors zip one DataLoader twice, so with their DistributedSampler u' holds the same
  images as u under another crop; here u' is a second draw of the unlabelled stream;
- the weak view's rescale is the project's (a factor of the image size drawn from
  config.scale_range, reflection padding) where the authors resize the long side to 0.5-2.0 of
  its length and pad with black; padded pixels are ignored either way;
- the network is ReCo's DeepLabV3+ (one 3x3 conv after the concatenation), not the authors'
  (two, and a deep-stem ResNet);
- the Cityscapes setting's OHEM loss on the labelled images is not implemented (plain CE).
The labelled images get the authors' augmentation: rescale, crop and flip, no colour
(LABELLED_PHOTOMETRIC).

ReCo (config.reco; "UniMatch + ReCo", choices no paper fixes): the ReCo loss of
`losses/reco_recipe.py` is added to UniMatch's total, on the labelled images with their labels
(the clean pass of x) and on the two strong views with their mixed weak pseudo-labels: valid
where the confidence is >= weak_threshold and the pixel is not ignored, hard queries below
strong_threshold, as ReCo's unlabelled branch. The representation head runs on the clean
features only.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections

from reco_jax import names
from reco_jax import state as state_lib
from reco_jax.losses import reco_recipe
from reco_jax.losses import segmentation
from reco_jax.methods import common
from reco_jax.methods import interface
from reco_jax.semi import augment
from reco_jax.semi import mixing
from reco_jax.semi import rescale

# batch_size labelled images; 2 x batch_size unlabelled: u, then u' (the CutMix source).
BRANCHES = (1, 2)
LOSS_PARTS = ('sup_loss', 'unsup_loss', 'fp_loss')
# The authors augment labelled images geometrically only (their dataset/semi.py).
LABELLED_PHOTOMETRIC = False
# The authors' strong view (dataset/semi.py): ColorJitter(0.5, 0.5, 0.5, 0.25) with p 0.8,
# RandomGrayscale(p 0.2), blur with p 0.5 and sigma in [0.1, 2.0].
# The hue shift's bound is config.hue_jitter (0.25 by default, the authors' value). The blur
# kernel reaches 3 sigma at the largest sigma.
STRONG_VIEW = dict(jitter_prob=0.8, brightness=(0.5, 1.5), contrast=(0.5, 1.5),
                   saturation=(0.5, 1.5), grey_prob=0.2, blur_prob=0.5, sigma=(0.1, 2.0),
                   flip_prob=0.0, blur_kernel_size=2 * 6 + 1)
# Loss weights of the two strong views and of the feature-perturbed view (unimatch.py).
STRONG_WEIGHT, FP_WEIGHT = 0.25, 0.5
# Unlabelled images per epoch of the authors' settings, for their epoch counts.
_TRAIN_IMAGES = {'reco_voc': 10582, 'reco_cityscapes': 2975}


def config_overrides(config: ml_collections.ConfigDict) -> dict:
  """UniMatch's own training settings where they differ from ReCo's, for config.dataset.

  The authors' configs/pascal.yaml and configs/cityscapes.yaml with unimatch.py: SGD with
  momentum 0.9 (not Nesterov) and weight decay 1e-4, the rate decayed every step as
  lr (1 - t / T) ** 0.9 with no floor; VOC: lr 0.001 with 10x on the decoder and heads,
  4 GPUs x (2 + 2) images, rescale 0.5-2.0, 80 epochs of the unlabelled images;
  Cityscapes: lr 0.005, no multiplier, 8 GPUs x (1 + 1), 240 epochs (at the project's half
  resolution and crop). Other datasets take VOC's optimiser. The toy keeps its own learning
  rate and schedule length, and no multiplier: its network starts from scratch, where the
  10x exists for a head trained on top of an ImageNet backbone.
  """
  optimizer = dict(momentum=0.9, nesterov=False, weight_decay=1e-4, min_learning_rate=0.0,
                   decay_epochs=0)
  out = {'unimatch_threshold': 0.95}
  if config.dataset.startswith('reco_toy'):
    return {**out, 'optimizer': optimizer}
  epochs, batch, lr, multiplier = 80, 8, 0.001, 10.0
  if config.dataset == 'reco_cityscapes':
    epochs, lr, multiplier = 240, 0.005, 1.0
  else:
    out['scale_range'] = (0.5, 2.0)
  out.update(batch_size=batch, optimizer={**optimizer, 'learning_rate': lr,
                                          'head_lr_multiplier': multiplier})
  images = _TRAIN_IMAGES.get(config.dataset)
  if images is not None:
    unlabelled = images - (config.labels or 0)
    out['num_train_steps'] = epochs * max(unlabelled // batch, 1)
  return out


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for the settings UniMatch cannot train with."""
  if config.partial:
    raise ValueError(f'method=unimatch trains on fully labelled images; partial='
                     f'{config.partial} is supported by the Mean Teacher methods (cutout, '
                     'cutmix, classmix). Drop partial or choose one of those.')
  if config.model.name != 'deeplabv3p':
    raise ValueError(f'method=unimatch perturbs the DeepLabV3+ decoder\'s input features; '
                     f'backbone={config.model.name} has no such decoder. Use '
                     'backbone=deeplabv3p.')
  if config.recompute_labelled:
    raise ValueError('config.recompute_labelled is a Mean Teacher option; method=unimatch '
                     'runs its labelled images in one pass with the weak view. Set it False.')
  if not 0.0 <= config.unimatch_threshold <= 1.0:
    raise ValueError(f'config.unimatch_threshold must be in [0, 1], got '
                     f'{config.unimatch_threshold}.')


def weak_views(key: jax.Array, images: jax.Array, *, scale_range) -> tuple[jax.Array, jax.Array]:
  """Random rescale, pad, crop and horizontal flip: (images, ignored bool [B, H, W]).

  images: float32 [B, H, W, 3] normalised. Padded pixels are `ignored`.
  """
  k_scale, k_flip = jax.random.split(key)
  batch, height, width = images.shape[:3]
  zeros = jnp.zeros((batch, height, width), jnp.int32)
  images, padding, _ = rescale.random_scale_crop(
      k_scale, images, zeros, zeros.astype(jnp.float32), scale_range=tuple(scale_range),
      ignore_label=names.VOID)
  flip = (jax.random.uniform(k_flip, (batch,)) < 0.5)
  images = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)
  padding = jnp.where(flip[:, None, None], padding[:, :, ::-1], padding)
  return images, padding == names.VOID


def strong_views(key: jax.Array, weak: jax.Array, *, hue: float) -> tuple[jax.Array, jax.Array]:
  """Two strong views of each weak view, with independent colour, grey and blur draws.

  weak: float32 [B, H, W, 3] normalised; hue: the largest hue shift, in turns.
  """
  dummy = jnp.zeros(weak.shape[:3], jnp.float32)
  return tuple(augment.strong_augment(k, weak, dummy.astype(jnp.int32), dummy,
                                      hue=(-hue, hue), **STRONG_VIEW)[0]
               for k in jax.random.split(key))


def _pseudo_labels(logits: jax.Array, size) -> tuple[jax.Array, jax.Array]:
  """(argmax int32, softmax confidence float32) [B, H, W] of detached logits at `size`."""
  prob = jax.nn.softmax(common.upsample(jax.lax.stop_gradient(logits), size), axis=-1)
  return jnp.argmax(prob, axis=-1).astype(jnp.int32), jnp.max(prob, axis=-1)


def masked_loss(logits: jax.Array, labels: jax.Array, confidence: jax.Array,
                ignored: jax.Array, threshold: float) -> jax.Array:
  """UniMatch's unsupervised term: the CE of the confident, non-ignored pixels, summed and
  divided by the number of non-ignored pixels (0 when every pixel is ignored).

  logits: [B, H, W, C] at label size; labels int32, confidence float32, ignored bool
  [B, H, W].
  """
  loss, _ = segmentation.pixel_cross_entropy(logits, labels, ignore_label=names.VOID)
  kept = (confidence >= threshold) & ~ignored
  count = jnp.sum(~ignored).astype(jnp.float32)
  return jnp.sum(jnp.where(kept, loss, 0.0)) / jnp.maximum(count, 1.0)


def make_inputs(model_fn, state: state_lib.TrainState, batch, k_mix: jax.Array,
                k_aug: jax.Array, *, config: ml_collections.ConfigDict) -> dict:
  """Steps 1-3: the weak and mixed strong views, u''s pseudo-labels and the boxes.

  k_mix draws the weak views and the boxes, k_aug the strong views' photometric draws.
  Returns {'weak': u_w, 'ignored': its ignore mask, 'strong': (u_s1, u_s2) mixed,
  'boxes': (box1, box2), 'mix': (label, confidence, ignored) of u'} without gradient.
  """
  k_weak, k_box = jax.random.split(k_mix)
  unlabelled = batch['unlabelled']['image']
  n = unlabelled.shape[0] // 2
  weak, ignored = weak_views(k_weak, unlabelled, scale_range=config.scale_range)
  s1, s2 = strong_views(k_aug, weak, hue=float(config.hue_jitter))
  height, width = weak.shape[1:3]
  boxes = tuple(mixing.unimatch_box_mask(k, n, height, width)
                for k in jax.random.split(k_box))
  mixed = tuple(jnp.where(box[..., None], s[n:], s[:n]) for box, s in zip(boxes, (s1, s2)))
  # u''s pseudo-labels: the network in eval mode.
  mix_logits, _ = model_fn(state.student_variables(), weak[n:], train=False)
  mix_label, mix_conf = _pseudo_labels(mix_logits, (height, width))
  inputs = {'weak': weak[:n], 'ignored': ignored[:n], 'strong': mixed, 'boxes': boxes,
            'mix': (mix_label, mix_conf, ignored[n:])}
  return jax.tree.map(jax.lax.stop_gradient, inputs)


def strong_targets(inputs: dict, label: jax.Array, confidence: jax.Array):
  """Step 5: per strong view, (label, confidence, ignored) with u''s inside its box."""
  mix_label, mix_conf, mix_ignored = inputs['mix']
  return tuple((jnp.where(box, mix_label, label), jnp.where(box, mix_conf, confidence),
                jnp.where(box, mix_ignored, inputs['ignored'])) for box in inputs['boxes'])


def unimatch_losses(params, batch_stats, model_fn, l_images, l_labels, inputs, k_fp, k_reco,
                    *, mesh, config, bank=None):
  """Steps 4-6 (and ReCo): (loss, (batch_stats, parts)) as a function of the parameters."""
  n_l = l_images.shape[0]
  size = l_labels.shape[1:3]
  (logits, rep, fp_logits), updates = model_fn(
      {'params': params, 'batch_stats': batch_stats},
      jnp.concatenate([l_images, inputs['weak']]), train=True, perturb_features=True,
      mutable=['batch_stats'], rngs={'dropout': k_fp})
  (s_logits, s_rep), updates = model_fn(
      {'params': params, 'batch_stats': updates['batch_stats']},
      jnp.concatenate(inputs['strong']), train=True, mutable=['batch_stats'])
  threshold = float(config.unimatch_threshold)
  label, confidence = _pseudo_labels(logits[n_l:], size)
  sup = segmentation.cross_entropy(common.upsample(logits[:n_l], size), l_labels,
                                   ignore_label=names.VOID)
  targets = strong_targets(inputs, label, confidence)
  strong = [masked_loss(common.upsample(s, size), *t, threshold)
            for s, t in zip(jnp.split(s_logits, 2), targets)]
  fp = masked_loss(common.upsample(fp_logits[n_l:], size), label, confidence,
                   inputs['ignored'], threshold)
  loss = (sup + STRONG_WEIGHT * (strong[0] + strong[1]) + FP_WEIGHT * fp) / 2.0
  reco, extra = jnp.zeros((), jnp.float32), {}
  if config.reco:
    s_label, s_conf, s_ignored = (jnp.concatenate(parts) for parts in zip(*targets))
    branches = [
        reco_recipe.labelled_branch(rep[:n_l], logits[:n_l], l_labels),
        reco_recipe.pseudo_labelled_branch(s_rep, s_logits, s_label,
                                           jnp.where(s_ignored, 0.0, s_conf),
                                           weak_threshold=float(config.weak_threshold))]
    reco = reco_recipe.reco_term(k_reco, branches, mesh=mesh, config=config, bank=bank)
    if bank is not None:
      reco, extra[reco_recipe.BANK] = reco
  loss = loss + reco
  kept = (confidence >= threshold) & ~inputs['ignored']
  parts = {'loss': loss, 'sup_loss': sup, 'unsup_loss': (strong[0] + strong[1]) / 2.0,
           'fp_loss': fp, 'reco_loss': reco,
           'pseudo_confidence': common.mean(confidence),
           'confident_fraction': (jnp.sum(kept) / jnp.maximum(jnp.sum(~inputs['ignored']), 1)
                                  ).astype(jnp.float32), **extra}
  return loss, (updates['batch_stats'], parts)


def train_step(state: state_lib.TrainState, batch, key: jax.Array, *, model_fn,
               mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict):
  """One UniMatch step: (state, metrics); batch as `steps.make_train_step` describes, with
  2 x batch_size unlabelled images (u, then u')."""
  k_mix, k_aug, k_reco = common.step_keys(key, state.step)
  k_mix, k_fp = jax.random.split(k_mix)
  inputs = make_inputs(model_fn, state, batch, k_mix, k_aug, config=config)
  losses = functools.partial(
      unimatch_losses, model_fn=model_fn, l_images=batch['labelled']['image'],
      l_labels=batch['labelled']['label'], inputs=inputs, k_fp=k_fp, k_reco=k_reco, mesh=mesh,
      config=config, bank=reco_recipe.bank_of(state, config))
  grads, (batch_stats, parts) = jax.grad(
      lambda p: losses(p, state.batch_stats), has_aux=True)(state.params)
  state, parts = reco_recipe.keep_bank(state, parts)
  state, metrics = common.apply_update(state, grads, batch_stats)
  return state.replace(step=state.step + 1), common.as_float32({**parts, **metrics})


def eval_variables(state: state_lib.TrainState) -> dict:
  """One network: the student is the model."""
  return state.student_variables()


METHOD = interface.Method(
    name='unimatch', branches=BRANCHES, loss_parts=LOSS_PARTS, train_step=train_step,
    eval_variables=eval_variables, check_config=check_config,
    config_overrides=config_overrides, labelled_photometric=LABELLED_PHOTOMETRIC)

"""S4GAN: a discriminator's feature matching and self-training, optionally with ReCo.

The ReCo paper's S4GAN baseline (section 4.1, Table 1): Mittal et al., "Semi-Supervised
Semantic Segmentation with High- and Low-level Consistency" (TPAMI 2019), as the authors'
`train_s4GAN.py` (sud0301/semisup-semseg) trains it. One step:
1. the labelled batch (2 x batch_size images, see BRANCHES) is split in two halves: the images
   at even positions are the supervised half, those at odd positions the "real" half, whose
   one-hot ground truth the discriminator learns to tell from predictions (the authors' second
   labelled loader). Alternate positions keep each device's two halves among its own images;
2. the student runs the supervised half, then the unlabelled images: two passes, each
   normalised with its own batch statistics (labelled first);
3. the discriminator (`models/discriminator.py`, dropout on) sees the unlabelled predictions,
   the softmax of the upsampled logits with the image, and the real half's one-hot labels
   (void pixels all zero) with its images; images are min-max scaled to [0, 1] with one
   minimum and maximum per batch, as the authors do (they scale the real images by the range
   of the supervised ones, a slip not kept: each batch uses its own);
4. the segmentation loss: cross-entropy on the supervised half
   + s4gan_fm_weight x feature matching, mean |batch mean of the discriminator's pooled
     features on the real half - the same on the predictions|,
   + s4gan_st_weight x self-training, cross-entropy of the unlabelled predictions against
     their own argmax on the images whose discriminator score exceeds s4gan_threshold (a mask
     over the batch: the other images' pixels are void), 0 at step 0 and when no image passes,
   (+ ReCo); its gradient updates the student only, with config.optimizer (the ReCo paper
   trains every baseline with the optimiser of its own method);
5. the discriminator loss (BCE(D(predictions), 0) + BCE(D(real), 1)) / 2 on the detached
   predictions, with fresh dropout, updates the discriminator only: Adam with
   s4gan_learning_rate and s4gan_betas, polynomial decay of power s4gan_poly_power over
   num_train_steps (per step, to 0, as the authors).
Both updates take gradients at the parameters the step started from, as the authors step both
optimisers at the end of an iteration. The four discriminator passes draw their dropout from
the step's first key (common.step_keys; S4GAN mixes nothing), so a resumed run draws the same.
The discriminator's parameters and Adam state live in state.extras['discriminator'] (created
by `init_extras`); the student is the evaluated model.

ReCo (config.reco), as on the other bases: on the supervised half's pass with its labels, and
on the unlabelled pass as a pseudo-labelled branch whose labels are the student's own argmax,
valid on the images S4GAN self-trains on where the confidence is >= weak_threshold (the
pseudo-labels S4GAN trusts, gated as Mean Teacher's are).
Partial labels are not supported (`check_config`).
"""
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from reco_jax import names
from reco_jax import state as state_lib
from reco_jax.losses import reco_recipe
from reco_jax.losses import segmentation
from reco_jax.methods import common
from reco_jax.methods import interface
from reco_jax.models import discriminator as discriminator_lib

# A supervised and a "real" labelled half of batch_size images each, batch_size unlabelled.
BRANCHES = (2, 1)
LOSS_PARTS = ('sup_loss', 'fm_loss', 'st_loss', 'd_loss')
EXTRAS_KEY = 'discriminator'
# PyTorch's BCELoss clamps each log to >= -100.
_LOG_FLOOR = -100.0


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for the settings S4GAN cannot train with."""
  if config.partial:
    raise ValueError(f'method=s4gan trains on fully labelled images; partial='
                     f'{config.partial} is supported by the Mean Teacher methods (cutout, '
                     'cutmix, classmix). Drop partial or choose one of those.')
  if not 0.0 <= config.s4gan_threshold <= 1.0:
    raise ValueError(f'config.s4gan_threshold must be a discriminator score in [0, 1], got '
                     f'{config.s4gan_threshold}.')
  for name in ('s4gan_fm_weight', 's4gan_st_weight'):
    if config[name] < 0:
      raise ValueError(f'config.{name} must be >= 0, got {config[name]}.')
  if config.s4gan_learning_rate <= 0:
    raise ValueError(f'config.s4gan_learning_rate must be positive, got '
                     f'{config.s4gan_learning_rate}.')
  betas = tuple(config.s4gan_betas)
  if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
    raise ValueError(f'config.s4gan_betas must be Adam\'s (beta1, beta2) in [0, 1), got '
                     f'{betas}.')


# --------------------------------------------------------------------------- discriminator


def discriminator_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """lr(step) = s4gan_learning_rate * (1 - step / num_train_steps) ** s4gan_poly_power."""
  return optax.polynomial_schedule(
      init_value=float(config.s4gan_learning_rate), end_value=0.0,
      power=float(config.s4gan_poly_power), transition_steps=int(config.num_train_steps))


def discriminator_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """torch.optim.Adam(lr, betas=s4gan_betas) on the discriminator, with its decay."""
  b1, b2 = (float(b) for b in config.s4gan_betas)
  return optax.adam(discriminator_schedule(config), b1=b1, b2=b2, eps=1e-8)


def init_extras(config: ml_collections.ConfigDict, key: jax.Array,
                state: state_lib.TrainState) -> dict:
  """{'discriminator': {'params', 'opt_state'}}: a new discriminator and its Adam state.

  Its parameter shapes depend on config.num_classes only (the pooling is global).
  """
  del state  # The discriminator does not depend on the student's initialisation.
  dummy = jnp.zeros((1, 16, 16, int(config.num_classes) + 3), jnp.float32)
  params = state_lib.initialise(discriminator_lib.Discriminator(), key, dummy)['params']
  return {EXTRAS_KEY: {'params': params,
                       'opt_state': discriminator_optimizer(config).init(params)}}


def discriminate(params, maps: jax.Array, key: jax.Array) -> discriminator_lib.DiscriminatorOutput:
  """The discriminator in training mode (dropout drawn from `key`) on [B, H, W, C + 3]."""
  return discriminator_lib.Discriminator().apply({'params': params}, maps, train=True,
                                                 rngs={'dropout': key})


def scale_images(images: jax.Array) -> jax.Array:
  """float32 [B, H, W, 3] min-max scaled to [0, 1] over the whole batch."""
  images = images.astype(jnp.float32)
  low, high = jnp.min(images), jnp.max(images)
  return (images - low) / jnp.where(high > low, high - low, 1.0)


def fake_maps(large_logits: jax.Array, images: jax.Array) -> jax.Array:
  """[B, H, W, C + 3]: softmax of logits at image size [B, H, W, C], then the scaled image."""
  prob = jax.nn.softmax(large_logits.astype(jnp.float32), axis=-1)
  return jnp.concatenate([prob, scale_images(images)], axis=-1)


def real_maps(labels: jax.Array, images: jax.Array, num_classes: int) -> jax.Array:
  """[B, H, W, C + 3]: one-hot labels int [B, H, W] (void: all zero), then the scaled image."""
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return jnp.concatenate([one_hot, scale_images(images)], axis=-1)


def binary_cross_entropy(logit: jax.Array, target: float) -> jax.Array:
  """Mean BCE(sigmoid(logit), target) over [B], each log clamped to >= -100 as BCELoss.

  From the logit, so that a saturated score gives the clamped loss, not log(0).
  """
  log_p = jnp.maximum(-jax.nn.softplus(-logit), _LOG_FLOOR)
  log_not_p = jnp.maximum(-jax.nn.softplus(logit), _LOG_FLOOR)
  return -jnp.mean(target * log_p + (1.0 - target) * log_not_p)


def discriminator_loss(params, fake: jax.Array, real: jax.Array, k_fake: jax.Array,
                       k_real: jax.Array) -> tuple[jax.Array, common.Metrics]:
  """(BCE(D(fake), 0) + BCE(D(real), 1)) / 2 and its parts; no gradient reaches `fake`.

  fake, real: [B, H, W, C + 3] from fake_maps / real_maps.
  """
  fake_out = discriminate(params, jax.lax.stop_gradient(fake), k_fake)
  real_out = discriminate(params, jax.lax.stop_gradient(real), k_real)
  loss = 0.5 * (binary_cross_entropy(fake_out.logit, 0.0) +
                binary_cross_entropy(real_out.logit, 1.0))
  return loss, {'d_loss': loss}


def update_discriminator(extras: dict, fake: jax.Array, real: jax.Array, keys,
                         step: jax.Array, *, config: ml_collections.ConfigDict
                         ) -> tuple[dict, common.Metrics]:
  """One Adam step of the discriminator on its own loss: (extras, metrics)."""
  d = extras[EXTRAS_KEY]
  (_, metrics), grads = jax.value_and_grad(discriminator_loss, has_aux=True)(
      d['params'], fake, real, *keys)
  updates, opt_state = discriminator_optimizer(config).update(grads, d['opt_state'],
                                                              d['params'])
  params = optax.apply_updates(d['params'], updates)
  metrics.update(d_learning_rate=discriminator_schedule(config)(step),
                 d_grad_norm=optax.tree.norm(grads))
  return {**extras, EXTRAS_KEY: {'params': params, 'opt_state': opt_state}}, metrics


# --------------------------------------------------------------------------- segmentation


def selection(scores: jax.Array, step: jax.Array, threshold: float) -> jax.Array:
  """bool [B]: the unlabelled images self-trained on, score > threshold and step > 0."""
  return (scores > threshold) & (jnp.asarray(step) > 0)


def self_training_loss(large_logits: jax.Array, selected: jax.Array) -> jax.Array:
  """Mean cross-entropy against the own argmax over the pixels of the selected images.

  large_logits: [B, H, W, C]; selected: bool [B]. 0 when no image is selected.
  """
  pseudo = jnp.argmax(jax.lax.stop_gradient(large_logits), axis=-1).astype(jnp.int32)
  labels = jnp.where(selected[:, None, None], pseudo, names.VOID)
  return segmentation.cross_entropy(large_logits, labels, ignore_label=names.VOID)


def feature_matching(real_features: jax.Array, fake_features: jax.Array) -> jax.Array:
  """mean |mean_B(real) - mean_B(fake)| of pooled features [B, F]: float32 scalar."""
  return jnp.mean(jnp.abs(jnp.mean(real_features, axis=0) - jnp.mean(fake_features, axis=0)))


def segmentation_loss(l_large: jax.Array, l_labels: jax.Array, u_large: jax.Array,
                      fake_out: discriminator_lib.DiscriminatorOutput,
                      real_out: discriminator_lib.DiscriminatorOutput, step: jax.Array, *,
                      config: ml_collections.ConfigDict
                      ) -> tuple[jax.Array, jax.Array, common.Metrics]:
  """The segmentation network's S4GAN loss without ReCo: (loss, selected, parts).

  l_large: supervised logits at label size [B, H, W, C]; l_labels: int32 [B, H, W];
  u_large: unlabelled logits at image size [B', H, W, C]; fake_out / real_out: the
  discriminator on the unlabelled predictions / on the real half. selected: bool [B'].
  """
  sup = segmentation.cross_entropy(l_large, l_labels, ignore_label=names.VOID)
  fm = feature_matching(real_out.features, fake_out.features)
  selected = selection(fake_out.score, step, float(config.s4gan_threshold))
  st = self_training_loss(u_large, selected)
  loss = sup + float(config.s4gan_fm_weight) * fm + float(config.s4gan_st_weight) * st
  parts = {'sup_loss': sup, 'fm_loss': fm, 'st_loss': st,
           'd_fake_score': common.mean(fake_out.score),
           'd_real_score': common.mean(real_out.score),
           'selected_fraction': common.mean(selected)}
  return loss, selected, parts


def generator_losses(l_out, u_out, *, l_labels: jax.Array, u_images: jax.Array,
                     real: jax.Array, discriminator: Callable, step: jax.Array,
                     k_reco: jax.Array, mesh: jax.sharding.Mesh,
                     config: ml_collections.ConfigDict):
  """Step 4 from the two passes' (logits, rep or None): (loss, (parts, fake maps)).

  discriminator(maps, which) -> DiscriminatorOutput, which = 'fake' | 'real' (its dropout
  key); real: the real half's maps; the fake maps come back without gradient for step 5.
  """
  (l_logits, l_rep), (u_logits, u_rep) = l_out, u_out
  l_large = common.upsample(l_logits, l_labels.shape[1:3])
  u_large = common.upsample(u_logits, u_images.shape[1:3])
  fake = fake_maps(u_large, u_images)
  loss, selected, parts = segmentation_loss(
      l_large, l_labels, u_large, discriminator(fake, 'fake'), discriminator(real, 'real'),
      step, config=config)
  reco = jnp.zeros((), jnp.float32)
  if config.reco:
    prob = jax.nn.softmax(jax.lax.stop_gradient(u_large), axis=-1)
    pseudo = jnp.argmax(prob, axis=-1).astype(jnp.int32)
    valid = selected[:, None, None] & (jnp.max(prob, axis=-1) >= float(config.weak_threshold))
    branches = [reco_recipe.labelled_branch(l_rep, l_logits, l_labels),
                reco_recipe.Branch(u_rep, u_logits, pseudo, valid)]
    reco = reco_recipe.reco_term(k_reco, branches, mesh=mesh, config=config)
  loss = loss + reco
  parts.update(loss=loss, reco_loss=reco)
  return loss, (parts, jax.lax.stop_gradient(fake))


def split_labelled(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[2B, ...] -> (even positions [B, ...], odd positions [B, ...]): supervised and real."""
  if x.shape[0] % 2:
    raise ValueError(f'method=s4gan splits the labelled batch into a supervised and a real '
                     f'half; got {x.shape[0]} images. Use a batch of 2 x config.batch_size.')
  pairs = x.reshape((x.shape[0] // 2, 2) + x.shape[1:])
  return pairs[:, 0], pairs[:, 1]


def train_step(state: state_lib.TrainState, batch, key: jax.Array, *, model_fn,
               mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict):
  """One S4GAN step: (state, metrics); batch as `steps.make_train_step` describes, with
  2 x batch_size labelled images.

  metrics (float32 scalars): loss (the segmentation network's), sup_loss, fm_loss and st_loss
  (unweighted), reco_loss, d_loss; d_fake_score / d_real_score (mean discriminator score on
  the predictions / the real half, in the segmentation pass), selected_fraction (share of
  the unlabelled images self-trained on); learning_rate, grad_norm (student),
  d_learning_rate, d_grad_norm (discriminator).
  """
  check_config(config)
  k_dropout, _, k_reco = common.step_keys(key, state.step)
  k_gen = dict(zip(('fake', 'real'), jax.random.split(jax.random.fold_in(k_dropout, 0))))
  k_disc = jax.random.split(jax.random.fold_in(k_dropout, 1))
  l_images, real_images = split_labelled(batch['labelled']['image'])
  l_labels, real_labels = split_labelled(batch['labelled']['label'])
  u_images = batch['unlabelled']['image']
  real = real_maps(real_labels, real_images, int(config.num_classes))
  d_params = jax.lax.stop_gradient(state.extras[EXTRAS_KEY]['params'])

  def student(params, batch_stats, images):
    return common.student_pass(model_fn, params, batch_stats, images, keep_rep=config.reco)

  def losses(l_out, u_out):
    return generator_losses(
        l_out, u_out, l_labels=l_labels, u_images=u_images, real=real,
        discriminator=lambda maps, which: discriminate(d_params, maps, k_gen[which]),
        step=state.step, k_reco=k_reco, mesh=mesh, config=config)

  grads, batch_stats, (metrics, fake) = common.two_pass_grads(
      student, losses, state.params, state.batch_stats, l_images, u_images,
      recompute=bool(config.recompute_labelled))
  extras, d_metrics = update_discriminator(state.extras, fake, real, k_disc, state.step,
                                           config=config)
  state, update_metrics = common.apply_update(state, grads, batch_stats)
  metrics.update(d_metrics, **update_metrics)
  return state.replace(step=state.step + 1, extras=extras), common.as_float32(metrics)


def eval_variables(state: state_lib.TrainState) -> dict:
  """The student is the model."""
  return state.student_variables()


METHOD = interface.Method(
    name='s4gan', branches=BRANCHES, loss_parts=LOSS_PARTS, train_step=train_step,
    eval_variables=eval_variables, init_extras=init_extras, check_config=check_config)

"""Mean Teacher with CutOut, CutMix or ClassMix mixing, optionally with ReCo.

The ReCo paper's semi-supervised baselines and base method (section 4.1; the reference's
`train_semisup.py` and `train_semisup_partial.py`): Mean Teacher (Tarvainen and Valpola,
2017) whose pseudo-labelled images are mixed by CutOut or CutMix (French et al., 2020) or
ClassMix (Olsson et al., 2021). One step:
1. the teacher, in training mode, labels the unlabelled images (softmax confidence, argmax);
   with partial labels the given pixels keep their label with confidence 1;
2. each pseudo-labelled image is rescaled, padded and cropped back, mixed with the next
   image of the batch (config.method), then strongly augmented;
3. the student runs the labelled batch, then the mixed one (two passes);
4. cross-entropy on the labelled pixels, confidence-weighted cross-entropy on the mixed
   ones, and ReCo on both when config.reco;
5. the optimiser updates the student, then the teacher becomes
   decay * teacher + (1 - decay) * student, with decay = min(1 - 1 / (t + 1), ema_decay) and
   t the number of earlier updates; the teacher's BatchNorm statistics are its own (from
   step 1), never averaged.
"""
import functools

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
from reco_jax.semi import augment
from reco_jax.semi import mixing
from reco_jax.semi import rescale

BRANCHES = (1, 1)
LOSS_PARTS = ('sup_loss', 'unsup_loss')


def ema_decay(step: jax.Array, max_decay: float) -> jax.Array:
  """Teacher decay min(1 - 1 / (t + 1), max_decay), t = number of earlier EMA updates.

  As the reference's EMA class: the first update (t = 0) copies the student.
  """
  t = jnp.asarray(step, jnp.float32)
  return jnp.minimum(1.0 - 1.0 / (t + 1.0), max_decay)


def update_teacher(ema_params, params, step: jax.Array, max_decay: float):
  """ema <- decay * ema + (1 - decay) * params, with decay = ema_decay(step, max_decay)."""
  decay = ema_decay(step, max_decay)
  return optax.incremental_update(params, ema_params, step_size=1.0 - decay)


def fill_partial_labels(pseudo: jax.Array, confidence: jax.Array,
                        partial: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Keeps the given ground truth of partially labelled images, pseudo-labels elsewhere.

  pseudo: int32 [B, H, W]; confidence: float32 [B, H, W]; partial: int [B, H, W] with 255
  where no label is given. Returns (labels int32, confidence float32): annotated pixels get
  their label with confidence 1, as the reference's partial-label training does.
  """
  given = partial != names.VOID
  return (jnp.where(given, partial, pseudo).astype(jnp.int32),
          jnp.where(given, 1.0, confidence).astype(jnp.float32))


def mean_teacher_targets(model_fn, state: state_lib.TrainState, unlabelled: dict,
                         k_mix: jax.Array, k_aug: jax.Array, *,
                         config: ml_collections.ConfigDict):
  """Steps 1-2: the teacher's pseudo-labels, rescaled, mixed and strongly augmented.

  unlabelled: {'image': float32 [B, H, W, 3]} (and the partial 'label' int32 [B, H, W] when
  config.partial). Returns ((images, labels, confidence) of the mixed batch, without
  gradient; the teacher's updated batch_stats; metrics).
  """
  images = unlabelled['image']
  (t_logits, _), t_updates = model_fn(state.teacher_variables(), images, train=True,
                                      mutable=['batch_stats'])
  prob = jax.nn.softmax(common.upsample(jax.lax.stop_gradient(t_logits), images.shape[1:3]),
                        axis=-1)
  confidence = jnp.max(prob, axis=-1)
  pseudo = jnp.argmax(prob, axis=-1).astype(jnp.int32)
  metrics = {'pseudo_confidence': common.mean(confidence),
             'confident_fraction': common.mean(confidence >= config.strong_threshold)}
  if config.partial:
    if 'label' not in unlabelled:
      raise ValueError("Partial-label training (config.partial != '') needs the partial "
                       "labels of the unlabelled branch as batch['unlabelled']['label'].")
    pseudo, confidence = fill_partial_labels(pseudo, confidence, unlabelled['label'])
  # As the reference, each pseudo-labelled image is randomly rescaled (the dataset's scale
  # range), padded and cropped back to its size before mixing; given partial labels go
  # along with the pseudo-labels they were merged into.
  k_scale, k_mix = jax.random.split(k_mix)
  mixed = rescale.random_scale_crop(k_scale, images, pseudo, confidence,
                                    scale_range=tuple(config.scale_range),
                                    ignore_label=names.VOID)
  mixed = mixing.mix(k_mix, *mixed, config.method, num_classes=int(config.num_classes))
  hue = float(config.hue_jitter)
  mixed = augment.strong_augment(k_aug, *mixed, hue=(-hue, hue))
  return jax.tree.map(jax.lax.stop_gradient, mixed), t_updates['batch_stats'], metrics


def semi_losses(l_out, u_out, l_labels: jax.Array, targets, k_reco: jax.Array, *,
                mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict,
                bank: dict | None = None):
  """Step 4: total loss and its parts from the two passes' (logits, rep or None).

  l_labels: int32 [B, H, W]; targets: the mixed batch's (images, labels, confidence);
  bank: the ReCo feature bank or None (`reco_recipe.bank_of`); the parts then also hold the
  updated bank.
  """
  (l_logits, l_rep), (u_logits, u_rep) = l_out, u_out
  _, m_labels, m_conf = targets
  l_large = common.upsample(l_logits, l_labels.shape[1:3])
  sup = segmentation.cross_entropy(l_large, l_labels, ignore_label=names.VOID)
  unsup = segmentation.unsupervised_loss(
      common.upsample(u_logits, m_labels.shape[1:3]), m_labels, m_conf,
      strong_threshold=float(config.strong_threshold), ignore_label=names.VOID)
  reco, extra = jnp.zeros((), jnp.float32), {}
  if config.reco:
    branches = [
        reco_recipe.labelled_branch(l_rep, l_logits, l_labels,
                                    fill_logits=l_large if config.partial else None,
                                    strong_threshold=float(config.strong_threshold)),
        reco_recipe.pseudo_labelled_branch(u_rep, u_logits, m_labels, m_conf,
                                           weak_threshold=float(config.weak_threshold))]
    reco = reco_recipe.reco_term(k_reco, branches, mesh=mesh, config=config, bank=bank)
    if bank is not None:
      reco, extra[reco_recipe.BANK] = reco
  loss = sup + unsup + reco
  return loss, {'loss': loss, 'sup_loss': sup, 'unsup_loss': unsup, 'reco_loss': reco, **extra}


def train_step(state: state_lib.TrainState, batch, key: jax.Array, *, model_fn,
               mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict):
  """One Mean Teacher step: (state, metrics); batch as `steps.make_train_step` describes."""
  k_mix, k_aug, k_reco = common.step_keys(key, state.step)
  l_images, l_labels = batch['labelled']['image'], batch['labelled']['label']
  targets, t_stats, metrics = mean_teacher_targets(model_fn, state, batch['unlabelled'],
                                                   k_mix, k_aug, config=config)
  student = functools.partial(common.student_pass, model_fn, keep_rep=config.reco)
  losses = functools.partial(semi_losses, l_labels=l_labels, targets=targets, k_reco=k_reco,
                             mesh=mesh, config=config, bank=reco_recipe.bank_of(state, config))
  grads, batch_stats, parts = common.two_pass_grads(
      student, losses, state.params, state.batch_stats, l_images, targets[0],
      recompute=bool(config.recompute_labelled))
  state, parts = reco_recipe.keep_bank(state, parts)
  state, update_metrics = common.apply_update(state, grads, batch_stats)
  # The teacher follows the updated student, with t = number of earlier updates.
  step, max_decay = state.step, float(config.ema_decay)
  state = state.replace(
      step=step + 1, ema_batch_stats=t_stats,
      ema_params=update_teacher(state.ema_params, state.params, step, max_decay))
  metrics.update(parts, **update_metrics, teacher_decay=ema_decay(step, max_decay))
  return state, common.as_float32(metrics)


def eval_variables(state: state_lib.TrainState) -> dict:
  """The teacher is the model that is evaluated and kept."""
  return state.teacher_variables()


METHOD = interface.Method(
    name='mean_teacher', branches=BRANCHES, loss_parts=LOSS_PARTS, train_step=train_step,
    eval_variables=eval_variables)

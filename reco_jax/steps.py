"""Pure step functions: supervised and Mean Teacher training steps, evaluation, prediction.

Data parallel under `jax.jit` on a ('data',) mesh: the state is replicated, batches are global
arrays sharded on their leading axis. BatchNorm then sees the global batch, mixing partners and
random numbers are those of the global batch, so results do not depend on the number of
devices. Only ReCo samples per device (shard_map inside `reco_loss_per_device`).
"""
from collections.abc import Callable
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from reco_jax import parallel
from reco_jax import state as state_lib
from reco_jax.losses import reco as reco_lib
from reco_jax.losses import segmentation
from reco_jax.models import resize
from reco_jax.semi import augment
from reco_jax.semi import mixing
from reco_jax.semi import rescale

VOID = 255
METHODS = ('supervised', 'cutout', 'cutmix', 'classmix')
# Per-batch confusion counts come from a float32 one-hot matmul, exact below 2**24 pixels.
_MAX_EXACT_PIXELS = 2**24


def _check_config(config: ml_collections.ConfigDict) -> None:
  if config.method not in METHODS:
    raise ValueError(f'config.method must be one of {METHODS}, got {config.method!r}.')
  if config.partial not in ('', 'p0', 'p1', 'p5', 'p25'):
    raise ValueError(f"config.partial must be '' or one of p0, p1, p5, p25, got "
                     f'{config.partial!r}.')


def _upsample(logits: jax.Array, size) -> jax.Array:
  """[B, h, w, C] logits -> float32 [B, H, W, C], bilinear with align_corners=True."""
  return resize.bilinear_align_corners(logits.astype(jnp.float32), tuple(size))


def per_device_concat(a: jax.Array, b: jax.Array, num_devices: int) -> jax.Array:
  """Concatenates two batch-sharded arrays so that each device's slice holds its own shards.

  a, b: [B, ...] each, sharded over `num_devices` on the leading axis. Returns [2B, ...] whose
  d-th block of 2B / num_devices rows is (a's d-th shard, b's d-th shard), which is what each
  GPU concatenates in data-parallel PyTorch (labelled first). A plain concatenate would put all
  labelled images on the first devices and all unlabelled ones on the last.
  """
  if a.shape[0] % num_devices or b.shape[0] % num_devices:
    raise ValueError(f'Per-branch batch sizes {a.shape[0]} and {b.shape[0]} must be multiples '
                     f'of the {num_devices} devices of the mesh; change config.batch_size.')
  a = a.reshape((num_devices, a.shape[0] // num_devices) + a.shape[1:])
  b = b.reshape((num_devices, b.shape[0] // num_devices) + b.shape[1:])
  return jnp.concatenate([a, b], axis=1).reshape((-1,) + a.shape[2:])


def _reco_targets(labels: jax.Array, valid: jax.Array, size) -> tuple[jax.Array, jax.Array]:
  """Labels and validity at representation size, resized like the reference (nearest).

  labels: int32 [B, H, W] (255 = void); valid: bool [B, H, W]. Returns int32 [B, h, w] with
  void mapped to class 0 (masked out by the returned bool [B, h, w] validity anyway).
  """
  labels = resize.nearest(labels, tuple(size))
  valid = resize.nearest(valid.astype(jnp.int32), tuple(size)) > 0
  valid = valid & (labels != VOID)
  return jnp.where(valid, labels, 0).astype(jnp.int32), valid


def step_keys(key: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The keys one training step uses: (mixing, strong augmentation, ReCo sampling).

  key: the run's base key; step: the state's step counter (int32 scalar).
  """
  k_mix, k_aug, k_reco = jax.random.split(jax.random.fold_in(key, step), 3)
  return k_mix, k_aug, k_reco


def fill_partial_labels(pseudo: jax.Array, confidence: jax.Array,
                        partial: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Keeps the given ground truth of partially labelled images, pseudo-labels elsewhere.

  pseudo: int32 [B, H, W]; confidence: float32 [B, H, W]; partial: int [B, H, W] with 255
  where no label is given. Returns (labels int32, confidence float32): annotated pixels get
  their label with confidence 1, as the reference's partial-label training does.
  """
  given = partial != VOID
  return (jnp.where(given, partial, pseudo).astype(jnp.int32),
          jnp.where(given, 1.0, confidence).astype(jnp.float32))


def _recomputed_labelled_grads(student: Callable, losses: Callable, state, l_images: jax.Array,
                              u_images: jax.Array):
  """Gradient of losses(labelled pass, unlabelled pass), recomputing the labelled pass.

  The same gradient as differentiating both passes at once, in an order that holds one pass's
  activations at a time: the labelled pass runs forward keeping nothing, the unlabelled pass
  runs forward and, once the losses' gradients with respect to both passes' outputs are known,
  backward; only then (a data dependency on the finished unlabelled parameter gradient
  enforces it) does the labelled pass run again, forward and backward. Costs one more labelled
  forward pass. student(params, batch_stats, images) -> (outputs, new batch_stats);
  losses(l_outputs, u_outputs) -> (loss, parts). Returns (grads, batch_stats, parts).
  """
  params = state.params
  l_out, l_stats = student(jax.lax.stop_gradient(params), state.batch_stats, l_images)
  u_out, u_vjp, u_stats = jax.vjp(lambda p: student(p, l_stats, u_images), params,
                                  has_aux=True)
  (l_cot, u_cot), parts = jax.grad(losses, argnums=(0, 1), has_aux=True)(l_out, u_out)
  (u_grads,) = u_vjp(u_cot)
  # A zero that XLA cannot fold away (x * 0 is NaN for x = inf), computed from an entry of every
  # unlabelled gradient: the recomputation cannot start before that backward pass has ended.
  # (XLA's CPU compiler drops optimisation barriers before scheduling.)
  done = sum(leaf.reshape(-1)[0] for leaf in jax.tree.leaves(u_grads))
  l_images = l_images + (0.0 * done).astype(l_images.dtype)
  _, l_vjp, _ = jax.vjp(lambda p: student(p, state.batch_stats, l_images), params,
                       has_aux=True)
  (l_grads,) = l_vjp(l_cot)
  return jax.tree.map(jnp.add, l_grads, u_grads), u_stats, parts


def _mean(x: jax.Array) -> jax.Array:
  return jnp.mean(x.astype(jnp.float32))


def make_train_step(config: ml_collections.ConfigDict, model: nn.Module,
                    mesh: jax.sharding.Mesh) -> Callable:
  """Builds the jitted training step for config.method (reco and partial variants included).

  Returns train_step(state, batch, key) -> (state, metrics), jitted with the state donated.
    state: TrainState replicated on `mesh`.
    batch: {'labelled': {'image': float32 [B, H, W, 3], 'label': int32 [B, H, W]},
            'unlabelled': {'image': float32 [B, H, W, 3]}} as global arrays sharded on 'data'
      (no 'unlabelled' for method 'supervised'; in partial-label mode (config.partial != '')
      the unlabelled branch also carries the partial 'label' int32 [B, H, W], 255 = void).
      Images are ImageNet-normalised.
    key: the run's base jax.random key, the same at every step; the step folds in state.step
      itself, so a resumed run draws the same numbers.
    metrics: dict of float32 scalars: loss, sup_loss, unsup_loss, reco_loss, learning_rate,
      grad_norm; semi-supervised methods add pseudo_confidence (mean teacher confidence on the
      unlabelled images), confident_fraction (share of those pixels >= strong_threshold) and
      teacher_decay.
  """
  _check_config(config)
  num_devices = mesh.shape[parallel.DATA_AXIS]
  schedule = state_lib.learning_rate_schedule(config)
  reco_kwargs = dict(
      strong_threshold=float(config.strong_threshold),
      temperature=float(config.reco_temperature),
      num_queries=int(config.num_queries),
      num_negatives=int(config.num_negatives),
      query_mode=config.query_mode,
      key_mode=config.key_mode,
  )

  def reco(key, rep, labels, valid, logits):
    prob = jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32), axis=-1)
    return reco_lib.reco_loss_per_device(
        key, rep.astype(jnp.float32), labels, valid, prob, mesh=mesh,
        axis_name=parallel.DATA_AXIS, average_prototypes=bool(config.average_prototypes),
        **reco_kwargs)

  def apply_optimizer(state, grads, batch_stats, metrics):
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics['learning_rate'] = schedule(state.step)
    metrics['grad_norm'] = optax.tree.norm(grads)
    return state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state), metrics

  def supervised_step(state, batch, key):
    _, _, key = step_keys(key, state.step)
    images, labels = batch['labelled']['image'], batch['labelled']['label']

    def loss_fn(params):
      (logits, rep), updates = state.apply_fn(
          {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
          mutable=['batch_stats'])
      sup = segmentation.cross_entropy(_upsample(logits, labels.shape[1:3]), labels,
                                       ignore_label=VOID)
      if config.reco:
        rlabels, rvalid = _reco_targets(labels, labels != VOID, rep.shape[1:3])
        reco_l = reco(key, rep, rlabels, rvalid, logits)
      else:
        reco_l = jnp.zeros((), jnp.float32)
      loss = sup + reco_l
      parts = {'loss': loss, 'sup_loss': sup, 'unsup_loss': jnp.zeros((), jnp.float32),
               'reco_loss': reco_l}
      return loss, (updates['batch_stats'], parts)

    grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
    state, metrics = apply_optimizer(state, grads, batch_stats, metrics)
    return state.replace(step=state.step + 1), metrics

  def semi_step(state, batch, key):
    k_mix, k_aug, k_reco = step_keys(key, state.step)
    l_images, l_labels = batch['labelled']['image'], batch['labelled']['label']
    u_images = batch['unlabelled']['image']
    u_size = u_images.shape[1:3]

    # Pseudo-labels: the teacher in training mode (batch statistics, its own running stats
    # updated), no gradient, softmax of the upsampled logits.
    (t_logits, _), t_updates = state.apply_fn(
        state.teacher_variables(), u_images, train=True, mutable=['batch_stats'])
    t_prob = jax.nn.softmax(_upsample(jax.lax.stop_gradient(t_logits), u_size), axis=-1)
    confidence = jnp.max(t_prob, axis=-1)
    pseudo = jnp.argmax(t_prob, axis=-1).astype(jnp.int32)
    metrics = {'pseudo_confidence': _mean(confidence),
               'confident_fraction': _mean(confidence >= config.strong_threshold)}
    if config.partial:
      if 'label' not in batch['unlabelled']:
        raise ValueError("Partial-label training (config.partial != '') needs the partial "
                         "labels of the unlabelled branch as batch['unlabelled']['label'].")
      pseudo, confidence = fill_partial_labels(pseudo, confidence, batch['unlabelled']['label'])

    # As the reference, each pseudo-labelled image is randomly rescaled (the dataset's scale
    # range), padded and cropped back to its size before mixing; given partial labels go
    # along with the pseudo-labels they were merged into.
    k_scale, k_mix = jax.random.split(k_mix)
    s_images, pseudo, confidence = rescale.random_scale_crop(
        k_scale, u_images, pseudo, confidence, scale_range=tuple(config.scale_range),
        ignore_label=VOID)
    m_images, m_labels, m_conf = mixing.mix(k_mix, s_images, pseudo, confidence, config.method,
                                            num_classes=int(config.num_classes))
    m_images, m_labels, m_conf = augment.strong_augment(k_aug, m_images, m_labels, m_conf)
    m_images, m_labels, m_conf = jax.tree.map(jax.lax.stop_gradient,
                                              (m_images, m_labels, m_conf))

    def student(params, batch_stats, images):
      """One student pass in training mode: ((logits, rep or None), updated batch_stats).

      Without ReCo the representations are dropped here, so that no backward pass runs
      through the representation head (with a zero cotangent) when the gradient is taken
      with jax.vjp.
      """
      (logits, rep), updates = state.apply_fn(
          {'params': params, 'batch_stats': batch_stats}, images, train=True,
          mutable=['batch_stats'])
      return (logits, rep if config.reco else None), updates['batch_stats']

    def losses(l_out, u_out):
      """Total loss and its parts from the two passes' (logits, rep)."""
      (l_logits, l_rep), (u_logits, u_rep) = l_out, u_out
      l_large = _upsample(l_logits, l_labels.shape[1:3])
      sup = segmentation.cross_entropy(l_large, l_labels, ignore_label=VOID)
      unsup = segmentation.unsupervised_loss(
          _upsample(u_logits, m_labels.shape[1:3]), m_labels, m_conf,
          strong_threshold=float(config.strong_threshold), ignore_label=VOID)
      if config.reco:
        if config.partial:
          # Partially labelled images: the student's own confident predictions fill the
          # unannotated pixels (the reference's fixed 0.97 is its strong threshold).
          l_prob = jax.nn.softmax(jax.lax.stop_gradient(l_large), axis=-1)
          given = l_labels != VOID
          l_targets = jnp.where(given, l_labels,
                                jnp.argmax(l_prob, -1).astype(jnp.int32))
          l_valid = given | (jnp.max(l_prob, -1) >= config.strong_threshold)
        else:
          l_targets, l_valid = l_labels, l_labels != VOID
        rep_size = l_rep.shape[1:3]
        rl_labels, rl_valid = _reco_targets(l_targets, l_valid, rep_size)
        ru_labels, ru_valid = _reco_targets(m_labels, m_conf >= config.weak_threshold,
                                            rep_size)
        cat = functools.partial(per_device_concat, num_devices=num_devices)
        reco_l = reco(k_reco, cat(l_rep, u_rep), cat(rl_labels, ru_labels),
                      cat(rl_valid, ru_valid), cat(l_logits, u_logits))
      else:
        reco_l = jnp.zeros((), jnp.float32)
      loss = sup + unsup + reco_l
      return loss, {'loss': loss, 'sup_loss': sup, 'unsup_loss': unsup, 'reco_loss': reco_l}

    # Two student passes, labelled first: each branch normalises with its own batch statistics
    # and both update the running statistics in turn.
    if config.recompute_labelled:
      grads, batch_stats, parts = _recomputed_labelled_grads(student, losses, state, l_images,
                                                            m_images)
    else:
      def loss_fn(params):
        l_out, l_stats = student(params, state.batch_stats, l_images)
        u_out, u_stats = student(params, l_stats, m_images)
        loss, parts = losses(l_out, u_out)
        return loss, (u_stats, parts)

      grads, (batch_stats, parts) = jax.grad(loss_fn, has_aux=True)(state.params)
    metrics.update(parts)
    state, metrics = apply_optimizer(state, grads, batch_stats, metrics)
    # Teacher update after the student's, with t = number of earlier updates.
    metrics['teacher_decay'] = state_lib.ema_decay(state.step, float(config.ema_decay))
    ema_params = state_lib.update_teacher(state.ema_params, state.params, state.step,
                                          float(config.ema_decay))
    state = state.replace(step=state.step + 1, ema_params=ema_params,
                          ema_batch_stats=t_updates['batch_stats'])
    return state, metrics

  step_fn = supervised_step if config.method == 'supervised' else semi_step

  def train_step(state, batch, key):
    state, metrics = step_fn(state, batch, key)
    return state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

  replicated = parallel.replicated(mesh)
  return jax.jit(train_step, donate_argnums=0, out_shardings=(replicated, replicated))


def predict(model: nn.Module, variables, images: jax.Array, size) -> jax.Array:
  """Class map of `images` at `size` (eval mode; bilinear align_corners=True upsampling).

  variables: {'params', 'batch_stats'}; images: float32 [B, H, W, 3] ImageNet-normalised;
  size: (H', W'). Returns int32 [B, H', W'].
  """
  logits, _ = model.apply(variables, images, train=False)
  return jnp.argmax(_upsample(logits, size), axis=-1).astype(jnp.int32)


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
  """The evaluated model: the teacher for semi-supervised methods, the student otherwise."""
  if config.method == 'supervised':
    return state.student_variables()
  return state.teacher_variables()

"""UniMatch (method=unimatch): its views, feature perturbation, losses, optimiser and step.

A tiny DeepLabV3+ on 33x33 images with three classes, as the other step tests.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import toy
from configs import voc
from reco_jax import config_checks
from reco_jax import defaults
from reco_jax import names
from reco_jax import parallel
from reco_jax import state as state_lib
from reco_jax.losses import reco_recipe
from reco_jax.losses import segmentation
from reco_jax.methods import common
from reco_jax.methods import unimatch
from reco_jax.semi import augment
from reco_jax.semi import mixing
import helpers
import tolerances

NUM_CLASSES, SIZE, BATCH = 3, 33, 4


def tiny_config(**overrides):
  config = defaults.base_config()
  config.update(dict(num_classes=NUM_CLASSES, batch_size=BATCH, method='unimatch', reco=False,
                     num_train_steps=100, scale_range=(0.75, 1.25),
                     # Low thresholds: an untrained 3-class model is rarely 95 % sure.
                     unimatch_threshold=0.4, strong_threshold=0.5, weak_threshold=0.4,
                     num_queries=8, num_negatives=16))
  config.optimizer.update(unimatch.config_overrides(toy.get_config())['optimizer'])
  config.update(overrides)
  return config


def make_batch(seed=0):
  """BATCH labelled images whose label shows in their colour, 2 x BATCH unlabelled."""
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(3 * BATCH, SIZE, SIZE, 3)).astype(np.float32)
  coarse = rng.integers(0, NUM_CLASSES, (3 * BATCH, 3, 3))
  labels = np.repeat(np.repeat(coarse, 11, axis=1), 11, axis=2).astype(np.int32)
  images[..., 0] += 2.0 * labels
  labels[:BATCH, :2] = names.VOID
  return {'labelled': {'image': images[:BATCH], 'label': labels[:BATCH]},
          'unlabelled': {'image': images[BATCH:]}}


@pytest.fixture(scope='module')
def model_and_state():
  model = helpers.tiny_model()
  state = state_lib.create_train_state(tiny_config(), model, jax.random.key(0),
                                       (SIZE, SIZE, 3))
  return model, jax.tree.map(np.asarray, state)


def test_config_overrides_are_the_authors_settings_and_flags_still_win():
  config = voc.get_config('labels=92,method=unimatch,split=pseudoseg')
  assert config.optimizer.learning_rate == 0.001 and config.optimizer.head_lr_multiplier == 10
  assert config.optimizer.weight_decay == 1e-4 and not config.optimizer.nesterov
  assert config.optimizer.decay_epochs == 0 and config.optimizer.min_learning_rate == 0
  assert config.batch_size == 8 and tuple(config.scale_range) == (0.5, 2.0)
  assert config.num_train_steps == 80 * ((10582 - 92) // 8) and config.unimatch_threshold == 0.95
  # The other methods keep the ReCo paper's settings.
  classmix = voc.get_config('labels=92')
  assert classmix.optimizer.learning_rate == 2.5e-3 and classmix.optimizer.nesterov
  assert classmix.optimizer.head_lr_multiplier == 1 and classmix.batch_size == 10
  # The toy keeps its rate and length; its network starts from scratch (no 10x).
  small = toy.get_config('method=unimatch')
  assert small.optimizer.learning_rate == toy.get_config().optimizer.learning_rate
  assert small.optimizer.head_lr_multiplier == 1 and small.optimizer.weight_decay == 1e-4
  assert small.num_train_steps == toy.get_config().num_train_steps
  config_checks.validate_config(small)
  with pytest.raises(ValueError, match='backbone=deeplabv3p'):
    config_checks.validate_config(toy.get_config('method=unimatch,backbone=deeplabv2'))


def test_head_moves_at_ten_times_the_backbone_rate():
  config = tiny_config()
  config.optimizer.update(learning_rate=0.01, head_lr_multiplier=10.0, weight_decay=0.0,
                          momentum=0.0)
  params = {'backbone': {'w': jnp.ones(3)}, 'classifier_out': {'w': jnp.ones(2)}}
  tx = state_lib.make_optimizer(config)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  np.testing.assert_allclose(updates['backbone']['w'], -0.01, rtol=1e-6)
  np.testing.assert_allclose(updates['classifier_out']['w'], -0.1, rtol=1e-6)


def test_the_rate_decays_every_step_without_a_floor():
  config = tiny_config(num_train_steps=1000)
  config.optimizer.update(learning_rate=0.01, min_learning_rate=0.0, decay_epochs=0)
  schedule = state_lib.learning_rate_schedule(config)
  # float32 pow: a relative error of a few ulps of |log(1 - t / T)| (test_state.POW_RTOL).
  for t in (0, 1, 7, 990):
    assert float(schedule(t)) == pytest.approx(0.01 * (1 - t / 1000) ** 0.9,
                                               rel=tolerances.ONE_PASS)


def test_box_masks_follow_the_authors_draw():
  boxes = np.asarray(mixing.unimatch_box_mask(jax.random.key(0), 4000, 40, 60))
  on = boxes.any(axis=(1, 2))
  assert 0.47 < on.mean() < 0.53
  area = boxes[on].sum(axis=(1, 2)) / (40 * 60)
  # int() of the sides shaves a little off the drawn area fraction, uniform in [0.02, 0.4].
  assert area.min() > 0.01 and area.max() <= 0.4 and 0.19 < area.mean() < 0.22
  for box in boxes[on][:50]:  # each a rectangle inside the image
    rows, cols = np.nonzero(box)
    assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()


def test_both_strong_views_get_their_own_boxes_and_colour_draws(model_and_state):
  model, state = model_and_state
  config = tiny_config()
  batch = jax.tree.map(jnp.asarray, make_batch())

  def views(state, batch):  # one program each for the step's inputs and the views by hand
    inputs = unimatch.make_inputs(model.apply, state, batch, jax.random.key(1),
                                  jax.random.key(2), config=config)
    weak = unimatch.weak_views(jax.random.split(jax.random.key(1))[0],
                               batch['unlabelled']['image'], scale_range=config.scale_range)[0]
    return inputs, weak, unimatch.strong_views(jax.random.key(2), weak, hue=config.hue_jitter)[0]

  inputs, weak, v1 = helpers.jit_as_steps(views)(state, batch)
  box1, box2 = (np.asarray(b) for b in inputs['boxes'])
  assert not np.array_equal(box1, box2) and (box1.any() or box2.any())
  s1, s2 = (np.asarray(s) for s in inputs['strong'])
  outside = ~(box1 | box2)
  assert np.abs(s1 - s2)[outside].max() > 0.1
  # Inside its box a view shows the CutMix source's strong view of the same index.
  v1 = np.asarray(v1)
  np.testing.assert_array_equal(s1[box1], v1[BATCH:][box1])
  np.testing.assert_array_equal(s1[~box1], v1[:BATCH][~box1])
  np.testing.assert_array_equal(inputs['weak'], weak[:BATCH])


def test_grey_views_have_equal_channels():
  images = jax.random.normal(jax.random.key(0), (6, 9, 9, 3))
  zeros = jnp.zeros((6, 9, 9))
  grey, _, _ = jax.jit(functools.partial(
      augment.strong_augment, jitter_prob=0.0, blur_prob=0.0, flip_prob=0.0, grey_prob=1.0))(
          jax.random.key(1), images, zeros.astype(jnp.int32), zeros)
  rgb = np.asarray(augment.normalization.denormalize(grey))
  np.testing.assert_allclose(rgb[..., 0], rgb[..., 1], atol=1e-5)
  np.testing.assert_allclose(rgb[..., 1], rgb[..., 2], atol=1e-5)


def test_feature_perturbation_drops_whole_channels_and_the_weak_pass_none(model_and_state):
  model, state = model_and_state
  images = jnp.asarray(make_batch()['labelled']['image'])
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  captured = lambda mdl, _: isinstance(mdl, nn.Dropout) or mdl.name == 'backbone'
  (logits, rep, perturbed), inter = model.apply(
      variables, images, train=False, perturb_features=True, rngs={'dropout': jax.random.key(3)},
      capture_intermediates=captured, mutable=['intermediates'])
  clean_logits, clean_rep = model.apply(variables, images, train=False)
  # In eval mode BatchNorm uses running statistics: the clean half is the plain pass.
  np.testing.assert_allclose(logits, clean_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(rep, clean_rep, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(perturbed) - np.asarray(clean_logits)).max() > 1e-3
  inter = dict(inter['intermediates'])
  features = inter.pop('backbone')['__call__'][0]
  outputs = jax.tree.leaves(inter)
  assert len(outputs) == 2  # layer1 and layer4
  for out, name in zip(outputs, ('layer1', 'layer4')):
    out, feat = np.asarray(out), np.asarray(features[name])
    # Each (image, channel) is either zero everywhere or the feature map times 2.
    dropped = np.all(out == 0, axis=(1, 2))
    kept = np.all(np.isclose(out, 2 * feat, rtol=1e-6, atol=1e-6), axis=(1, 2))
    assert np.all(dropped | kept), name
    assert 0.2 < dropped.mean() < 0.8, name


def test_masked_loss_counts_confident_pixels_over_every_kept_pixel():
  logits = jnp.zeros((1, 2, 2, 2))
  labels = jnp.zeros((1, 2, 2), jnp.int32)
  confidence = jnp.array([[[0.99, 0.2], [0.96, 0.99]]])
  ignored = jnp.array([[[False, False], [False, True]]])
  # Two confident kept pixels of CE log 2 each, over three kept pixels.
  got = unimatch.masked_loss(logits, labels, confidence, ignored, 0.95)
  assert float(got) == pytest.approx(2 * np.log(2) / 3, rel=1e-6)
  assert float(unimatch.masked_loss(logits, labels, confidence, jnp.ones_like(ignored),
                                    0.95)) == 0.0


def test_the_step_is_its_pieces_composed_by_hand():
  """With ReCo and the 10x head of VOC: the golden case unimatch+reco@1's step."""
  reco = True
  config = helpers.tiny_config('unimatch', reco)
  assert config.optimizer.head_lr_multiplier == 10.0
  model, _ = helpers.shared_model_and_state()
  mesh = parallel.make_mesh(jax.devices()[:1])
  state = helpers.step_state(config, mesh)
  initial = helpers.host(state)
  batch = make_batch()
  key = jax.random.key(7)
  x, y = jnp.asarray(batch['labelled']['image']), jnp.asarray(batch['labelled']['label'])
  u = jnp.asarray(batch['unlabelled']['image'])

  def composed(state):
    k_mix, k_aug, k_reco = common.step_keys(key, state.step)
    k_mix, k_fp = jax.random.split(k_mix)
    k_weak, k_box = jax.random.split(k_mix)
    weak, ignored = unimatch.weak_views(k_weak, u, scale_range=config.scale_range)
    s1, s2 = unimatch.strong_views(k_aug, weak, hue=config.hue_jitter)
    box1, box2 = (mixing.unimatch_box_mask(k, BATCH, SIZE, SIZE) for k in jax.random.split(k_box))
    u_s1 = jnp.where(box1[..., None], s1[BATCH:], s1[:BATCH])
    u_s2 = jnp.where(box2[..., None], s2[BATCH:], s2[:BATCH])
    mix_logits, _ = model.apply(state.student_variables(), weak[BATCH:], train=False)
    mix_prob = jax.nn.softmax(common.upsample(mix_logits, (SIZE, SIZE)), -1)

    def loss_fn(params):
      (logits, rep, fp), upd = model.apply(
          {'params': params, 'batch_stats': state.batch_stats},
          jnp.concatenate([x, weak[:BATCH]]), train=True, perturb_features=True,
          mutable=['batch_stats'], rngs={'dropout': k_fp})
      (s_logits, s_rep), upd = model.apply({'params': params, **upd},
                                           jnp.concatenate([u_s1, u_s2]), train=True,
                                           mutable=['batch_stats'])
      prob = jax.nn.softmax(common.upsample(jax.lax.stop_gradient(logits[BATCH:]),
                                            (SIZE, SIZE)), -1)
      label, conf = jnp.argmax(prob, -1), jnp.max(prob, -1)
      sup = segmentation.cross_entropy(common.upsample(logits[:BATCH], (SIZE, SIZE)), y)
      terms = []
      targets = []
      for box, out in zip((box1, box2), jnp.split(s_logits, 2)):
        t = (jnp.where(box, jnp.argmax(mix_prob, -1), label),
             jnp.where(box, jnp.max(mix_prob, -1), conf),
             jnp.where(box, ignored[BATCH:], ignored[:BATCH]))
        targets.append(t)
        terms.append(unimatch.masked_loss(common.upsample(out, (SIZE, SIZE)), *t, 0.4))
      fp_loss = unimatch.masked_loss(common.upsample(fp[BATCH:], (SIZE, SIZE)), label, conf,
                                     ignored[:BATCH], 0.4)
      loss = (sup + 0.25 * terms[0] + 0.25 * terms[1] + 0.5 * fp_loss) / 2
      if reco:
        s_label, s_conf, s_ign = (jnp.concatenate(p) for p in zip(*targets))
        loss += reco_recipe.reco_term(k_reco, [
            reco_recipe.labelled_branch(rep[:BATCH], logits[:BATCH], y),
            reco_recipe.pseudo_labelled_branch(s_rep, s_logits, s_label,
                                               jnp.where(s_ign, 0.0, s_conf),
                                               weak_threshold=0.4)], mesh=mesh, config=config)
      return loss, (upd['batch_stats'], sup)

    grads, (stats, sup) = jax.grad(loss_fn, has_aux=True)(state.params)
    new, _ = common.apply_update(state, grads, stats)
    return new.params, new.batch_stats, sup

  params, stats, sup = helpers.jit_as_steps(composed)(state)
  sharded = parallel.shard_batch(mesh, batch)
  step = helpers.compile_step(config, model, mesh, state, sharded, key)
  new_state, metrics = step(state, sharded, key)
  assert float(metrics['sup_loss']) == pytest.approx(float(sup), rel=1e-5)
  assert float(metrics['unsup_loss']) > 0 and float(metrics['fp_loss']) > 0
  assert float(metrics['reco_loss']) > 0
  tolerances.assert_updates_close(new_state.params, params, initial.params, steps=1)
  tolerances.assert_updates_close(new_state.batch_stats, stats, initial.batch_stats, steps=1)
  assert int(new_state.step) == 1


def test_one_and_four_devices_agree():
  """The views, boxes, dropout and CutMix sources are the global batch's on any mesh."""
  config = helpers.tiny_config('unimatch')  # on 1 device, the golden case unimatch@1's step
  model, _ = helpers.shared_model_and_state()
  batch = make_batch()
  key = jax.random.key(5)
  results = []
  for n in (1, 4):
    mesh = parallel.make_mesh(jax.devices()[:n])
    state = helpers.step_state(config, mesh)
    initial = helpers.host(state)
    sharded = parallel.shard_batch(mesh, batch)
    step = helpers.compile_step(config, model, mesh, state, sharded, key)
    history = []
    for _ in range(2):
      state, metrics = step(state, sharded, key)
      history.append({k: float(v) for k, v in metrics.items()})
    results.append((jax.tree.map(np.asarray, state), history))
  (state1, hist1), (state4, hist4) = results
  assert hist1[1]['unsup_loss'] > 0 and hist1[1]['fp_loss'] > 0
  tolerances.assert_histories_close(hist4, hist1)
  for part in ('params', 'batch_stats', 'opt_state'):
    tolerances.assert_updates_close(getattr(state4, part), getattr(state1, part),
                                    getattr(initial, part), steps=2, err_msg=part)

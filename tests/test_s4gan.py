"""S4GAN: the discriminator, the losses against hand computations, the step's two updates,
1 vs 4 devices, configs, and an exact resume of a toy run.

The step tests use a one-conv segmentation net (with BatchNorm) on 16x16 images, so that they
compile in seconds; the DeepLab step is pinned in tests/test_golden_steps.py.
"""
import functools
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import cityscapes, sun, toy, voc
from reco_jax import config_checks
from reco_jax import inputs
from reco_jax import parallel
from reco_jax import results
from reco_jax import state as state_lib
from reco_jax import steps
from reco_jax import train
from reco_jax.losses import reco_recipe
from reco_jax.methods import common
from reco_jax.methods import s4gan
from reco_jax.models import deeplab
from reco_jax.models import discriminator as discriminator_lib
from helpers import event_tags, host, s4gan_batch, s4gan_config, trainer_compilations
from helpers import toy_run_config
import tolerances

NUM_CLASSES, SIZE, BATCH = 3, 16, 4


class TinySegNet(nn.Module):
  """A strided conv + BatchNorm + ReLU, then 1x1 classifier and representation heads."""
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3), strides=(2, 2))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    return nn.Conv(self.num_classes, (1, 1), name='classifier')(x), nn.Conv(4, (1, 1))(x)


@functools.cache
def initial_state():
  config = s4gan_config()
  return jax.tree.map(np.asarray, state_lib.create_train_state(
      config, TinySegNet(), jax.random.key(0), (SIZE, SIZE, 3)))


def state_on(mesh):
  return jax.device_put(jax.tree.map(jnp.asarray, initial_state()), parallel.replicated(mesh))


_COMPILED = {}


def compiled_step(config, mesh, state, batch, key):
  cache_key = (config.to_json(), mesh.size)
  if cache_key not in _COMPILED:
    _COMPILED[cache_key] = steps.make_train_step(config, TinySegNet(), mesh).lower(
        state, batch, key).compile()
  return _COMPILED[cache_key]


def max_abs_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


# --------------------------------------------------------------------------- discriminator


def test_discriminator_scores_pools_and_drops_whole_channels():
  d = discriminator_lib.Discriminator()
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, NUM_CLASSES + 3))
  params = jax.jit(functools.partial(d.init, train=False))(jax.random.key(1), x)['params']
  assert [params[f'conv{i}']['kernel'].shape for i in (1, 2, 3, 4)] == [
      (4, 4, 6, 64), (4, 4, 64, 128), (4, 4, 128, 256), (4, 4, 256, 512)]
  assert params['fc']['kernel'].shape == (512, 1)

  def run(train, key):
    return jax.jit(lambda p, k: d.apply({'params': p}, x, train=train, rngs={'dropout': k},
                                        capture_intermediates=True, mutable=['intermediates']))(
        params, key)

  out, inter = run(False, jax.random.key(2))
  assert out.score.shape == (2,) and out.logit.shape == (2,) and out.features.shape == (2, 512)
  assert np.all((np.asarray(out.score) > 0) & (np.asarray(out.score) < 1))
  np.testing.assert_allclose(out.score, jax.nn.sigmoid(out.logit), rtol=1e-6)
  # 4x4 convolutions with stride 2 and padding 1 halve the size: 16 -> 8 -> 4 -> 2 -> 1.
  assert [inter['intermediates'][f'conv{i}']['__call__'][0].shape[1] for i in (1, 2, 3, 4)] == [
      8, 4, 2, 1]
  conv4 = inter['intermediates']['conv4']['__call__'][0]
  np.testing.assert_allclose(out.features, jnp.mean(nn.leaky_relu(conv4, 0.2), (1, 2)),
                             rtol=1e-5, atol=1e-6)
  # Training mode: Dropout2d, each (image, channel) map is either all zero or doubled.
  kept = np.asarray(inter['intermediates']['dropout1']['__call__'][0])
  train_out, train_inter = run(True, jax.random.key(2))
  dropped = np.asarray(train_inter['intermediates']['dropout1']['__call__'][0])
  zero = np.all(dropped == 0, axis=(1, 2))
  np.testing.assert_allclose(np.where(zero[:, None, None], 0, 2 * kept), dropped, rtol=1e-6)
  assert 0.3 < zero.mean() < 0.7 and not np.all(kept == 0, axis=(1, 2)).any()
  other, _ = run(True, jax.random.key(3))
  assert max_abs_diff(train_out.features, other.features) > 1e-4


def test_discriminator_inputs_scale_images_and_one_hot_labels():
  images = np.array([[[[-2.0, 0.0, 1.0]]], [[[2.0, 0.5, -1.0]]]], np.float32)  # [2,1,1,3]
  labels = np.array([[[1]], [[255]]], np.int32)
  real = np.asarray(s4gan.real_maps(labels, images, NUM_CLASSES))
  np.testing.assert_allclose(real[..., :3], [[[[0, 1, 0]]], [[[0, 0, 0]]]])
  # One minimum and maximum for the whole batch.
  np.testing.assert_allclose(real[..., 3:], (images + 2.0) / 4.0, rtol=1e-6)
  logits = np.array([[[[0.0, 1.0, 2.0]]], [[[3.0, 3.0, 3.0]]]], np.float32)
  fake = np.asarray(s4gan.fake_maps(logits, images))
  np.testing.assert_allclose(fake[..., :3], np.exp(log_softmax(logits)), rtol=1e-6)
  np.testing.assert_allclose(fake[..., 3:], real[..., 3:])


def test_selection_mask_on_a_hand_built_batch():
  scores = jnp.array([0.2, 0.61, 0.6, 0.95])
  np.testing.assert_array_equal(s4gan.selection(scores, jnp.asarray(3), 0.6),
                                [False, True, False, True])
  # No self-training at step 0, as the authors.
  np.testing.assert_array_equal(s4gan.selection(scores, jnp.asarray(0), 0.6), [False] * 4)
  logits = np.random.default_rng(0).normal(size=(4, 3, 3, NUM_CLASSES)).astype(np.float32)
  assert float(s4gan.self_training_loss(logits, jnp.zeros(4, bool))) == 0.0


# --------------------------------------------------------------------------- losses


def test_segmentation_loss_equals_a_hand_computation():
  config = s4gan_config()
  rng = np.random.default_rng(1)
  l_large = rng.normal(size=(2, 4, 5, NUM_CLASSES)).astype(np.float32)
  l_labels = rng.integers(0, NUM_CLASSES, (2, 4, 5)).astype(np.int32)
  l_labels[0, 0] = 255
  u_large = 2 * rng.normal(size=(3, 4, 5, NUM_CLASSES)).astype(np.float32)
  scores = np.array([0.7, 0.3, 0.9], np.float32)
  fake = discriminator_lib.DiscriminatorOutput(
      jnp.asarray(scores), jnp.log(scores / (1 - scores)),
      jnp.asarray(rng.normal(size=(3, 512)), jnp.float32))
  real = discriminator_lib.DiscriminatorOutput(
      jnp.full((2,), 0.5), jnp.zeros(2), jnp.asarray(rng.normal(size=(2, 512)), jnp.float32))

  valid = l_labels != 255
  ce = -np.take_along_axis(log_softmax(l_large), np.where(valid, l_labels, 0)[..., None],
                           -1)[..., 0][valid].mean()
  fm = np.abs(np.asarray(real.features).mean(0) - np.asarray(fake.features).mean(0)).mean()
  chosen = u_large[[0, 2]]  # scores above 0.6
  st = -np.max(log_softmax(chosen), -1).mean()  # CE against the own argmax
  for step, want in ((5, ce + 0.1 * fm + 1.0 * st), (0, ce + 0.1 * fm)):
    loss, selected, parts = s4gan.segmentation_loss(l_large, l_labels, u_large, fake, real,
                                                    jnp.asarray(step), config=config)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(parts['sup_loss']) == pytest.approx(ce, rel=1e-5)
    assert float(parts['fm_loss']) == pytest.approx(fm, rel=1e-5)
    assert float(parts['st_loss']) == pytest.approx(st if step else 0.0, rel=1e-5)
    np.testing.assert_array_equal(selected, [True, False, True] if step else [False] * 3)
  assert fm > 0.01 and st > 0.01


def test_discriminator_loss_is_bce_and_passes_no_gradient_to_the_student():
  logits = jnp.array([-3.0, 0.5, 200.0])
  p = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
  with np.errstate(divide='ignore'):
    # BCELoss clamps log(1 - 1) to -100.
    assert float(s4gan.binary_cross_entropy(logits, 0.0)) == pytest.approx(
        -np.mean(np.maximum(np.log(1 - p), -100)), rel=1e-5)
  assert float(s4gan.binary_cross_entropy(logits, 1.0)) == pytest.approx(
      -np.mean(np.log(p)), rel=1e-5)
  assert np.all(np.isfinite(jax.grad(s4gan.binary_cross_entropy)(logits, 0.0)))

  init = initial_state()
  d_params = init.extras['discriminator']['params']
  batch = s4gan_batch()
  real = s4gan.real_maps(batch['labelled']['label'][:BATCH], batch['labelled']['image'][:BATCH],
                         NUM_CLASSES)
  keys = tuple(jax.random.split(jax.random.key(4)))

  def fake_of(params):
    (logits, _), _ = TinySegNet().apply({'params': params, 'batch_stats': init.batch_stats},
                                        batch['unlabelled']['image'], train=True,
                                        mutable=['batch_stats'])
    return s4gan.fake_maps(common.upsample(logits, (SIZE, SIZE)), batch['unlabelled']['image'])

  def run(student, d):
    loss_fn = lambda student, d: s4gan.discriminator_loss(d, fake_of(student), real, *keys)[0]
    fake_out = s4gan.discriminate(d, fake_of(student), keys[0])
    real_out = s4gan.discriminate(d, real, keys[1])
    return jax.value_and_grad(loss_fn, argnums=(0, 1))(student, d), fake_out, real_out

  (loss, (g_student, g_d)), fake_out, real_out = jax.jit(run)(init.params, d_params)
  p_fake, p_real = (np.asarray(o.score, np.float64) for o in (fake_out, real_out))
  assert float(loss) == pytest.approx(
      (-np.log(1 - p_fake).mean() - np.log(p_real).mean()) / 2, rel=1e-5)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(g_student))
  assert float(optax.tree.norm(g_d)) > 1e-4


# --------------------------------------------------------------------------- steps


def composed_step(config, state, batch, key):
  """The step from its public pieces: both networks' gradients at the old parameters."""
  k_dropout, _, _ = common.step_keys(key, state.step)
  k_fake, k_real = jax.random.split(jax.random.fold_in(k_dropout, 0))
  k_disc = jax.random.split(jax.random.fold_in(k_dropout, 1))
  lab = batch['labelled']
  l_img, l_lab, r_img, r_lab = (lab['image'][0::2], lab['label'][0::2], lab['image'][1::2],
                                lab['label'][1::2])
  u_img = batch['unlabelled']['image']
  d = state.extras['discriminator']
  real = s4gan.real_maps(r_lab, r_img, NUM_CLASSES)

  def loss_fn(params):
    variables = {'params': params, 'batch_stats': state.batch_stats}
    (l_logits, _), upd = TinySegNet().apply(variables, l_img, train=True,
                                            mutable=['batch_stats'])
    (u_logits, _), upd = TinySegNet().apply({'params': params, **upd}, u_img, train=True,
                                            mutable=['batch_stats'])
    u_large = common.upsample(u_logits, (SIZE, SIZE))
    fake = s4gan.fake_maps(u_large, u_img)
    loss, _, parts = s4gan.segmentation_loss(
        common.upsample(l_logits, (SIZE, SIZE)), l_lab, u_large,
        s4gan.discriminate(d['params'], fake, k_fake),
        s4gan.discriminate(d['params'], real, k_real), state.step, config=config)
    return loss, (upd['batch_stats'], fake, parts)

  grads, (stats, fake, parts) = jax.grad(loss_fn, has_aux=True)(state.params)
  new, _ = common.apply_update(state, grads, stats)
  d_grads = jax.grad(lambda p: s4gan.discriminator_loss(p, fake, real, *k_disc)[0])(
      d['params'])
  tx = optax.adam(lambda t: 1e-4 * (1 - t / 100) ** 0.9, b1=0.9, b2=0.99)
  updates, d_opt = tx.update(d_grads, d['opt_state'], d['params'])
  return (new.params, stats, new.opt_state, optax.apply_updates(d['params'], updates), d_opt,
          parts)


def test_step_updates_each_network_with_its_own_loss():
  config = s4gan_config(s4gan_threshold=0.0)  # every image self-trained on after step 0
  mesh = parallel.make_mesh(jax.devices()[:1])
  state = state_on(mesh)
  batch = parallel.shard_batch(mesh, s4gan_batch())
  key = jax.random.key(7)
  want = jax.jit(functools.partial(composed_step, config))(state, batch, key)
  before = jax.tree.map(np.asarray, state)
  step = compiled_step(config, mesh, state, batch, key)
  new, metrics = step(state, batch, key)
  params, stats, opt_state, d_params, d_opt, parts = want
  for name, value in parts.items():
    assert float(metrics[name]) == pytest.approx(float(value), rel=1e-5, abs=1e-7), name
  got, d_before = new.extras['discriminator'], before.extras['discriminator']
  for tree, expected, start in ((new.params, params, before.params),
                                (new.batch_stats, stats, before.batch_stats),
                                (new.opt_state, opt_state, before.opt_state),
                                (got['params'], d_params, d_before['params']),
                                (got['opt_state'], d_opt, d_before['opt_state'])):
    tolerances.assert_updates_close(tree, expected, start, steps=1)
  assert max_abs_diff(before.params, new.params) > 1e-4
  assert max_abs_diff(before.extras['discriminator']['params'], got['params']) > 1e-6
  assert float(metrics['st_loss']) == 0 and float(metrics['selected_fraction']) == 0
  assert float(metrics['loss']) == pytest.approx(
      float(metrics['sup_loss']) + 0.1 * float(metrics['fm_loss']), rel=1e-6)
  assert float(metrics['d_learning_rate']) == pytest.approx(1e-4)
  # From step 1 the images the discriminator passes are self-trained on.
  new, metrics = step(new, batch, key)
  assert float(metrics['selected_fraction']) == 1 and float(metrics['st_loss']) > 0
  assert float(metrics['loss']) == pytest.approx(
      float(metrics['sup_loss']) + 0.1 * float(metrics['fm_loss']) + float(metrics['st_loss']),
      rel=1e-6)
  assert float(metrics['d_learning_rate']) == pytest.approx(1e-4 * 0.99 ** 0.9, rel=1e-6)
  assert steps.eval_variables(config, new)['params'] is new.params


def test_one_and_four_devices_agree():
  config = s4gan_config(s4gan_threshold=0.0)
  np_batch, key = s4gan_batch(), jax.random.key(7)
  results = []
  for n in (1, 4):
    mesh = parallel.make_mesh(jax.devices()[:n])
    state, batch = state_on(mesh), parallel.shard_batch(mesh, np_batch)
    step = compiled_step(config, mesh, state, batch, key)
    history = []
    for _ in range(2):
      state, metrics = step(state, batch, key)
      history.append({k: float(v) for k, v in metrics.items()})
    assert len(state.extras['discriminator']['params']['fc']['kernel'].sharding.device_set) == n
    results.append((jax.tree.map(np.asarray, state), history))
  (state1, hist1), (state4, hist4) = results
  tolerances.assert_histories_close(hist4, hist1)
  assert hist1[1]['st_loss'] > 0
  start = jax.tree.map(np.asarray, initial_state())
  for part in ('params', 'batch_stats', 'opt_state', 'extras'):
    tolerances.assert_updates_close(getattr(state4, part), getattr(state1, part),
                                    getattr(start, part), steps=len(hist1), err_msg=part)


def test_reco_adds_the_labelled_pass_and_the_self_trained_images():
  """ReCo on the supervised pass, plus the unlabelled pass on the selected images only."""
  config = s4gan_config(reco=True, s4gan_threshold=0.5)
  mesh = parallel.make_mesh(jax.devices()[:1])
  rng = np.random.default_rng(2)
  l_out = (jnp.asarray(rng.normal(size=(2, 8, 8, NUM_CLASSES)), jnp.float32),
           jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32))
  u_out = (jnp.asarray(3 * rng.normal(size=(2, 8, 8, NUM_CLASSES)), jnp.float32),
           jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32))
  labels = jnp.asarray(np.repeat(rng.integers(0, NUM_CLASSES, (2, 16, 1)), 16, 2), jnp.int32)
  u_images = jnp.asarray(rng.normal(size=(2, SIZE, SIZE, 3)), jnp.float32)
  real = s4gan.real_maps(labels, u_images, NUM_CLASSES)
  key = jax.random.key(5)

  def discriminator(maps, which):  # the first unlabelled image passes, the second not
    scores = jnp.array([0.9, 0.1]) if which == 'fake' else jnp.array([0.5, 0.5])
    return discriminator_lib.DiscriminatorOutput(scores, jnp.zeros(2), maps[:, 0, 0, :1] *
                                                 jnp.ones((1, 512)))

  def both(step):
    loss, (parts, _) = s4gan.generator_losses(
        l_out, u_out, l_labels=labels, u_images=u_images, real=real,
        discriminator=discriminator, step=step, k_reco=key, mesh=mesh, config=config)
    prob = jax.nn.softmax(common.upsample(u_out[0], (SIZE, SIZE)), -1)
    valid = (jnp.max(prob, -1) >= config.weak_threshold) & (jnp.arange(2) == 0)[:, None, None]
    branches = [reco_recipe.labelled_branch(l_out[1], l_out[0], labels),
                reco_recipe.Branch(u_out[1], u_out[0], jnp.argmax(prob, -1), valid)]
    want = reco_recipe.reco_term(key, branches, mesh=mesh, config=config)
    alone = reco_recipe.reco_term(key, branches[:1], mesh=mesh, config=config)
    return loss, parts, want, alone

  for step in (0, 1):
    loss, parts, want, alone = jax.jit(both)(jnp.asarray(step))
    reco = float(parts['reco_loss'])
    assert reco > 0 and float(loss) == pytest.approx(
        float(parts['sup_loss']) + 0.1 * float(parts['fm_loss']) +
        float(parts['st_loss']) + reco, rel=1e-6)
    # At step 0 nothing is self-trained on, and ReCo sees the labelled pass alone.
    assert reco == pytest.approx(float(want if step else alone), rel=1e-5)
  assert abs(float(want) - float(alone)) > 1e-4


# --------------------------------------------------------------------------- configs and runs


def test_configs_take_method_s4gan_with_their_thresholds():
  for module, threshold in ((voc, 0.6), (cityscapes, 0.7), (sun, 0.6), (toy, 0.6)):
    c = module.get_config('method=s4gan,labels=20')
    assert c.method == 's4gan' and c.s4gan_threshold == threshold
    assert (c.s4gan_fm_weight, c.s4gan_st_weight, c.s4gan_learning_rate) == (0.1, 1.0, 1e-4)
    assert inputs.branch_batches(c) == (2 * c.batch_size, c.batch_size)
    c.batch_size = c.eval_batch_size = 4  # a multiple of the 4 test devices
    config_checks.validate_config(c)


def test_unsupported_s4gan_settings_are_clear_errors():
  c = voc.get_config('method=s4gan,partial=p1')
  with pytest.raises(ValueError, match='partial=p1.*cutout, cutmix, classmix'):
    config_checks.validate_config(c)
  c = voc.get_config('method=s4gan')
  c.s4gan_threshold = 1.5
  with pytest.raises(ValueError, match='s4gan_threshold'):
    config_checks.validate_config(c)


@pytest.fixture
def compilation_cache(jax_cache_dir):
  with trainer_compilations(jax_cache_dir):
    yield


def test_resumed_s4gan_run_matches_uninterrupted_run(toy_data_dir, tmp_path,
                                                     compilation_cache, monkeypatch):
  """The toy run of tests/test_train.py with S4GAN, on the one-conv net (compiles fast)."""
  config = toy_run_config(toy_data_dir, method='s4gan', reco=False, num_image_summaries=0)
  monkeypatch.setattr(deeplab, 'model_from_config', lambda c: TinySegNet(c.num_classes))
  full = tmp_path / 'full'
  state = train.train_and_evaluate(config, str(full))
  assert float(np.asarray(host(state.step))) == 4
  killed = tmp_path / 'killed'
  shutil.copytree(full, killed)
  shutil.rmtree(killed / 'checkpoints' / '4')
  for events in killed.glob('events.out.tfevents.*'):
    events.unlink()
  resumed = train.train_and_evaluate(config, str(killed))
  assert event_tags(killed)['train/d_loss'] == [3, 4]
  for name in ('params', 'batch_stats', 'opt_state', 'extras'):
    a, b = host(getattr(state, name)), host(getattr(resumed, name))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(x, y, rtol=0, atol=1e-6, err_msg=name)
  # The discriminator took its 4 Adam steps, 2 of them after the restore.
  adam = host(resumed.extras['discriminator']['opt_state'])[0]
  assert int(adam.count) == 4 and float(np.abs(adam.mu['fc']['kernel']).max()) > 0


def test_results_show_an_s4gan_row_below_supervised():
  runs = [results.RunResult(f'runs/{method}{seed}', 'reco_voc', 'deeplabv3p', 60, '', method,
                            False, seed, 100, 100, {100: miou})
          for method, seed, miou in (('classmix', 0, 0.5), ('s4gan', 0, 0.4), ('s4gan', 1, 0.5),
                                     ('supervised', 0, 0.3))]
  rows = [line.split(' |')[0] for line in results.to_markdown(runs).splitlines()
          if line.startswith('| ') and 'method' not in line][:3]
  assert rows == ['| Supervised', '| S4GAN', '| ClassMix']
  assert '| S4GAN | 45.00 (40.00-50.00; 2 seeds) |' in results.to_markdown(runs)

"""Optimiser, learning-rate schedule, teacher EMA and train-state creation."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from reco_jax import parallel
from reco_jax import state as state_lib
from reco_jax.methods import mean_teacher
import helpers
import tolerances


def make_config(**overrides):
  config = ml_collections.ConfigDict({
      'num_train_steps': 40000,
      'ema_decay': 0.99,
      'init_weights': '',
      'optimizer': {'learning_rate': 2.5e-3, 'momentum': 0.9, 'nesterov': True,
                    'weight_decay': 5e-4, 'poly_power': 0.9, 'min_learning_rate': 1e-6},
  })
  config.update(overrides)
  return config


class TinyNet(nn.Module):
  """A conv + BatchNorm net, enough to exercise params and batch_stats."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return x, x


# float32 x ** 0.9 = exp(0.9 log x): log x carries a few ulps of |log x| (up to 5.3 at the
# last epoch), which exp turns into that relative error; the vector unit picks the
# approximation. 10 ulps of 5.3 is 6e-6.
POW_RTOL = tolerances.ONE_PASS


def reference_poly_lr(step, total=40000, base=2.5e-3, power=0.9, floor=1e-6, epochs=200):
  # The reference steps PolyLR once per epoch; 40k iterations = 200 epochs x 200 iterations.
  epoch = step * epochs // total
  return max(base * (1 - epoch / epochs) ** power, floor)


@pytest.mark.parametrize('step', [0, 1, 199, 200, 201, 399, 400, 20000, 39799, 39800, 39999])
def test_schedule_is_reference_per_epoch_poly_decay(step):
  schedule = state_lib.learning_rate_schedule(make_config())
  np.testing.assert_allclose(float(schedule(step)), reference_poly_lr(step), rtol=POW_RTOL)


def test_schedule_is_constant_within_an_epoch_and_floored():
  schedule = state_lib.learning_rate_schedule(make_config())
  assert float(schedule(0)) == float(schedule(199)) == pytest.approx(2.5e-3)
  assert float(schedule(200)) < float(schedule(199))
  # Past the end of training the rate sits on the floor instead of going NaN.
  assert float(schedule(40000)) == pytest.approx(1e-6)
  assert float(schedule(50000)) == pytest.approx(1e-6)
  config = make_config()
  config.optimizer.min_learning_rate = 1e-3
  schedule = state_lib.learning_rate_schedule(config)
  assert float(schedule(39999)) == pytest.approx(1e-3)


def test_short_runs_decay_every_step():
  schedule = state_lib.learning_rate_schedule(make_config(num_train_steps=50))
  for step in (0, 1, 17, 49):
    np.testing.assert_allclose(float(schedule(step)), 2.5e-3 * (1 - step / 50) ** 0.9,
                               rtol=POW_RTOL)


def test_optimizer_matches_pytorch_sgd_nesterov_with_weight_decay():
  """torch.optim.SGD(lr, momentum, nesterov=True, weight_decay) written out in NumPy."""
  config = make_config(num_train_steps=4)  # every step its own epoch: lr changes each step
  tx = state_lib.make_optimizer(config)
  rng = np.random.default_rng(0)
  params = {'w': rng.normal(size=(3, 2)).astype(np.float32),
            'b': rng.normal(size=(2,)).astype(np.float32)}
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
           for _ in range(3)]
  jparams = jax.tree.map(jnp.asarray, params)
  opt_state = tx.init(jparams)
  ref = {k: v.astype(np.float64) for k, v in params.items()}
  buf = {}
  wd, mom = 5e-4, 0.9
  for t, g in enumerate(grads):
    updates, opt_state = tx.update(jax.tree.map(jnp.asarray, g), opt_state, jparams)
    jparams = optax.apply_updates(jparams, updates)
    lr = 2.5e-3 * (1 - t / 4) ** 0.9
    for k in ref:
      d = g[k] + wd * ref[k]  # decay enters the gradient, before momentum
      buf[k] = d if t == 0 else mom * buf[k] + d
      ref[k] = ref[k] - lr * (d + mom * buf[k])
  for k in ref:
    np.testing.assert_allclose(np.asarray(jparams[k]), ref[k], rtol=1e-5, atol=1e-7)
  # A decoupled decay (AdamW style, or decay after momentum) would differ by more than that.
  assert np.abs(ref['w'] - params['w']).max() > 1e-4


def test_ema_decay_values_follow_reference():
  # EMA.update uses min(1 - 1/(t+1), alpha) with t = number of earlier updates (0 first).
  for t, want in [(0, 0.0), (1, 0.5), (2, 2 / 3), (9, 0.9), (99, 0.99), (100, 0.99),
                  (5000, 0.99)]:
    assert float(mean_teacher.ema_decay(jnp.asarray(t), 0.99)) == pytest.approx(want, abs=1e-7)


def test_teacher_update_formula():
  ema = {'w': jnp.array([1.0, 2.0])}
  student = {'w': jnp.array([3.0, -2.0])}
  # First update copies the student.
  update = lambda t: mean_teacher.update_teacher(ema, student, jnp.asarray(t), 0.99)['w']
  np.testing.assert_allclose(update(0), [3.0, -2.0])
  # t = 3: decay 0.75 -> 0.75 * ema + 0.25 * student.
  np.testing.assert_allclose(update(3), [1.5, 1.0], rtol=1e-6)
  np.testing.assert_allclose(update(500), [1.02, 1.96], rtol=1e-6)


def test_create_train_state_teacher_is_a_separate_copy_of_student():
  mesh = parallel.make_mesh(jax.devices()[:4])
  state = state_lib.create_train_state(make_config(), TinyNet(), jax.random.key(0),
                                       (8, 8, 3), mesh=mesh)
  assert int(state.step) == 0
  assert set(state.batch_stats['BatchNorm_0']) == {'mean', 'var'}
  for a, b in zip(jax.tree.leaves((state.params, state.batch_stats)),
                  jax.tree.leaves((state.ema_params, state.ema_batch_stats))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    pointer = lambda x: x.addressable_shards[0].data.unsafe_buffer_pointer()
    assert pointer(a) != pointer(b)
    assert a.sharding.is_fully_replicated and len(a.sharding.device_set) == 4
  # Separate buffers: donating the state must not donate one buffer twice.
  step = jax.jit(lambda s: s.replace(step=s.step + 1), donate_argnums=0)
  assert int(step(state).step) == 1


def test_create_train_state_loads_initial_weights(monkeypatch):
  convert = pytest.importorskip('reco_jax.models.convert')
  seen = {}

  def fake_load(path, variables):
    seen['path'] = path
    return jax.tree.map(lambda x: x + 1.0, variables)

  monkeypatch.setattr(convert, 'load_initial_weights', fake_load)
  config = make_config(init_weights='weights.safetensors')
  fresh = state_lib.create_train_state(make_config(), TinyNet(), jax.random.key(0), (8, 8, 3))
  state = state_lib.create_train_state(config, TinyNet(), jax.random.key(0), (8, 8, 3))
  assert seen['path'] == 'weights.safetensors'
  for a, b, e in zip(jax.tree.leaves(fresh.params), jax.tree.leaves(state.params),
                     jax.tree.leaves(state.ema_params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a) + 1.0, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(e), np.asarray(b))


def test_bad_image_shape_is_rejected():
  with pytest.raises(ValueError, match='image_shape'):
    state_lib.create_train_state(make_config(), TinyNet(), jax.random.key(0), (8, 8))


@pytest.mark.parametrize('extras', ['', 's4gan', 'reco_bank'])
def test_abstract_train_state_is_the_structure_of_the_real_one_and_compiles_nothing(extras):
  # A restore target: the same tree, static fields, shapes, dtypes and shardings as
  # create_train_state's state, for methods that keep extras (S4GAN's discriminator, ReCo's
  # feature bank) too.
  model, config = TinyNet(), make_config()
  if extras == 's4gan':
    config = helpers.s4gan_config()
  elif extras == 'reco_bank':
    model = helpers.tiny_model()
    config = helpers.tiny_config('supervised', reco=True, reco_bank_size=16, reco_bank_writes=8)
  mesh = parallel.make_mesh(jax.devices()[:4])
  real = state_lib.create_train_state(config, model, jax.random.key(0), (9, 9, 3), mesh=mesh)
  compiles = []

  def listen(event, duration, **kwargs):
    del duration, kwargs
    if event == '/jax/core/compile/backend_compile_duration':
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    abstract = state_lib.abstract_train_state(config, model, (9, 9, 3), mesh)
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert not compiles
  # Equal trees up to the static optimiser and schedule (functions made anew for each state).
  paths = lambda state: [path for path, _ in jax.tree_util.tree_leaves_with_path(state)]
  assert paths(abstract) == paths(real)
  assert abstract.apply_fn == real.apply_fn
  assert bool(real.extras) == bool(extras)
  for a, r in zip(jax.tree.leaves(abstract), jax.tree.leaves(real), strict=True):
    assert isinstance(a, jax.ShapeDtypeStruct)
    assert (a.shape, a.dtype, a.sharding) == (r.shape, r.dtype, r.sharding)

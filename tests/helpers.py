"""What several test modules share: tiny configs, models and batches, compiled steps, the toy
run config, event and checkpoint readers, a compilation cache and a SIGTERM injector.

Fixtures live in conftest.py; test modules import this module and never each other.
"""
import contextlib
import functools
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf

from configs import toy
from reco_jax import class_stats
from reco_jax import defaults
from reco_jax import methods
from reco_jax import parallel
from reco_jax import relations
from reco_jax import state as state_lib
from reco_jax import steps
from reco_jax.methods import contrastive_pretraining
from reco_jax.models import deeplab

# ------------------------------------------------------------------ the tiny DeepLabV3+ steps

NUM_CLASSES = 3
SIZE = 33
BATCH = 4


def tiny_config(method='classmix', reco=False, partial='', recompute_labelled=False,
                **overrides) -> ml_collections.ConfigDict:
  """The step tests' config, with which tests/golden_steps.json was written.

  The method's own optimiser comes with it (`config_overrides`: UniMatch's, with a 10x head as
  on VOC). Tests that ask for the same config share one compiled step (`compile_step`).
  """
  config = defaults.base_config()
  config.update(dict(
      num_classes=NUM_CLASSES, batch_size=BATCH, method=method, reco=reco, partial=partial,
      recompute_labelled=recompute_labelled, num_train_steps=100, scale_range=(0.75, 1.25),
      # Low thresholds: an untrained 3-class model is rarely 97 % sure of anything.
      strong_threshold=0.5, weak_threshold=0.4, num_queries=8, num_negatives=16,
      # An untrained discriminator scores about 0.5: some images are self-trained on.
      s4gan_threshold=0.4,
      # UniMatch's threshold as low, for the same reason.
      unimatch_threshold=0.4))
  method_overrides = methods.get(method).config_overrides
  if method_overrides:
    config.optimizer.update(method_overrides(defaults.base_config())['optimizer'])
  config.update(overrides)
  return config


def tiny_model():
  return deeplab.DeepLabV3Plus(num_classes=NUM_CLASSES, backbone='resnet_tiny', rep_dim=8,
                               aspp_dim=8, low_level_dim=4, head_dim=8)


def make_batch(seed=0, partial=False, batch=BATCH, supervised=False):
  """Images whose label shows in their colour, so that training can fit it."""
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(2 * batch, SIZE, SIZE, 3)).astype(np.float32)
  coarse = rng.integers(0, NUM_CLASSES, (2 * batch, 3, 3))
  labels = np.repeat(np.repeat(coarse, 11, axis=1), 11, axis=2).astype(np.int32)
  images[..., 0] += 2.0 * labels
  labels[:batch, :2] = 255  # some void
  out = {'labelled': {'image': images[:batch], 'label': labels[:batch]},
         'unlabelled': {'image': images[batch:]}}
  if partial:
    part = np.full_like(labels[batch:], 255)
    part[:, ::5, ::5] = labels[batch:, ::5, ::5]
    out['unlabelled']['label'] = part
  if supervised:
    out.pop('unlabelled')
  return out


_COMPILED = {}
_OPTIMIZERS = {}


# The CPU code generation users run, with which tests/golden_steps.json was written (the suite
# compiles the rest with the legacy emitters, see conftest.py).
PRODUCTION_EMITTERS = {'xla_cpu_use_fusion_emitters': True}


def uncached_step(config, model, mesh, state, batch, key, method=None,
                  compiler_options=PRODUCTION_EMITTERS):
  """The train step compiled every call anew, by default as users' programs are
  (`PRODUCTION_EMITTERS`); `compiler_options=None` gives the suite's emitters (`suite_step`)."""
  return steps.make_train_step(config, model, mesh, method=method).lower(
      state, batch, key).compile(compiler_options)


def jit_as_steps(fn, **kwargs):
  """jax.jit(fn) compiled as `compile_step` compiles steps: for what a test compares with them
  to a few ulps."""
  return jax.jit(fn, compiler_options=PRODUCTION_EMITTERS, **kwargs)


def suite_step(config, model, mesh, state, batch, key):
  """The train step compiled by the suite's cheaper emitters (conftest.py), for a test that
  compares it with itself or with programs compiled the same way, never with golden values."""
  return uncached_step(config, model, mesh, state, batch, key, compiler_options=None)


def compile_step(config, model, mesh, state, batch, key):
  """The compiled train step, shared by the tests (and test files) that use the same setup.

  States from `step_state` for equal configs have equal structures, so their steps compile
  once in a process.
  """
  cache_key = (config.to_json(), tuple(d.id for d in mesh.devices.flat),
               jax.tree.structure((state, batch)),
               tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(batch)))
  if cache_key not in _COMPILED:
    _COMPILED[cache_key] = uncached_step(config, model, mesh, state, batch, key)
  return _COMPILED[cache_key]


def step_state(config, mesh):
  """A fresh state of `config`'s step on `mesh`, from the shared initial student and teacher.

  The method's extras are initialised (e.g. S4GAN's discriminator, with a key of their own),
  and the optimiser is config's, with a zero optimiser state; its object is shared by equal
  configs. The learning-rate schedule that the metrics report stays the shared state's (the
  golden values were written so).
  """
  _, initial = shared_model_and_state()
  initial = host(initial)
  init_extras = methods.get(config.method).init_extras
  if init_extras is not None:
    initial = initial.replace(extras=host(init_extras(
        config, jax.random.fold_in(jax.random.key(0), 1), initial)))
  state = jax.device_put(jax.tree.map(jnp.asarray, initial), parallel.replicated(mesh))
  name = config.to_json()
  if name not in _OPTIMIZERS:
    _OPTIMIZERS[name] = state_lib.make_optimizer(config)
  tx = _OPTIMIZERS[name]
  return state.replace(tx=tx, opt_state=tx.init(state.params))


def max_abs_diff(a, b):
  return max(float(jnp.max(jnp.abs(jnp.asarray(x) - jnp.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def leaves_close(a, b, **kw):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


@functools.cache
def shared_model_and_state():
  """One tiny model and its initial state (on one device) for all step tests."""
  model = tiny_model()
  state = state_lib.create_train_state(tiny_config(), model, jax.random.key(0),
                                       (SIZE, SIZE, 3), mesh=parallel.make_mesh(jax.devices()[:1]))
  return model, state


def run_steps(step, state, batch, key, num_steps):
  history = []
  for _ in range(num_steps):
    state, metrics = step(state, batch, key)
    history.append({k: float(v) for k, v in metrics.items()})
  return state, history


def check_training(config, init, state, history):
  """What every method must show after a few steps from `init` (a numpy copy of the state)."""
  for m in history:
    assert all(np.isfinite(v) for v in m.values()), m
    assert m['loss'] == pytest.approx(m['sup_loss'] + m['unsup_loss'] + m['reco_loss'],
                                      rel=1e-5)
  assert int(state.step) == len(history)
  base = config.optimizer.learning_rate
  assert [m['learning_rate'] for m in history] == pytest.approx(
      [base * (1 - t / 100) ** 0.9 for t in range(len(history))], rel=1e-5)
  assert max_abs_diff(init.params, state.params) > 1e-4
  assert max_abs_diff(init.batch_stats, state.batch_stats) > 1e-4
  if config.reco:
    assert all(m['reco_loss'] > 0 for m in history)
  else:
    assert all(m['reco_loss'] == 0 for m in history)
  if config.method == 'supervised':
    assert all(m['unsup_loss'] == 0 for m in history)
    return
  assert all(m['unsup_loss'] > 0 for m in history)
  assert all(0 < m['pseudo_confidence'] <= 1 and 0 <= m['confident_fraction'] <= 1
             for m in history)
  assert [m['teacher_decay'] for m in history] == pytest.approx(
      [min(1 - 1 / (t + 1), 0.99) for t in range(len(history))])
  # The teacher is an average of past students, not the student.
  assert max_abs_diff(state.params, state.ema_params) > 1e-5
  assert max_abs_diff(init.ema_params, state.ema_params) > 1e-4
  # It ran in training mode, so its own running statistics moved.
  assert max_abs_diff(init.ema_batch_stats, state.ema_batch_stats) > 1e-4


# ------------------------------------------------------------------ the one-conv S4GAN steps

S4GAN_CLASSES, S4GAN_SIZE, S4GAN_BATCH = 3, 16, 4


def s4gan_config(**overrides) -> ml_collections.ConfigDict:
  config = defaults.base_config()
  config.update(dict(method='s4gan', reco=False, num_classes=S4GAN_CLASSES, batch_size=S4GAN_BATCH,
                     num_train_steps=100, weak_threshold=0.4, strong_threshold=0.5,
                     num_queries=8, num_negatives=16))
  config.update(overrides)
  return config


def s4gan_batch(seed=0):
  """2 x S4GAN_BATCH labelled images (labels show in the colour, some void) and S4GAN_BATCH
  unlabelled."""
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(3 * S4GAN_BATCH, S4GAN_SIZE, S4GAN_SIZE, 3)).astype(np.float32)
  labels = np.repeat(np.repeat(rng.integers(0, S4GAN_CLASSES, (3 * S4GAN_BATCH, 2, 2)), 8, 1), 8, 2)
  images[..., 0] += 2.0 * labels
  labels = labels.astype(np.int32)
  labels[:, :3] = 255
  return {'labelled': {'image': images[:2 * S4GAN_BATCH], 'label': labels[:2 * S4GAN_BATCH]},
          'unlabelled': {'image': images[2 * S4GAN_BATCH:]}}


# ------------------------------------------------------------------ end-to-end toy runs

TOY_STEPS = 4


def toy_run_config(data_dir, **overrides):
  """The runlocal toy config for end-to-end runs of TOY_STEPS steps on reco_toy/tiny."""
  c = toy.get_config('runlocal')
  c.data_dir = data_dir
  c.num_train_steps = TOY_STEPS
  c.log_every_steps = 1
  c.eval_every_steps = TOY_STEPS
  c.checkpoint_every_steps = 2
  c.keep_checkpoints = 2
  for k, v in overrides.items():
    c[k] = v
  return c


def event_tags(workdir):
  """{tag: sorted steps} over all TensorBoard event files directly in `workdir`."""
  tags = {}
  for path in sorted(pathlib.Path(workdir).glob('events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        tags.setdefault(value.tag, set()).add(event.step)
  return {k: sorted(v) for k, v in tags.items()}


def logged_scalars(workdir, prefix='eval/'):
  """{tag: {step: float32 value}} of the scalars under `prefix` in `workdir`'s event files."""
  values = {}
  for path in sorted(pathlib.Path(workdir).glob('events.out.tfevents.*')):
    for record in tf.data.TFRecordDataset(str(path)):
      event = tf.compat.v1.Event.FromString(record.numpy())
      for v in event.summary.value:
        value = tf.make_ndarray(v.tensor) if v.HasField('tensor') else None
        if v.tag.startswith(prefix) and value is not None and value.size == 1:
          values.setdefault(v.tag, {})[event.step] = value.item()
  return values


def host(tree):
  return jax.tree.map(np.asarray, tree)


def abstract(tree):
  """ShapeDtypeStructs (with shardings) of a pytree of arrays: an orbax restore target."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def restore(directory, step, like):
  with ocp.CheckpointManager(directory) as manager:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract(like)))


@contextlib.contextmanager
def persistent_compilation_cache(directory, min_compile_secs: float):
  """A persistent XLA cache in `directory` while the context lasts, then none again.

  Runs of the same step in one test module then compile once.
  """
  from jax._src import compilation_cache as cc
  reset = getattr(cc, 'reset_cache', lambda: None)
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes')
  saved = {name: getattr(jax.config, name) for name in names}
  jax.config.update(names[0], str(directory))
  jax.config.update(names[1], min_compile_secs)
  jax.config.update(names[2], 0)
  reset()  # An earlier compile in this process may have initialised it disabled.
  try:
    yield
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)
    reset()


_TRAINER_BUILDS: dict[str, dict] = {}  # reused_trainer_compilations' cache, by function name


@contextlib.contextmanager
def reused_trainer_compilations():
  """While the context lasts, trainer runs of equal configs in this process share their
  models, optimisers, jitted steps and evaluation functions, and the structure of their state,
  so that a rerun (a resumed, killed or preempted copy of a run) neither traces nor compiles
  them again.

  Only the building of pure functions of the config is cached (each keyed by the config's
  JSON): what a run computes, restores and writes is unchanged. A model is shared, not only an
  equal one, because the state holds its bound `apply`, which jit compares by identity. The
  cache outlives the context, so that the modules sharing a session's run (`toy_run`) reuse
  what it compiled.
  """
  def memo(fn, key):
    cache = _TRAINER_BUILDS.setdefault(fn.__name__, {})

    @functools.wraps(fn)
    def cached(*args, **kwargs):
      k = key(*args, **kwargs)
      if k not in cache:
        cache[k] = fn(*args, **kwargs)
      return cache[k]
    return cached

  name = lambda config: config.to_json_best_effort(sort_keys=True)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(methods, 'stage_model', memo(
        methods.stage_model, lambda stage: (stage.kind, name(stage.config))))
    patch.setattr(steps, 'make_train_step', memo(
        steps.make_train_step, lambda config, model, mesh, method=None: (
            name(config), model, mesh, getattr(method, 'name', None))))
    patch.setattr(steps, 'make_eval_step', memo(
        steps.make_eval_step, lambda config, model, mesh=None: (name(config), model, mesh)))
    patch.setattr(state_lib, 'learning_rate_schedule', memo(
        state_lib.learning_rate_schedule, name))
    patch.setattr(state_lib, 'make_optimizer', memo(
        state_lib.make_optimizer, lambda config, schedule=None: (name(config), schedule)))
    patch.setattr(state_lib, 'abstract_train_state', memo(
        state_lib.abstract_train_state, lambda config, model, image_shape, mesh=None: (
            name(config), model, tuple(image_shape), mesh)))
    # The evaluation's jitted functions of a model (shared, as above), and the class
    # statistics' step of such a function.
    patch.setattr(relations, 'make_query_maps_fn', memo(relations.make_query_maps_fn,
                                                        lambda model: model))
    patch.setattr(relations, 'embeddings_fn', memo(
        relations.embeddings_fn, lambda model, embeddings=relations.EMBEDDINGS: (
            model, tuple(embeddings))))
    patch.setattr(contrastive_pretraining, 'probe_embedding', memo(
        contrastive_pretraining.probe_embedding, lambda network: network))
    patch.setattr(class_stats, 'make_stats_step', memo(
        class_stats.make_stats_step, lambda embed, num_classes, mesh=None: (
            embed, num_classes, mesh)))
    yield


@contextlib.contextmanager
def trainer_compilations(cache_dir):
  """A persistent XLA cache in `cache_dir` and reused trainer compilations, while it lasts."""
  with persistent_compilation_cache(cache_dir, 0.0), reused_trainer_compilations():
    yield


def sigterm_at_call(monkeypatch, call: int):
  """Makes the process receive a real SIGTERM during its `call`-th training step."""
  import signal  # pylint: disable=g-import-not-at-top
  make_train_step = steps.make_train_step
  calls = []

  def make(*args, **kwargs):
    step_fn = make_train_step(*args, **kwargs)

    def step(state, batch, key):
      calls.append(1)
      if len(calls) == call:
        os.kill(os.getpid(), signal.SIGTERM)
      return step_fn(state, batch, key)
    return step

  monkeypatch.setattr(steps, 'make_train_step', make)


def reco_with_samples(key, rep, labels, valid, prob, *, return_samples=False,
                      prototype_stats=None, bank=None, **sampling):
  """ReCo's loss and its sampled indices (`reco._reco`), with the options as keywords."""
  from reco_jax.losses import reco  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=protected-access
  return reco._reco(key, rep, labels, valid, prob, reco.Sampling(**sampling),
                    prototype_stats=prototype_stats, bank=bank, return_samples=return_samples)

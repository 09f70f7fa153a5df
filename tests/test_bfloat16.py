"""precision=bf16: bfloat16 convolutions; float32 state, losses, ReCo sampling, discriminator.

Steps of the tiny DeepLabV3+ (ClassMix + ReCo as in helpers.py, S4GAN + ReCo as in
helpers.py), the model built from the config as training builds it
(config.model.dtype = 'bfloat16').
"""
import functools

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from reco_jax import parallel
from reco_jax import state as state_lib
from reco_jax import steps
from reco_jax.losses import reco as reco_lib
from reco_jax.methods import contrastive_pretraining
from reco_jax.models import deeplab
import helpers

STATE_PARTS = ('params', 'batch_stats', 'opt_state', 'ema_params', 'ema_batch_stats')
# Operations that must never see a bfloat16 operand: the softmaxes, log-softmaxes and
# normalisations (exp, log, rsqrt, ...) of the losses, pseudo-labels and ReCo, and the sorts,
# cumulative sums and argmaxes of ReCo's sampling and the pseudo-labels.
FLOAT32_ONLY = ('exp', 'exp2', 'log', 'log1p', 'logistic', 'rsqrt', 'sqrt', 'pow', 'tanh',
                'erf', 'sort', 'cumsum', 'cumlogsumexp', 'argmax', 'argmin', 'reduce_max')
TINY_BF16_MODEL = dict(name='deeplabv3p', backbone='resnet_tiny', output_stride=16, rep_dim=8,
                       aspp_dim=8, low_level_dim=4, head_dim=8, dtype='bfloat16')


def bf16_config(method='classmix'):
  """A tiny config of `method` (with ReCo) whose model computes in bfloat16."""
  if method == 's4gan':
    config = helpers.s4gan_config(reco=True)
  else:
    config = helpers.tiny_config(method=method, reco=True)
  config.model = dict(TINY_BF16_MODEL)
  return config


def make_batch(method='classmix'):
  return helpers.s4gan_batch() if method == 's4gan' else helpers.make_batch()


@functools.cache
def model_and_state(method='classmix'):
  config = bf16_config(method)
  model = deeplab.model_from_config(config)
  mesh = parallel.make_mesh(jax.devices()[:1])
  size = make_batch(method)['labelled']['image'].shape[1]
  state = state_lib.create_train_state(config, model, jax.random.key(0), (size, size, 3),
                                       mesh=mesh)
  return model, state, mesh


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax_core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax_core.Jaxpr):
        yield item


def equations(jaxpr, inside=()):
  """(equation, names of the primitives it is nested in) for every equation, recursively."""
  for eqn in jaxpr.eqns:
    yield eqn, inside
    for sub in _sub_jaxprs(eqn):
      yield from equations(sub, inside + (eqn.primitive.name,))


def dtypes(variables):
  return [v.aval.dtype for v in variables if hasattr(v.aval, 'dtype')]


def float32_leaves(tree):
  """Whether every floating leaf of `tree` is float32 (and there is one); counters are ints."""
  floating = [x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return bool(floating) and all(d == jnp.float32 for d in floating)


def test_bf16_model_is_built_from_the_config_with_float32_state():
  model, state, _ = model_and_state()
  assert model.dtype == jnp.bfloat16
  for part in STATE_PARTS:
    assert float32_leaves(getattr(state, part)), part


@pytest.mark.parametrize('method', ['classmix', 's4gan'])
def test_bf16_step_convolves_in_bf16_and_keeps_the_rest_float32(method):
  model, state, mesh = model_and_state(method)
  batch = parallel.shard_batch(mesh, make_batch(method))
  step = steps.make_train_step(bf16_config(method), model, mesh)
  closed, (new_state, metrics) = jax.make_jaxpr(step, return_shape=True)(
      state, batch, jax.random.key(1))
  convs, reco_equations, shard_maps = {}, 0, []
  for eqn, inside in equations(closed.jaxpr):
    ins = dtypes(eqn.invars)
    if eqn.primitive.name == 'conv_general_dilated':
      # The module the convolution belongs to, e.g. 'transpose(jvp(DeepLabV3Plus))/aspp/...'.
      stack = str(eqn.source_info.name_stack)
      network = next(n for n in ('DeepLabV3Plus', 'Discriminator', '') if n in stack)
      convs.setdefault(network, []).append(ins)
    if eqn.primitive.name in FLOAT32_ONLY:
      assert jnp.bfloat16 not in ins, (eqn.primitive.name, inside)
    if eqn.primitive.name == 'shard_map':
      shard_maps.append(ins)
    if 'shard_map' in inside:
      reco_equations += 1
      assert jnp.bfloat16 not in ins + dtypes(eqn.outvars), (eqn.primitive.name, inside)
  # The segmentation network (teacher or discriminator input pass, both student passes,
  # forward and backward) in bfloat16; S4GAN's discriminator in float32; nothing else.
  assert len(convs['DeepLabV3Plus']) > 100
  assert all(ins == [jnp.bfloat16] * 2 for ins in convs['DeepLabV3Plus'])
  if method == 's4gan':
    assert convs['Discriminator'] and all(
        ins == [jnp.float32] * 2 for ins in convs['Discriminator'])
  assert set(convs) == {'DeepLabV3Plus'} | ({'Discriminator'} if method == 's4gan' else set())
  # ReCo's shard_map: every input float32 (rep, prob, ...), nothing in it bfloat16.
  assert shard_maps and reco_equations > 0
  assert all(jnp.bfloat16 not in ins for ins in shard_maps), shard_maps
  for part in STATE_PARTS:
    assert float32_leaves(getattr(new_state, part)), part
  assert float32_leaves(new_state.extras) or not new_state.extras
  assert float32_leaves(metrics) and {'loss', 'sup_loss', 'reco_loss'} <= set(metrics)


def test_bf16_steps_train_with_float32_state_and_losses(monkeypatch):
  model, initial, mesh = model_and_state()
  seen = []
  real = reco_lib.reco_loss

  def spy(key, rep, labels, valid, prob, **kwargs):
    seen.append((rep.dtype, prob.dtype))
    return real(key, rep, labels, valid, prob, **kwargs)

  monkeypatch.setattr(reco_lib, 'reco_loss', spy)
  config = bf16_config()
  config.optimizer.learning_rate = 0.05  # a few steps must visibly fit the labelled batch
  state = state_lib.with_optimizer(jax.tree.map(jnp.copy, initial), config)
  batch = parallel.shard_batch(mesh, make_batch())
  key = jax.random.key(2)
  init = jax.tree.map(np.asarray, state)
  step = steps.make_train_step(config, model, mesh)
  state, history = helpers.run_steps(step, state, batch, key, 6)
  assert seen and all(s == (jnp.float32, jnp.float32) for s in seen), seen
  helpers.check_training(config, init, state, history)
  for part in STATE_PARTS:
    assert float32_leaves(getattr(state, part)), part
  sup = [m['sup_loss'] for m in history]
  assert sup[-1] < 0.8 * sup[0], sup
  assert history[-1]['loss'] < history[0]['loss'], [m['loss'] for m in history]


def test_reco_loss_of_bf16_representations_samples_in_float32():
  """Given bf16 rep, the loss equals the float32 loss of the same (rounded) values."""
  rng = np.random.default_rng(0)
  rep = jnp.asarray(rng.normal(size=(2, 9, 9, 8)), jnp.bfloat16)
  labels = jnp.asarray(rng.integers(0, 3, (2, 9, 9)), jnp.int32)
  prob = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 9, 9, 3)), jnp.float32))
  valid = jnp.ones((2, 9, 9), bool)
  loss = jax.jit(functools.partial(reco_lib.reco_loss, jax.random.key(3), num_queries=4,
                                   num_negatives=8))
  got = loss(rep, labels, valid, prob)
  want = loss(rep.astype(jnp.float32), labels, valid, prob)
  assert got.dtype == jnp.float32 and float(got) > 0
  assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_pretraining_head_computes_in_the_segmenters_dtype_and_returns_float32():
  config = bf16_config()
  config.update(dict(crop_size=(33, 33), projection_dims=(8, 4), embedding_stride=8))
  network = contrastive_pretraining.build_network(
      config, deeplab.model_from_config(config, features_only=True))
  images = jax.ShapeDtypeStruct((2, 33, 33, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(network.init, train=False), jax.random.key(0),
                             images)
  assert float32_leaves(variables)
  closed, (embedding, _) = jax.make_jaxpr(
      functools.partial(network.apply, train=True, mutable=['batch_stats']),
      return_shape=True)(variables, images)
  head = [dtypes(eqn.invars) for eqn, _ in equations(closed.jaxpr)
          if eqn.primitive.name == 'conv_general_dilated'
          and 'projection' in str(eqn.source_info.name_stack)]
  assert len(head) == 2 and all(ins == [jnp.bfloat16] * 2 for ins in head), head
  assert embedding.dtype == jnp.float32 and embedding.shape == (2, 5, 5, 4)

"""The same global batch on 1 and 4 (simulated CPU) devices gives the same training step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reco_jax import parallel
from reco_jax.methods import common
from reco_jax.losses import reco as reco_lib
from reco_jax.models import resize
# The fixtures `model` and `initial_state` are shared with the step tests.
from test_steps import (BATCH, compile_step, initial_state, make_batch,  # noqa: F401
                        max_abs_diff, model, tiny_config)


def state_on(mesh, state):
  return jax.device_put(jax.tree.map(jnp.copy, state), parallel.replicated(mesh))


def test_make_mesh_and_shard_batch():
  mesh = parallel.make_mesh(jax.devices()[:4])
  assert mesh.axis_names == ('data',) and mesh.size == 4
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
  x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  sharded = parallel.shard_batch(mesh, {'x': x})['x']
  np.testing.assert_array_equal(np.asarray(sharded), x)
  assert [s.data.shape for s in sharded.addressable_shards] == [(2, 3)] * 4
  assert parallel.replicated(mesh).is_fully_replicated
  with pytest.raises(ValueError, match='multiple of 4'):
    parallel.shard_batch(mesh, {'x': x[:6]})


def test_one_and_four_devices_agree_without_reco(model, initial_state):
  # Mean Teacher with CutMix covers the labelled branch, the teacher, the mixing partners
  # across device boundaries and the augmentation's random numbers.
  config = tiny_config(method='cutmix')
  np_batch = make_batch()
  key = jax.random.key(5)
  results = []
  for n in (1, 4):
    mesh = parallel.make_mesh(jax.devices()[:n])
    state = state_on(mesh, initial_state)
    batch = parallel.shard_batch(mesh, np_batch)
    step = compile_step(config, model, mesh, state, batch, key)
    history = []
    for _ in range(3):
      state, metrics = step(state, batch, key)
      history.append({k: float(v) for k, v in metrics.items()})
    assert len(state.params['classifier_out']['kernel'].sharding.device_set) == n
    results.append((jax.tree.map(np.asarray, state), history))
  (state1, hist1), (state4, hist4) = results
  for m1, m4 in zip(hist1, hist4):
    assert m1.keys() == m4.keys()
    for k in m1:
      assert m4[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-6), k
  assert max_abs_diff(state1.params, state4.params) < 1e-5
  assert max_abs_diff(state1.batch_stats, state4.batch_stats) < 1e-5
  assert max_abs_diff(state1.ema_params, state4.ema_params) < 1e-5
  assert max_abs_diff(state1.ema_batch_stats, state4.ema_batch_stats) < 1e-5
  assert max_abs_diff(state1.opt_state, state4.opt_state) < 1e-5


def test_reco_on_four_devices_is_the_per_device_loss_computed_on_one(model, initial_state):
  """Supervised + ReCo: device i samples from its own quarter of the batch with fold_in(key, i)."""
  config = tiny_config(method='supervised', reco=True)
  np_batch = make_batch(supervised=True)
  key = jax.random.key(6)
  mesh = parallel.make_mesh(jax.devices()[:4])
  state = state_on(mesh, initial_state)
  batch = parallel.shard_batch(mesh, np_batch)
  _, metrics = compile_step(config, model, mesh, state, batch, key)(state, batch, key)

  images, labels = np_batch['labelled']['image'], np_batch['labelled']['label']
  params = jax.tree.map(np.asarray, initial_state.params)
  batch_stats = jax.tree.map(np.asarray, initial_state.batch_stats)

  def per_device_on_one(params, batch_stats):
    # BatchNorm statistics are global in the step, so the forward pass runs on the whole batch.
    (logits, rep), _ = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                   train=True, mutable=['batch_stats'])
    small = resize.nearest(jnp.asarray(labels), rep.shape[1:3])
    valid = small != 255
    small = jnp.where(valid, small, 0)
    prob = jax.nn.softmax(logits, -1)
    _, _, k_reco = common.step_keys(key, jnp.asarray(0))
    per = BATCH // 4
    losses = [
        reco_lib.reco_loss(jax.random.fold_in(k_reco, i), rep[i * per:(i + 1) * per],
                           small[i * per:(i + 1) * per], valid[i * per:(i + 1) * per],
                           prob[i * per:(i + 1) * per], strong_threshold=config.strong_threshold,
                           temperature=config.reco_temperature, num_queries=config.num_queries,
                           num_negatives=config.num_negatives, query_mode=config.query_mode,
                           key_mode=config.key_mode)
        for i in range(4)]
    whole = reco_lib.reco_loss(k_reco, rep, small, valid, prob,
                               strong_threshold=config.strong_threshold,
                               temperature=config.reco_temperature,
                               num_queries=config.num_queries,
                               num_negatives=config.num_negatives)
    return jnp.mean(jnp.stack(losses)), whole

  want, whole = jax.jit(per_device_on_one)(params, batch_stats)
  assert float(metrics['reco_loss']) == pytest.approx(float(want), rel=1e-4)
  # Sampling from the whole batch at once would be another estimate.
  assert abs(float(whole) - float(want)) > 1e-4


def test_per_device_concat_keeps_each_devices_rows_together():
  a = jnp.arange(8)
  b = jnp.arange(8) + 100
  out = parallel.per_device_concat([a, b], 4)
  np.testing.assert_array_equal(out, [0, 1, 100, 101, 2, 3, 102, 103, 4, 5, 104, 105,
                                      6, 7, 106, 107])
  np.testing.assert_array_equal(parallel.per_device_concat([a, b], 1), jnp.concatenate([a, b]))
  with pytest.raises(ValueError, match='multiples'):
    parallel.per_device_concat([a[:6], b[:6]], 4)

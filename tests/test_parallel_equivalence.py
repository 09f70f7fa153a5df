"""The same global batch on 1 and 4 (simulated CPU) devices gives the same training step.

The two runs reduce in different orders, so they agree to float32 rounding, not bit for bit:
step 1 to 1e-4, later steps and the states by the bounds of `tolerances.py`.

`RECO_JAX_WRONG_REDUCTION=sum` (device losses summed where the reference averages them) or
`=drop` (the last device's share lost) runs the comparisons on a deliberately wrong 4-device
step: both tests must then fail (`tests/isa_matrix.sh` checks that they do).
"""
import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reco_jax import parallel
from reco_jax.losses import reco as reco_lib
from reco_jax.losses import segmentation
from reco_jax.methods import common
from reco_jax.models import resize
from helpers import (BATCH, compile_step, jit_as_steps, make_batch, step_state, tiny_config,
                     uncached_step)
import tolerances

WRONG_REDUCTION = os.environ.get('RECO_JAX_WRONG_REDUCTION', '')
if WRONG_REDUCTION not in ('', 'sum', 'drop'):
  raise ValueError(f"RECO_JAX_WRONG_REDUCTION must be 'sum' or 'drop', got {WRONG_REDUCTION!r}.")


def wrong_device_mean(x, axis_name, num_devices):
  """What a data-parallel bug makes of the mean over devices (the right one when unset)."""
  if WRONG_REDUCTION == 'sum':
    return jax.lax.psum(x, axis_name)
  if WRONG_REDUCTION == 'drop' and num_devices > 1:
    kept = jax.lax.axis_index(axis_name) < num_devices - 1
    return jax.lax.psum(jnp.where(kept, x, 0.0), axis_name) / (num_devices - 1)
  return jax.lax.psum(x, axis_name) / num_devices


@contextlib.contextmanager
def wrong_reductions(mesh, monkeypatch):
  """With RECO_JAX_WRONG_REDUCTION set: the supervised loss and ReCo's device mean go wrong."""
  if WRONG_REDUCTION:
    n = mesh.size
    right_ce = segmentation.cross_entropy
    spec = jax.sharding.PartitionSpec(parallel.DATA_AXIS)

    def cross_entropy(logits, labels, **kw):
      per_device = lambda lg, lb: wrong_device_mean(right_ce(lg, lb, **kw), 'data', n)
      return jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec),
                           out_specs=jax.sharding.PartitionSpec())(logits, labels)

    monkeypatch.setattr(segmentation, 'cross_entropy', cross_entropy)
    monkeypatch.setattr(jax.lax, 'pmean', lambda x, axis_name: wrong_device_mean(
        x, axis_name, n))
  try:
    yield
  finally:
    monkeypatch.undo()


NUM_STEPS = 3


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


def test_one_and_four_devices_agree_without_reco(model, initial_state, monkeypatch):
  # Mean Teacher with CutMix covers the labelled branch (recomputed after the unlabelled
  # backward pass), the teacher, the mixing partners across device boundaries, the boxes and
  # the augmentation's random numbers. On one device it is the golden case
  # cutmix/recompute@1, whose compiled step serves here too.
  config = tiny_config(method='cutmix', recompute_labelled=True)
  np_batch = make_batch()
  key = jax.random.key(5)
  results = []
  for n in (1, 4):
    mesh = parallel.make_mesh(jax.devices()[:n])
    state = step_state(config, mesh)
    batch = parallel.shard_batch(mesh, np_batch)
    with wrong_reductions(mesh, monkeypatch):
      step = (compile_step if not WRONG_REDUCTION else uncached_step)(
          config, model, mesh, state, batch, key)
    history = []
    for _ in range(NUM_STEPS):
      state, metrics = step(state, batch, key)
      history.append({k: float(v) for k, v in metrics.items()})
    assert len(state.params['classifier_out']['kernel'].sharding.device_set) == n
    results.append((jax.tree.map(np.asarray, state), history))
  (state1, hist1), (state4, hist4) = results
  tolerances.assert_histories_close(hist4, hist1)
  start = jax.tree.map(np.asarray, initial_state)
  for part in ('params', 'batch_stats', 'ema_params', 'ema_batch_stats', 'opt_state'):
    tolerances.assert_updates_close(getattr(state4, part), getattr(state1, part),
                                    getattr(start, part), steps=NUM_STEPS, err_msg=part)


def test_reco_on_four_devices_is_the_per_device_loss_computed_on_one(model, initial_state,
                                                                      monkeypatch):
  """Supervised + ReCo: device i samples from its own quarter of the batch with fold_in(key, i)."""
  config = tiny_config(method='supervised', reco=True)
  np_batch = make_batch(supervised=True)
  key = jax.random.key(6)
  mesh = parallel.make_mesh(jax.devices()[:4])
  state = step_state(config, mesh)
  batch = parallel.shard_batch(mesh, np_batch)
  with wrong_reductions(mesh, monkeypatch):
    step = (compile_step if not WRONG_REDUCTION else uncached_step)(
        config, model, mesh, state, batch, key)
  _, metrics = step(state, batch, key)

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

  want, whole = jit_as_steps(per_device_on_one)(params, batch_stats)
  # One forward pass through the network in two programs.
  assert float(metrics['reco_loss']) == pytest.approx(float(want), rel=tolerances.DEEP_PASS)
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

"""ReCo loss: exact values, sampling distributions, gradients, edge cases, per-device form."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from reco_jax.losses import reco

TAU = 0.5


_DEFAULTS = dict(strong_threshold=0.97, temperature=TAU, num_queries=256, num_negatives=512,
                 query_mode='hard', key_mode='active', shared_negatives=False,
                 prototype_stats=None, block_rows=8)


# Cached so that tests with the same options and shapes share one compilation.
@functools.lru_cache(maxsize=None)
def _run_fn(**kwargs):
  """Jitted ((loss, sampled indices), d loss / d rep) of the implementation."""
  opts = {**_DEFAULTS, **kwargs}
  return jax.jit(jax.value_and_grad(
      lambda rep, key, labels, valid, prob: helpers.reco_with_samples(key, rep, labels, valid, prob,
                                                       return_samples=True, **opts),
      has_aux=True))


def _run(key, rep, labels, valid, prob, **kwargs):
  """Loss (float), samples (dict of numpy int arrays) and gradient (numpy) for one batch."""
  (loss, samples), grad = _run_fn(**kwargs)(rep, key, labels, valid, prob)
  return float(loss), {k: np.asarray(v) for k, v in samples.items()}, np.asarray(grad)


@functools.lru_cache(maxsize=None)
def _samples_fn(**kwargs):
  opts = {**_DEFAULTS, **kwargs}
  return jax.jit(lambda *a: helpers.reco_with_samples(*a, return_samples=True, **opts))


def _samples(key, rep, labels, valid, prob, **kwargs):
  """Loss and sampled indices, forward pass only."""
  loss, samples = _samples_fn(**kwargs)(key, rep, labels, valid, prob)
  return float(loss), {k: np.asarray(v) for k, v in samples.items()}


def _random_batch(seed, shape=(2, 6, 6), m=8, num_classes=4, invalid_frac=0.2):
  """rep [B,h,w,m] f32, labels [B,h,w] int32, valid bool, prob [B,h,w,C] with ~half easy."""
  rng = np.random.default_rng(seed)
  rep = rng.normal(size=shape + (m,)).astype(np.float32)
  labels = rng.integers(0, num_classes, size=shape).astype(np.int32)
  valid = rng.random(shape) > invalid_frac
  logits = rng.normal(size=shape + (num_classes,)) * 3
  confident = (rng.random(shape) > 0.5)[..., None]
  logits += 12 * (np.arange(num_classes) == labels[..., None]) * confident
  prob = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  return rep, labels, valid, prob.astype(np.float32)


def _unit_np(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def _reference_from_samples(rep, labels, valid, samples, num_classes, tau=TAU):
  """Loop reference (float64) of the ReCo loss given the sampled indices."""
  m = rep.shape[-1]
  flat = rep.reshape(-1, m).astype(np.float64)
  lab = labels.reshape(-1)
  ok = valid.reshape(-1) & (lab >= 0) & (lab < num_classes)
  present = [c for c in range(num_classes) if np.any(ok & (lab == c))]
  if len(present) <= 1:
    return 0.0
  total = 0.0
  for c in present:
    proto = flat[ok & (lab == c)].mean(0)
    q_idx = samples['query'][c]
    if q_idx[0] >= flat.shape[0]:  # no query for this class
      continue
    per_query = []
    for i, qi in enumerate(q_idx):
      k_idx = samples['key'][c] if samples['key'].ndim == 2 else samples['key'][c, i]
      assert np.all(ok[k_idx] & (lab[k_idx] != c)), 'a key is not a valid pixel of another class'
      keys = np.concatenate([proto[None], flat[k_idx]])
      logits = _unit_np(keys) @ _unit_np(flat[qi]) / tau
      per_query.append(np.log(np.sum(np.exp(logits - logits.max()))) + logits.max() - logits[0])
    total += np.mean(per_query)
  return total / len(present)


def _autodiff_reference(rep, labels, valid, samples, num_classes, tau=TAU):
  """Same loss in plain jnp (autodiff, no custom gradient) given the samples; value and grad."""
  m = rep.shape[-1]
  lab = labels.reshape(-1)
  ok = valid.reshape(-1) & (lab >= 0) & (lab < num_classes)
  present = [c for c in range(num_classes) if np.any(ok & (lab == c))]
  unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-8)

  def loss(rep):
    flat = rep.reshape(-1, m)
    total = 0.0
    for c in present:
      q_idx = samples['query'][c]
      if q_idx[0] >= flat.shape[0]:
        continue
      proto = jax.lax.stop_gradient(flat[np.flatnonzero(ok & (lab == c))].mean(0))
      k_idx = samples['key'][c]
      keys = jax.lax.stop_gradient(flat[k_idx])
      if k_idx.ndim == 1:
        keys = jnp.broadcast_to(keys, (len(q_idx),) + keys.shape)
      q = unit(flat[q_idx])
      logits = jnp.concatenate(
          [q @ unit(proto)[:, None], jnp.einsum('qm,qnm->qn', q, unit(keys))], 1) / tau
      total += jnp.mean(jax.nn.logsumexp(logits, 1) - logits[:, 0])
    return total / len(present)

  return jax.jit(jax.value_and_grad(loss))(jnp.asarray(rep))


def _chi_square(observed, expected_prob):
  expected = expected_prob * observed.sum()
  return float(np.sum((observed - expected) ** 2 / expected))


# ----------------------------------------------------------------------------- exact values


# The two closed-form cases share shapes and options, hence one compilation.
CLOSED_FORM = dict(num_queries=4, num_negatives=16)


def test_two_classes_with_constant_representations_give_the_closed_form():
  a, b = np.array([1.0, 0.0, 0.0]), np.array([0.6, 0.8, 0.0])  # cos(a, b) = 0.6
  labels = np.zeros((1, 4, 4), np.int32)
  labels[:, :, 2:] = 1
  rep = np.where(labels[..., None] == 0, a, b).astype(np.float32) * 3.0  # scale is irrelevant
  prob = np.full((1, 4, 4, 3), [0.5, 0.5, 0.0], np.float32)  # every pixel hard; class 2 absent
  valid = np.ones((1, 4, 4), bool)
  loss, _, grad = _run(jax.random.key(0), rep, labels, valid, prob, **CLOSED_FORM)
  n = CLOSED_FORM['num_negatives']
  per_class = np.log(np.exp(1 / TAU) + n * np.exp(0.6 / TAU)) - 1 / TAU
  np.testing.assert_allclose(loss, per_class, rtol=1e-5)
  assert np.all(np.isfinite(grad))


def test_three_orthogonal_classes_one_with_hard_queries_divides_by_all_present_classes():
  # Negatives come from classes 1 or 2; both are orthogonal to class 0, so every negative logit
  # is 0 whichever is drawn. Classes 1 and 2 have no hard pixel: they add 0 but count in V = 3.
  labels = np.array([0] * 4 + [1] * 4 + [2] * 8, np.int32).reshape(1, 4, 4)
  rep = np.eye(3, dtype=np.float32)[labels] * np.float32(2.0)
  prob = np.eye(3, dtype=np.float32)[labels]  # prob 1 on the own class: easy
  prob[0, 0, :2] = [0.5, 0.25, 0.25]  # two hard pixels of class 0
  valid = np.ones(labels.shape, bool)
  loss, _, grad = _run(jax.random.key(1), rep, labels, valid, prob, **CLOSED_FORM)
  n = CLOSED_FORM['num_negatives']
  expected = (np.log(np.exp(1 / TAU) + n) - 1 / TAU) / 3
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert np.all(np.isfinite(grad)) and not np.any(grad[labels != 0])


@pytest.mark.parametrize('shared', [False, True])
def test_value_and_gradient_match_loop_reference_given_the_same_samples(shared):
  rep, labels, valid, prob = _random_batch(0)
  key = jax.random.key(3)
  # 4 classes x 5 queries = 20 query rows: blocks of 3 rows need padding.
  kwargs = dict(num_queries=5, num_negatives=7, shared_negatives=shared, block_rows=3)
  loss, samples, grad = _run(key, rep, labels, valid, prob, **kwargs)
  expected = _reference_from_samples(rep, labels, valid, samples, 4)
  assert expected > 0.1
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  # The custom gradient equals plain autodiff of the same loss.
  ref_value, ref_grad = _autodiff_reference(rep, labels, valid, samples, 4)
  np.testing.assert_allclose(loss, float(ref_value), rtol=1e-5)
  np.testing.assert_allclose(grad, np.asarray(ref_grad), atol=1e-6, rtol=1e-4)


def test_draws_do_not_depend_on_block_size_or_on_which_classes_are_active():
  rep, labels, valid, prob = _random_batch(4, num_classes=5)
  # Class 1 has no hard query (inactive), so the active rows are laid out around it.
  prob[labels == 1] = np.eye(5, dtype=np.float32)[1]
  key = jax.random.key(6)
  kwargs = dict(num_queries=5, num_negatives=7)
  runs = [_samples(key, rep, labels, valid, prob, block_rows=b, **kwargs) for b in (1, 3, 8)]
  num_pixels = labels.size
  for loss, samples in runs[1:]:
    assert loss == pytest.approx(runs[0][0], rel=1e-6)
    np.testing.assert_array_equal(samples['key'], runs[0][1]['key'])
  keys = runs[0][1]['key']
  assert np.all(keys[1] == num_pixels)  # the inactive class draws nothing
  assert np.all(keys[[0, 2, 3, 4]] < num_pixels)
  # Making class 1 active shifts the other classes' rows in the layout but not their draws.
  all_active = prob.copy()
  all_active[labels == 1] = 0.2
  _, samples = _samples(key, rep, labels, valid, all_active, block_rows=3, **kwargs)
  assert np.all(samples['key'][1] < num_pixels)
  for name in ('query', 'key'):
    np.testing.assert_array_equal(samples[name][[0, 2, 3, 4]], runs[0][1][name][[0, 2, 3, 4]])


# ----------------------------------------------------------------------------- sampling


def _relation_graph_batch():
  """4 classes with exactly known prototype cosines to class 0: 0.9, 0.0, -0.9."""
  angles = np.arccos([1.0, 0.9, 0.0, -0.9])
  dirs = np.stack([np.cos(angles), np.sin(angles)], -1).astype(np.float32)
  labels = np.array([0] * 4 + [1] * 4 + [2] * 16 + [3] * 16, np.int32).reshape(1, 5, 8)
  rep = dirs[labels]
  prob = np.full(labels.shape + (4,), 0.25, np.float32)
  return rep, labels, np.ones(labels.shape, bool), prob


def test_negative_classes_follow_the_relation_graph_softmax():
  rep, labels, valid, prob = _relation_graph_batch()
  _, samples = _samples(jax.random.key(5), rep, labels, valid, prob, num_queries=64,
                        num_negatives=256)
  flat_labels = labels.reshape(-1)
  drawn = flat_labels[samples['key'][0].reshape(-1)]
  observed = np.bincount(drawn, minlength=4).astype(np.float64)
  assert observed[0] == 0  # never the query's own class
  expected = np.exp(np.array([0.9, 0.0, -0.9]) / TAU)
  expected /= expected.sum()
  # df = 2: the 1e-4 critical value is 18.4. Uniform or count-proportional draws give > 1000.
  assert _chi_square(observed[1:], expected) < 18.4
  # Inside a class the pixel is uniform (class 2: 16 pixels; df = 15, 1e-4 critical value 44).
  in_class_2 = samples['key'][0].reshape(-1)[drawn == 2]
  counts = np.bincount(in_class_2, minlength=labels.size)[flat_labels == 2]
  assert _chi_square(counts.astype(np.float64), np.full(16, 1 / 16)) < 44.3


def test_random_key_mode_is_uniform_over_the_other_classes_pixels():
  rep, labels, valid, prob = _relation_graph_batch()
  _, samples = _samples(jax.random.key(6), rep, labels, valid, prob, num_queries=64,
                        num_negatives=256, key_mode='random')
  drawn = labels.reshape(-1)[samples['key'][0].reshape(-1)]
  observed = np.bincount(drawn, minlength=4).astype(np.float64)
  assert observed[0] == 0
  assert _chi_square(observed[1:], np.array([4, 16, 16]) / 36) < 18.4


def test_scaled_index_is_the_exact_high_word_of_the_product():
  rng = np.random.default_rng(0)
  bits = rng.integers(0, 2**32, size=2000, dtype=np.uint64)
  n = rng.integers(0, 2**31 - 1, size=2000, dtype=np.uint64)
  bits[:3], n[3:6], n[6:9] = 2**32 - 1, 0, 131220
  expected = [(int(b) * int(k)) >> 32 for b, k in zip(bits, n)]
  got = reco._scaled_index(jnp.asarray(bits.astype(np.uint32)), jnp.asarray(n.astype(np.int32)))
  np.testing.assert_array_equal(np.asarray(got), expected)


@pytest.mark.parametrize('mode', ['hard', 'random', 'easy'])
def test_queries_are_uniform_over_the_pixels_of_the_query_mode(mode):
  labels = np.array([0] * 20 + [1] * 20, np.int32).reshape(1, 5, 8)
  valid = np.ones(labels.shape, bool)
  valid[0, 0, :2] = False  # two invalid class-0 pixels, which must never be queries
  own = np.where(np.arange(40) % 2 == 0, 0.5, 0.99).reshape(labels.shape)  # even pixels hard
  prob = np.stack([np.where(labels == 0, own, 1 - own), np.where(labels == 1, own, 1 - own)],
                  -1).astype(np.float32)
  rep = np.random.default_rng(0).normal(size=labels.shape + (4,)).astype(np.float32)
  _, samples = _samples(jax.random.key(7), rep, labels, valid, prob, num_queries=4096,
                        num_negatives=2, query_mode=mode)
  hard = np.arange(40) % 2 == 0
  allowed = {'hard': hard, 'random': np.ones(40, bool), 'easy': ~hard}[mode] & valid.reshape(-1)
  for c in (0, 1):
    pool = allowed & (labels.reshape(-1) == c)
    counts = np.bincount(samples['query'][c], minlength=40)
    assert np.all(counts[~pool] == 0), f'class {c} queried pixels outside its {mode} set'
    k = int(pool.sum())
    # df = k - 1 <= 19: the 1e-4 critical value for df = 19 is 51.2.
    assert _chi_square(counts[pool].astype(np.float64), np.full(k, 1 / k)) < 51.2


# ----------------------------------------------------------------------------- gradients

EDGE = dict(num_queries=4, num_negatives=6)


def test_gradient_is_nonzero_exactly_at_sampled_queries():
  rep, labels, valid, prob = _random_batch(2)
  rep[~valid] = 1e30  # invalid pixels must neither leak nor receive gradient
  key = jax.random.key(8)
  _, samples, grad = _run(key, rep, labels, valid, prob, **EDGE)
  grad = grad.reshape(-1, rep.shape[-1])
  queried = np.zeros(grad.shape[0], bool)
  q = samples['query']
  queried[q[q < grad.shape[0]]] = True
  assert queried.sum() >= 4
  nonzero = np.any(grad != 0, axis=1)
  np.testing.assert_array_equal(nonzero, queried)
  assert not np.any(nonzero & ~valid.reshape(-1))


# ----------------------------------------------------------------------------- edge cases


def _finite_value_and_grad(rep, labels, valid, prob):
  value, _, grad = _run(jax.random.key(9), rep, labels, valid, prob, **EDGE)
  assert np.isfinite(value), 'loss is not finite'
  assert np.all(np.isfinite(grad)), 'gradient is not finite'
  return value, grad


def test_no_valid_pixel_gives_zero():
  rep, labels, _, prob = _random_batch(3)
  value, grad = _finite_value_and_grad(rep * 1e30, labels, np.zeros(labels.shape, bool), prob)
  assert value == 0.0 and not grad.any()


def test_single_class_gives_zero():
  rep, _, valid, prob = _random_batch(3)
  value, grad = _finite_value_and_grad(rep, np.full(valid.shape, 2, np.int32), valid, prob)
  assert value == 0.0 and not grad.any()


def test_class_with_a_single_pixel_is_finite_and_counted():
  rep, labels, valid, prob = _random_batch(4)
  labels[labels == 2] = 1
  labels[0, 0, 0], valid[0, 0, 0], prob[0, 0, 0] = 2, True, [0.3, 0.3, 0.3, 0.1]
  value, grad = _finite_value_and_grad(rep, labels, valid, prob)
  assert value > 0 and grad.any()
  _, samples, _ = _run(jax.random.key(9), rep, labels, valid, prob, **EDGE)
  assert np.all(samples['query'][2] == 0)  # its only pixel is its only query
  np.testing.assert_allclose(
      value, _reference_from_samples(rep, labels, valid, samples, 4), rtol=1e-5)


def test_all_pixels_easy_gives_zero_with_finite_gradient():
  rep, labels, valid, _ = _random_batch(5)
  prob = np.eye(4, dtype=np.float32)[labels]
  value, grad = _finite_value_and_grad(rep, labels, valid, prob)
  assert value == 0.0 and not grad.any()


def test_zero_representations_are_finite():
  rep, labels, valid, prob = _random_batch(6)
  _finite_value_and_grad(np.zeros_like(rep), labels, valid, prob)


@pytest.mark.parametrize('huge', [1e30, 3e38])
def test_invalid_pixel_values_do_not_leak(huge):
  rep, labels, valid, prob = _random_batch(7)
  clean = np.where(valid[..., None], rep, 0).astype(np.float32)
  dirty = np.where(valid[..., None], rep, huge).astype(np.float32)
  labels_dirty = np.where(valid, labels, 255).astype(np.int32)  # void labels too
  value_clean, grad_clean = _finite_value_and_grad(clean, labels, valid, prob)
  value_dirty, grad_dirty = _finite_value_and_grad(dirty, labels_dirty, valid, prob)
  assert value_clean > 0
  assert value_dirty == value_clean
  np.testing.assert_array_equal(grad_dirty, grad_clean)


def test_bfloat16_representations_are_computed_in_float32():
  rep, labels, valid, prob = _random_batch(8)
  rep16 = jnp.asarray(rep, jnp.bfloat16)
  (v16, _), g16 = _run_fn(**EDGE)(rep16, jax.random.key(9), labels, valid, prob)
  v32, _, _ = _run(jax.random.key(9), rep16.astype(jnp.float32), labels, valid, prob, **EDGE)
  assert v16.dtype == jnp.float32 and g16.dtype == jnp.bfloat16
  np.testing.assert_allclose(float(v16), v32, rtol=1e-6)


@pytest.mark.parametrize('kwargs, match', [
    (dict(query_mode='medium'), 'query_mode'),
    (dict(key_mode='hard'), 'key_mode'),
    (dict(temperature=0.0), 'temperature'),
    (dict(num_queries=0), 'num_queries'),
])
def test_bad_options_raise(kwargs, match):
  rep, labels, valid, prob = _random_batch(0)
  with pytest.raises(ValueError, match=match):
    reco.reco_loss(jax.random.key(0), rep, labels, valid, prob, **kwargs)


def test_bad_shapes_raise():
  rep, labels, valid, prob = _random_batch(0)
  with pytest.raises(ValueError, match='rep.shape'):
    reco.reco_loss(jax.random.key(0), rep, labels[:, :3], valid, prob)
  with pytest.raises(ValueError, match='prob'):
    reco.reco_loss(jax.random.key(0), rep, labels, valid, prob[:, :, :3])
  with pytest.raises(ValueError, match='bool'):
    reco.reco_loss(jax.random.key(0), rep, labels, valid.astype(np.int32), prob)


# ----------------------------------------------------------------------------- data parallel


@functools.lru_cache(maxsize=None)
def _run_with_stats_fn(**kwargs):
  """Like _run_fn, with prototype statistics as a traced argument."""
  opts = {**_DEFAULTS, **kwargs}
  return jax.jit(jax.value_and_grad(
      lambda rep, key, labels, valid, prob, stats: helpers.reco_with_samples(
          key, rep, labels, valid, prob, return_samples=False, **{**opts,
                                                                  'prototype_stats': stats}),
      has_aux=True))


@pytest.mark.parametrize('average_prototypes', [False, True])
def test_per_device_loss_equals_per_slice_computation_on_one_device(average_prototypes):
  devices = 4
  assert jax.device_count() >= devices
  mesh = jax.make_mesh((devices,), ('data',), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:devices])
  # Slices have the shapes of _random_batch, so the one-device runs reuse compiled functions.
  rep, labels, valid, prob = _random_batch(9, shape=(8, 6, 6))
  key = jax.random.key(10)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  args = [jax.device_put(x, sharding) for x in (rep, labels, valid, prob)]

  @jax.jit
  def per_device(rep, labels, valid, prob):
    return reco.reco_loss_per_device(key, rep, labels, valid, prob, mesh=mesh,
                                     average_prototypes=average_prototypes, **EDGE)

  value, grad = jax.value_and_grad(per_device)(*args)

  slices = np.split(np.arange(8), devices)
  stats = None
  if average_prototypes:
    parts = [reco.class_statistics(rep[s], labels[s], valid[s], 4) for s in slices]
    stats = tuple(sum(p[i] for p in parts) for i in range(2))
  losses, grads = [], []
  for i, s in enumerate(slices):
    device_key = jax.random.fold_in(key, i)
    if stats is None:
      loss, _, g = _run(device_key, rep[s], labels[s], valid[s], prob[s], **EDGE)
    else:
      (loss, _), g = _run_with_stats_fn(**EDGE)(rep[s], device_key, labels[s], valid[s],
                                                prob[s], stats)
    losses.append(float(loss))
    grads.append(np.asarray(g) / devices)
  assert min(losses) > 0
  np.testing.assert_allclose(float(value), np.mean(losses), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), np.concatenate(grads), atol=1e-7, rtol=1e-4)

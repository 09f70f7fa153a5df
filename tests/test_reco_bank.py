"""ReCo with a feature bank: FIFO queues, the write choice, bank-mode loss, devices, resume."""
import collections
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from reco_jax import parallel
from reco_jax import state as state_lib
from reco_jax import workdir as workdir_lib
from reco_jax.losses import reco
from reco_jax.losses import reco_bank
from reco_jax.losses import reco_recipe
from reco_jax.methods import common
import helpers
from helpers import NUM_CLASSES, SIZE, make_batch, tiny_model

TAU = 0.5
BANK_SLOTS = 40  # The loss tests' banks: [4 classes, 40, 8] (one compilation for all).
LOSS = dict(strong_threshold=0.97, temperature=TAU, num_queries=16, num_negatives=32,
            query_mode='hard', prototype_stats=None, block_rows=8)


def _random_batch(seed, shape=(2, 6, 6), m=8, num_classes=4):
  rng = np.random.default_rng(seed)
  rep = rng.normal(size=shape + (m,)).astype(np.float32)
  labels = rng.integers(0, num_classes, size=shape).astype(np.int32)
  valid = rng.random(shape) > 0.2
  logits = rng.normal(size=shape + (num_classes,)) * 3
  logits += 12 * (np.arange(num_classes) == labels[..., None]) * (rng.random(shape) > 0.5)[
      ..., None]
  prob = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  return rep, labels, valid, prob.astype(np.float32)


def _bank_config(**overrides):
  return ml_collections.ConfigDict({
      'reco': True, 'reco_bank_size': 16, 'reco_bank_writes': 8, 'average_prototypes': False,
      'strong_threshold': 0.97, 'reco_temperature': TAU, 'num_queries': 8,
      'num_negatives': 16, 'query_mode': 'hard', 'key_mode': 'active', **overrides})


# ----------------------------------------------------------------------------- FIFO queues


def test_write_fills_each_class_queue_in_order_and_wraps_to_the_oldest_entry():
  bank = reco_bank.init(2, 3, 1)
  write = jax.jit(reco_bank.write)
  entries = lambda a, b: jnp.asarray([a, b], jnp.float32)[..., None]
  keys = lambda bank: np.asarray(bank['keys'])[..., 0].tolist()
  bank = write(bank, entries([1, 2], [10, 0]), jnp.asarray([2, 1]))
  assert keys(bank) == [[1, 2, 0], [10, 0, 0]]
  assert bank['count'].tolist() == [2, 1] and bank['pointer'].tolist() == [2, 1]
  # Class 0 wraps: 3 into the last free slot, 4 over the oldest entry (1); class 1 fills up.
  bank = write(bank, entries([3, 4], [11, 12]), jnp.asarray([2, 2]))
  assert keys(bank) == [[4, 2, 3], [10, 11, 12]]
  assert bank['count'].tolist() == [3, 3] and bank['pointer'].tolist() == [1, 0]
  # 5 replaces 2, now the oldest of class 0; class 1 writes nothing and keeps its queue.
  bank = write(bank, entries([5, 6], [13, 14]), jnp.asarray([1, 0]))
  assert keys(bank) == [[4, 5, 3], [10, 11, 12]]
  assert bank['count'].tolist() == [3, 3] and bank['pointer'].tolist() == [2, 0]


def test_write_keeps_the_last_k_entries_of_every_class_over_a_long_sequence():
  num_classes, size, width = 3, 5, 3
  rng = np.random.default_rng(0)
  bank = reco_bank.init(num_classes, size, 1)
  write = jax.jit(reco_bank.write)
  queues = [collections.deque(maxlen=size) for _ in range(num_classes)]
  value = 0
  for _ in range(20):
    num_new = rng.integers(0, width + 1, num_classes)
    entries = np.zeros((num_classes, width, 1), np.float32)
    for c in range(num_classes):
      for i in range(num_new[c]):
        value += 1
        entries[c, i] = value
        queues[c].append(value)
    bank = write(bank, jnp.asarray(entries), jnp.asarray(num_new))
    for c in range(num_classes):
      count, pointer = int(bank['count'][c]), int(bank['pointer'][c])
      stored = np.asarray(bank['keys'][c, :, 0])
      assert count == len(queues[c])
      assert sorted(stored[:count].tolist()) == sorted(queues[c])
      # Read from the pointer on, a full queue lists its entries oldest first.
      if count == size:
        assert np.roll(stored, -pointer).tolist() == list(queues[c])


# ----------------------------------------------------------------------------- what is written


def test_choose_writes_the_lowest_priority_valid_pixels_of_each_class_in_pixel_order():
  rep, labels, valid, _ = _random_batch(1, shape=(2, 8, 8))
  labels[0, 0, :3] = 7  # out of range: never written
  writes = 6
  priority = np.random.default_rng(2).integers(0, 2**32, labels.shape, dtype=np.uint64)
  priority = priority.astype(np.uint32)
  pixel_id = np.arange(labels.size, dtype=np.int32).reshape(labels.shape)
  entries, num_new = jax.jit(functools.partial(reco_bank.choose, num_classes=4,
                                               writes=writes))(
      rep, labels, valid, priority, pixel_id)
  flat_rep, flat_labels = rep.reshape(-1, 8), labels.reshape(-1)
  ok = valid.reshape(-1)
  for c in range(4):
    pixels = np.nonzero(ok & (flat_labels == c))[0]
    chosen = np.sort(pixels[np.argsort(priority.reshape(-1)[pixels], kind='stable')][:writes])
    assert int(num_new[c]) == min(writes, len(pixels)) == len(chosen)
    np.testing.assert_array_equal(np.asarray(entries[c, :len(chosen)]), flat_rep[chosen])
    np.testing.assert_array_equal(np.asarray(entries[c, len(chosen):]), 0.0)
  # A class with fewer valid pixels than writes gives all of them.
  few = np.where(labels == 3, 0, labels)
  few[0, 1, 1], valid[0, 1, 1] = 3, True
  _, num_new = reco_bank.choose(rep, few, valid, priority, pixel_id, num_classes=4,
                                writes=writes)
  assert int(num_new[3]) == 1


# ----------------------------------------------------------------------------- bank-mode loss


@functools.lru_cache(maxsize=None)
def _loss_fn(with_bank, **kwargs):
  opts = {**LOSS, **kwargs}
  if with_bank:
    return jax.jit(jax.value_and_grad(
        lambda rep, key, labels, valid, prob, bank: helpers.reco_with_samples(
            key, rep, labels, valid, prob, bank=bank, return_samples=True, **opts),
        has_aux=True))
  return jax.jit(jax.value_and_grad(
      lambda rep, key, labels, valid, prob: helpers.reco_with_samples(key, rep, labels, valid, prob,
                                                       return_samples=True, **opts),
      has_aux=True))


@pytest.mark.parametrize('key_mode,shared', [('active', False), ('random', True)])
def test_bank_holding_the_batch_keys_gives_the_batch_mode_loss_draws_and_gradient(
    key_mode, shared):
  rep, labels, valid, prob = _random_batch(3)
  num_classes, size = 4, BANK_SLOTS  # more slots than any class has pixels: some stay empty
  # The batch's valid pixels enter an empty bank through the real write path.
  priority = jax.random.bits(jax.random.key(0), labels.shape, jnp.uint32)
  pixel_id = jnp.arange(labels.size, dtype=jnp.int32).reshape(labels.shape)
  entries, num_new = reco_bank.choose(rep, labels, valid, priority, pixel_id,
                                      num_classes=num_classes, writes=size)
  bank = reco_bank.write(reco_bank.init(num_classes, size, 8), entries, num_new)
  key = jax.random.key(4)
  opts = dict(key_mode=key_mode, shared_negatives=shared)
  (want, batch_samples), want_grad = _loss_fn(False, **opts)(rep, key, labels, valid, prob)
  (got, bank_samples), grad = _loss_fn(True, **opts)(rep, key, labels, valid, prob, bank)
  assert float(want) > 0
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-4, atol=1e-7)
  np.testing.assert_array_equal(bank_samples['query'], batch_samples['query'])
  # Slot j of class c holds the j-th valid pixel of c: the same keys were drawn.
  flat_labels, ok = labels.reshape(-1), valid.reshape(-1)
  pixel_of_slot = np.full(num_classes * size + 1, labels.size)
  for c in range(num_classes):
    pixels = np.nonzero(ok & (flat_labels == c))[0]
    pixel_of_slot[c * size + np.arange(len(pixels))] = pixels
  np.testing.assert_array_equal(pixel_of_slot[np.asarray(bank_samples['key'])],
                                batch_samples['key'])


def test_bank_supplies_prototype_and_negatives_a_one_class_batch_lacks():
  rng = np.random.default_rng(5)
  m, size = 8, BANK_SLOTS
  rep = rng.normal(size=(2, 6, 6, m)).astype(np.float32)
  labels = np.zeros((2, 6, 6), np.int32)  # one class: batch-mode ReCo gives 0
  valid = np.ones_like(labels, bool)
  prob = np.full((2, 6, 6, 4), 0.25, np.float32)  # every pixel a hard query
  keys = np.zeros((4, size, m), np.float32)
  keys[0, :3] = rng.normal(size=(3, m))  # class 0: 3 entries, class 1: 5, classes 2-3: none
  keys[1, :5] = rng.normal(size=(5, m))
  keys[1, 5:] = 100.0  # stale values past the fill level must never be read
  bank = {'keys': jnp.asarray(keys), 'count': jnp.asarray([3, 5, 0, 0], jnp.int32),
          'pointer': jnp.asarray([3, 5, 0, 0], jnp.int32)}
  key = jax.random.key(6)
  (batch_loss, _), _ = _loss_fn(False, key_mode='active', shared_negatives=False)(
      rep, key, labels, valid, prob)
  (loss, samples), _ = _loss_fn(True, key_mode='active', shared_negatives=False)(
      rep, key, labels, valid, prob, bank)
  assert float(batch_loss) == 0.0
  negatives = np.asarray(samples['key'][0])
  assert negatives.min() >= size and negatives.max() < size + 5  # class 1's filled slots
  assert np.all(np.asarray(samples['key'][1:]) == 4 * size)  # no other query class
  # Every slot of class 1 is drawn about equally often (df = 4, 1e-4 critical value 23.5).
  counts = np.bincount(negatives.reshape(-1) - size, minlength=5).astype(np.float64)
  expected = counts.sum() / 5
  assert np.sum((counts - expected) ** 2 / expected) < 23.5
  # The value: prototype = mean of class 0's entries, V = 1 class in the batch.
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q = unit(rep.reshape(-1, m)[np.asarray(samples['query'][0])].astype(np.float64))
  pos = q @ unit(keys[0, :3].mean(0).astype(np.float64)) / TAU
  neg = np.einsum('qm,qnm->qn', q, unit(keys.reshape(-1, m)[negatives].astype(np.float64))) / TAU
  logits = np.concatenate([pos[:, None], neg], axis=1)
  top = logits.max(1, keepdims=True)
  want = np.mean(np.log(np.exp(logits - top).sum(1)) + top[:, 0] - pos)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)


# ----------------------------------------------------------------------------- devices


@functools.cache
def _model_and_initial_state():
  """The tiny model and its initial state with an empty bank of 12 slots (one init)."""
  config = helpers.tiny_config(reco=True, reco_bank_size=12)
  model = tiny_model()
  return model, state_lib.create_train_state(config, model, jax.random.key(0), (SIZE, SIZE, 3))


def test_bank_updates_are_the_same_on_one_and_four_devices():
  """Three steps' updates: the same bank on 1 and 4 devices, in branch-major pixel order."""
  config = _bank_config()
  size, writes = config.reco_bank_size, config.reco_bank_writes
  rng = np.random.default_rng(7)
  branches = []
  for _ in range(2):  # labelled, then pseudo-labelled: 8 images of 6 x 6 each
    rep = rng.normal(size=(8, 6, 6, 8)).astype(np.float32)
    labels = rng.integers(0, 3, (8, 6, 6)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.2] = 255
    logits = rng.normal(size=(8, 6, 6, 3)).astype(np.float32)
    branches.append(reco_recipe.Branch(rep, logits, labels, labels != 255))
  keys = [jax.random.key(k) for k in range(3)]

  def run(devices):
    mesh = parallel.make_mesh(jax.devices()[:devices])
    update = jax.jit(lambda key, branches, bank: reco_recipe.update_bank(
        key, branches, bank, mesh=mesh, config=config))
    on_mesh = parallel.shard_batch(mesh, branches)
    bank = jax.device_put(reco_bank.init(3, size, 8), parallel.replicated(mesh))
    for key in keys:
      bank = update(key, on_mesh, bank)
    return jax.tree.map(np.asarray, bank)

  one, four = run(1), run(4)
  for name in ('keys', 'count', 'pointer'):
    np.testing.assert_array_equal(one[name], four[name], err_msg=name)
  # The reference: the branches concatenated whole (not per device), chosen as one batch.
  cat = lambda arrays: jnp.concatenate([jnp.asarray(a) for a in arrays])
  labels, valid = cat([b.labels for b in branches]), cat([b.valid for b in branches])

  @jax.jit
  def reference_update(key, bank):
    priority, pixel_id = reco_recipe._write_order(key, [b.labels for b in branches])
    entries, num_new = reco_bank.choose(cat([b.rep for b in branches]), labels, valid,
                                        cat(priority), cat(pixel_id), num_classes=3,
                                        writes=writes)
    return reco_bank.write(bank, entries, num_new)

  bank = reco_bank.init(3, size, 8)
  for key in keys:
    bank = reference_update(key, bank)
  np.testing.assert_array_equal(one['keys'], np.asarray(bank['keys']))
  assert one['count'].tolist() == [size] * 3  # 3 steps x 8 writes: every queue wrapped
  assert one['pointer'].tolist() == [3 * writes % size] * 3


def test_supervised_step_on_four_devices_writes_the_steps_representations_to_the_bank():
  """create_train_state makes the bank; the step enqueues its keys into state.extras."""
  config = helpers.tiny_config(method='supervised', reco=True, reco_bank_size=12,
                                  reco_bank_writes=5)
  model, initial = _model_and_initial_state()
  empty = jax.tree.map(np.asarray, initial.extras[reco_bank.NAME])
  assert empty['keys'].shape == (NUM_CLASSES, 12, 8) and empty['keys'].dtype == np.float32
  assert not empty['keys'].any() and not empty['count'].any() and not empty['pointer'].any()
  np_batch = make_batch(supervised=True)
  images, labels = np_batch['labelled']['image'], np_batch['labelled']['label']
  key = jax.random.key(8)
  mesh = parallel.make_mesh(jax.devices()[:4])
  state = jax.device_put(jax.tree.map(jnp.copy, initial), parallel.replicated(mesh))
  batch = parallel.shard_batch(mesh, np_batch)
  step = helpers.suite_step(config, model, mesh, state, batch, key)
  banks = []
  for _ in range(3):
    state, metrics = step(state, batch, key)
    assert reco_bank.NAME not in metrics and float(metrics['reco_loss']) > 0
    banks.append(jax.tree.map(np.asarray, state.extras[reco_bank.NAME]))

  @jax.jit
  def first_entries(variables):
    """What step 1 must have written, computed on the whole batch at once."""
    (_, rep), _ = model.apply(variables, images, train=True, mutable=['batch_stats'])
    small, valid = reco_recipe.resize_targets(jnp.asarray(labels), jnp.asarray(labels) != 255,
                                              rep.shape[1:3])
    _, k_write = jax.random.split(common.step_keys(key, jnp.asarray(0))[2])
    priority, pixel_id = reco_recipe._write_order(k_write, [small])
    return reco_bank.choose(rep, small, valid, priority[0], pixel_id[0],
                            num_classes=NUM_CLASSES, writes=5)

  entries, num_new = first_entries(initial.student_variables())
  assert num_new.tolist() == [5] * NUM_CLASSES
  np.testing.assert_allclose(banks[0]['keys'][:, :5], entries, rtol=1e-4, atol=1e-5)
  assert np.all(banks[0]['keys'][:, 5:] == 0) and banks[0]['count'].tolist() == [5] * 3
  # Every class fills 5 slots a step: 3 steps wrap each queue of 12.
  assert banks[2]['count'].tolist() == [12] * 3 and banks[2]['pointer'].tolist() == [3] * 3


def test_bad_bank_settings_are_rejected():
  with pytest.raises(ValueError, match='non-negative integer'):
    reco_bank.settings(_bank_config(reco_bank_size=-1))
  with pytest.raises(ValueError, match='non-negative integer'):
    reco_bank.settings(_bank_config(reco_bank_size=2.5))
  with pytest.raises(ValueError, match='reco_bank_writes must be a positive'):
    reco_bank.settings(_bank_config(reco_bank_writes=0))
  with pytest.raises(ValueError, match='reco=True'):
    reco_bank.settings(_bank_config(reco=False))
  with pytest.raises(ValueError, match='average_prototypes'):
    reco_bank.settings(_bank_config(average_prototypes=True))
  assert reco_bank.settings(_bank_config(reco_bank_size=0)) == (0, 0)
  assert reco_bank.settings(_bank_config(reco_bank_size=4)) == (4, 4)  # writes capped at K
  bank = reco_bank.init(2, 3, 4)
  with pytest.raises(ValueError, match='do not fit'):
    reco_bank.write(bank, jnp.zeros((2, 4, 4)), jnp.zeros(2, jnp.int32))
  rep, labels, valid, prob = _random_batch(0)
  with pytest.raises(ValueError, match='bank keys must be'):
    reco.reco_loss(jax.random.key(0), rep, labels, valid, prob, bank=reco_bank.init(4, 3, 5))
  with pytest.raises(ValueError, match='exclude each other'):
    reco.reco_loss(jax.random.key(0), rep, labels, valid, prob, bank=reco_bank.init(4, 3, 8),
                   prototype_stats=reco.class_statistics(rep, labels, valid, 4))


# ----------------------------------------------------------------------------- resume


def test_resumed_mean_teacher_run_with_bank_matches_uninterrupted_run(tmp_path):
  """ClassMix + ReCo with a bank: saved at step 2, restored as train.py does, continued."""
  config = helpers.tiny_config(method='classmix', reco=True, reco_bank_size=12,
                                  reco_bank_writes=5)
  model, initial = _model_and_initial_state()
  mesh = parallel.make_mesh(jax.devices()[:1])
  initial = jax.device_put(initial, parallel.replicated(mesh))
  batches = [parallel.shard_batch(mesh, make_batch(seed=i)) for i in range(4)]
  key = jax.random.key(9)
  step = helpers.suite_step(config, model, mesh, initial, batches[0], key)
  copy = lambda state: jax.tree.map(jnp.copy, state)

  full = copy(initial)
  for batch in batches:
    full, metrics = step(full, batch, key)
    assert float(metrics['reco_loss']) > 0
  killed = copy(initial)
  for batch in batches[:2]:
    killed, _ = step(killed, batch, key)
  manager, best_manager = workdir_lib.checkpoint_managers(tmp_path, 2)
  manager.save(2, args=ocp.args.StandardSave(killed))
  manager.wait_until_finished()
  saved_bank = jax.tree.map(np.asarray, killed.extras[reco_bank.NAME])
  del killed
  resumed = manager.restore(2, args=ocp.args.StandardRestore(helpers.abstract(initial)))
  manager.close()
  best_manager.close()
  for name, value in jax.tree.map(np.asarray, resumed.extras[reco_bank.NAME]).items():
    np.testing.assert_array_equal(value, saved_bank[name], err_msg=name)
  assert saved_bank['count'].tolist() == [10] * NUM_CLASSES
  for batch in batches[2:]:
    resumed, _ = step(resumed, batch, key)
  host = lambda tree: jax.tree.map(np.asarray, tree)
  bank = host(full.extras[reco_bank.NAME])
  assert bank['count'].tolist() == [12] * 3 and bank['pointer'].tolist() == [8] * 3
  for name in ('params', 'batch_stats', 'opt_state', 'ema_params', 'ema_batch_stats',
               'extras'):
    a, b = host(getattr(full, name)), host(getattr(resumed, name))
    assert jax.tree.structure(a) == jax.tree.structure(b), name
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(x, y, rtol=0, atol=1e-6, err_msg=name)

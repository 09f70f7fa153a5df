"""CutOut / CutMix / ClassMix as the reference ReCo's generate_unsup_data."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reco_jax.semi import mixing

VOID = 255
B, H, W = 6, 9, 13

_mix = jax.jit(mixing.mix, static_argnames=('mode', 'num_classes'))


def _inputs(seed, num_classes=6):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(B, H, W, 3)).astype(np.float32)
  labels = np.zeros((B, H, W), np.int32)
  for i in range(B):
    # Each sample uses its own random subset of the classes.
    classes = rng.choice(num_classes, size=rng.integers(1, num_classes + 1),
                         replace=False)
    labels[i] = rng.choice(classes, size=(H, W))
  conf = rng.uniform(size=(B, H, W)).astype(np.float32)
  return images, labels, conf


def _assert_box(mask):
  """mask [H, W] is one axis-aligned box of the reference's size."""
  rows, cols = np.any(mask, 1), np.any(mask, 0)
  np.testing.assert_array_equal(mask, rows[:, None] & cols[None, :])
  h, w = rows.sum(), cols.sum()
  assert np.all(np.diff(np.flatnonzero(rows)) == 1)
  assert np.all(np.diff(np.flatnonzero(cols)) == 1)
  assert W // 2 + 1 <= w <= W - 1
  assert h == np.round(H * W / 2 / w)
  assert abs(h * w - H * W / 2) <= w / 2
  return h, w


def test_box_mask_is_half_area_box_covering_every_position():
  masks = np.asarray(jax.jit(mixing.box_mask, static_argnums=(1, 2, 3))(
      jax.random.key(0), 400, H, W))
  widths, lefts = set(), set()
  for m in masks:
    _, w = _assert_box(m)
    widths.add(w)
    lefts.add((np.flatnonzero(m.any(0))[0], w))
  assert widths == set(range(W // 2 + 1, W))
  # For the narrowest box every left edge 0..W-w occurs.
  w_min = W // 2 + 1
  assert {x for x, w in lefts if w == w_min} == set(range(W - w_min + 1))


def test_cutout_voids_box_labels_and_zeroes_image_and_confidence():
  images, labels, conf = _inputs(1)
  out_im, out_lab, out_conf = _mix(jax.random.key(1), images, labels, conf,
                                   mode='cutout')
  out_im, out_lab, out_conf = map(np.asarray, (out_im, out_lab, out_conf))
  for i in range(B):
    box = out_lab[i] == VOID
    _assert_box(box)
    assert np.all(out_im[i][box] == 0) and np.all(out_conf[i][box] == 0)
    np.testing.assert_array_equal(out_im[i][~box], images[i][~box])
    np.testing.assert_array_equal(out_lab[i][~box], labels[i][~box])
    np.testing.assert_array_equal(out_conf[i][~box], conf[i][~box])


def test_cutmix_box_comes_from_next_sample_consistently():
  images, labels, conf = _inputs(2)
  labels = np.broadcast_to(np.arange(B)[:, None, None], (B, H, W)).astype(
      np.int32)
  out_im, out_lab, out_conf = map(np.asarray, _mix(
      jax.random.key(2), images, labels, conf, mode='cutmix'))
  for i in range(B):
    nxt = (i + 1) % B
    box = out_lab[i] == nxt
    _assert_box(box)
    np.testing.assert_array_equal(out_lab[i][~box], i)
    np.testing.assert_array_equal(
        out_im[i], np.where(box[..., None], images[nxt], images[i]))
    np.testing.assert_array_equal(
        out_conf[i], np.where(box, conf[nxt], conf[i]))


def test_classmix_pastes_half_of_present_classes_over_next_sample():
  num_classes = 6
  images, labels, conf = _inputs(3, num_classes)
  labels[0, :2] = VOID  # void is never a class to paste
  counts = np.zeros((B, num_classes))
  draws = 20
  for seed in range(draws):
    out_im, out_lab, out_conf = map(np.asarray, _mix(
        jax.random.key(seed), images, labels, conf, mode='classmix',
        num_classes=num_classes))
    for i in range(B):
      nxt = (i + 1) % B
      # Image values are distinct floats: they tell the source of each pixel.
      from_self = np.all(out_im[i] == images[i], -1)
      assert np.all(from_self | np.all(out_im[i] == images[nxt], -1))
      present = set(np.unique(labels[i])) - {VOID}
      pasted = set(np.unique(labels[i][from_self]))
      assert pasted <= present
      assert len(pasted) == len(present) // 2
      np.testing.assert_array_equal(
          from_self, np.isin(labels[i], list(pasted)))
      np.testing.assert_array_equal(
          out_lab[i], np.where(from_self, labels[i], labels[nxt]))
      np.testing.assert_array_equal(
          out_conf[i], np.where(from_self, conf[i], conf[nxt]))
      counts[i, list(pasted)] += 1
  # Every present class of a sample with >= 2 classes is sometimes chosen and
  # sometimes not: the choice is random.
  for i in range(B):
    present = sorted(set(np.unique(labels[i])) - {VOID})
    if len(present) >= 2:
      assert np.all(counts[i, present] > 0)
      assert np.all(counts[i, present] < draws)


def test_class_mask_selection_is_uniform_over_present_classes():
  labels = jnp.asarray(np.tile(np.arange(4), (2000, 1, 3)), jnp.int32)
  _, selected = jax.jit(functools.partial(mixing.class_mask, num_classes=5))(
      jax.random.key(4), labels)
  selected = np.asarray(selected)
  assert np.all(selected.sum(-1) == 2) and not selected[:, 4].any()
  np.testing.assert_allclose(selected[:, :4].mean(0), 0.5, atol=0.05)


def test_mix_jit_compiles_keeps_dtypes_and_depends_only_on_key():
  images, labels, conf = _inputs(5)
  for mode in mixing.MODES:
    first = _mix(jax.random.key(5), images, labels, conf, mode=mode,
                 num_classes=6)
    again = _mix(jax.random.key(5), images, labels, conf, mode=mode,
                 num_classes=6)
    other = _mix(jax.random.key(6), images, labels, conf, mode=mode,
                 num_classes=6)
    for a, b, x in zip(first, again, (images, labels, conf)):
      np.testing.assert_array_equal(a, b)
      assert a.dtype == x.dtype and a.shape == x.shape
    assert not np.array_equal(first[1], other[1])


def test_mix_rejects_bad_mode_and_missing_num_classes():
  images, labels, conf = _inputs(6)
  with pytest.raises(ValueError, match='mode must be one of'):
    mixing.mix(jax.random.key(0), images, labels, conf, 'mixup')
  with pytest.raises(ValueError, match='num_classes'):
    mixing.mix(jax.random.key(0), images, labels, conf, 'classmix')
  with pytest.raises(ValueError, match='expected images'):
    mixing.mix(jax.random.key(0), images[:, :4], labels, conf, 'cutmix')


def test_mix_is_the_same_on_a_sharded_batch():
  # Partners (i + 1) % B and random draws are global: sharding the batch over
  # devices must not change the result.
  devices = jax.devices()
  if len(devices) < 2:
    pytest.skip('needs 2 devices')
  mesh = jax.make_mesh((2,), ('data',), devices=devices[:2],
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh,
                                        jax.sharding.PartitionSpec('data'))
  images, labels, conf = _inputs(7)
  sharded = [jax.device_put(a, sharding) for a in (images, labels, conf)]
  key = jax.random.key(7)
  for mode in ('cutmix', 'classmix'):
    local = _mix(key, images, labels, conf, mode=mode, num_classes=6)
    spread = _mix(key, *sharded, mode=mode, num_classes=6)
    for a, b in zip(local, spread):
      np.testing.assert_array_equal(a, b)

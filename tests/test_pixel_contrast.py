"""Pixel contrastive loss (Zhao et al.) against a loop over its formula."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reco_jax.losses import pixel_contrast as pc
from reco_jax.models import resize

VOID = 255

# Jitted once per shape: much faster than op-by-op dispatch.
_within = jax.jit(pc.within_image_loss,
                  static_argnames=('ignore_labels', 'temperature'))
_cross = jax.jit(pc.cross_image_loss,
                 static_argnames=('ignore_labels', 'temperature'))
_two_view = jax.jit(pc.two_view_loss,
                    static_argnames=('mode', 'ignore_labels', 'temperature'))


def _np_loss(feats, labels, ignore, tau, same_image=None):
  """Loops over images, anchors and positives, straight from the formula."""
  b, n, _ = feats.shape
  image_losses = []
  for bi in range(b):
    f = feats[bi].astype(np.float64)
    lab = labels[bi]
    anchor_losses = []
    for i in range(n):
      if lab[i] in ignore:
        continue
      def logit(j, i=i, f=f):
        return float(f[i] @ f[j]) / tau
      negs = [k for k in range(n) if lab[k] not in ignore and lab[k] != lab[i]
              and (same_image is None or same_image[i, k])]
      neg_sum = sum(np.exp(logit(k)) for k in negs)
      terms = []
      for j in range(n):
        if lab[j] in ignore or lab[j] != lab[i]:
          continue
        e = np.exp(logit(j))
        terms.append(-np.log(e / (e + neg_sum)))
      if terms:
        anchor_losses.append(np.mean(terms))
    image_losses.append(np.mean(anchor_losses) if anchor_losses else 0.0)
  return np.mean(image_losses)


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _inputs(seed, b=2, n=6, d=4):
  rng = np.random.default_rng(seed)
  feats = _unit(rng.normal(size=(b, n, d))).astype(np.float32)
  labels = np.array([[0, 1, 0, VOID, 1, 2], [2, 2, 1, 3, VOID, 3]], np.int32)
  return feats, labels[:b, :n]


@pytest.mark.parametrize('tau', [0.07, 0.5])
def test_within_image_loss_matches_loop(tau):
  feats, labels = _inputs(0)
  expected = _np_loss(feats, labels, (VOID,), tau)
  got = _within(jnp.asarray(feats), jnp.asarray(labels),
                             temperature=tau)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_within_image_loss_respects_every_ignore_label():
  feats, labels = _inputs(1)
  ignore = (VOID, 2)
  expected = _np_loss(feats, labels, ignore, 0.07)
  got = _within(jnp.asarray(feats), jnp.asarray(labels),
                             ignore_labels=ignore)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # Ignored pixels' features must not matter at all.
  moved = feats.copy()
  moved[np.isin(labels, ignore)] = _unit(np.ones(feats.shape[-1]))
  got_moved = _within(jnp.asarray(moved), jnp.asarray(labels),
                                   ignore_labels=ignore)
  np.testing.assert_allclose(got_moved, got, rtol=1e-6)
  assert abs(float(got) - _np_loss(feats, labels, (VOID,), 0.07)) > 1e-4


def test_image_without_valid_pixels_counts_as_zero_in_batch_mean():
  feats, labels = _inputs(2)
  labels[1] = VOID
  one = _within(jnp.asarray(feats[:1]), jnp.asarray(labels[:1]))
  both = _within(jnp.asarray(feats), jnp.asarray(labels))
  np.testing.assert_allclose(both, 0.5 * one, rtol=1e-6)
  assert float(one) > 0


def test_cross_image_loss_matches_loop_with_own_image_negatives():
  f1, l1 = _inputs(3)
  f2, _ = _inputs(4)
  l2 = np.array([[1, 4, 0, 0, VOID, 4], [3, 1, 1, 2, 2, VOID]], np.int32)
  feats = np.concatenate([f1, f2], 1)
  labels = np.concatenate([l1, l2], 1)
  image = np.repeat([0, 1], 6)
  same_image = image[:, None] == image[None, :]
  expected = _np_loss(feats, labels, (VOID,), 0.07, same_image)
  got = _cross(jnp.asarray(f1), jnp.asarray(f2), jnp.asarray(l1),
                            jnp.asarray(l2))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # Negatives drawn from both images would give another value.
  assert abs(_np_loss(feats, labels, (VOID,), 0.07) - expected) > 1e-3


def test_losses_have_finite_gradients_when_anchors_lack_negatives():
  feats, _ = _inputs(5)
  labels = jnp.asarray([[0, 0, 0, VOID, 0, 0], [1, 1, 2, 2, VOID, 1]])
  grad = jax.jit(jax.grad(lambda f: pc.within_image_loss(f, labels)))(
      jnp.asarray(feats))
  assert np.all(np.isfinite(grad))
  assert np.all(np.asarray(grad)[0] == 0)  # image 0 has a single class
  grad = jax.jit(jax.grad(
      lambda f: pc.cross_image_loss(f, f, labels, labels)))(jnp.asarray(feats))
  assert np.all(np.isfinite(grad))


def test_two_view_within_is_sum_of_both_views():
  f1, l1 = _inputs(6)
  f2, l2 = _inputs(7)
  got = _two_view(jax.random.key(0), f1, f2, l1, l2, mode='within')
  expected = (_np_loss(f1, l1, (VOID,), 0.07)
              + _np_loss(f2, l2, (VOID,), 0.07))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_two_view_cross_pairs_with_shuffled_distorted_views():
  rng = np.random.default_rng(8)
  b, n = 3, 6
  f1 = _unit(rng.normal(size=(b, n, 4))).astype(np.float32)
  f2 = _unit(rng.normal(size=(b, n, 4))).astype(np.float32)
  l1 = rng.integers(0, 3, size=(b, n)).astype(np.int32)
  l2 = rng.integers(0, 3, size=(b, n)).astype(np.int32)
  candidates = {
      perm: float(_cross(f1, f2[list(perm)], l1, l2[list(perm)]))
      for perm in itertools.permutations(range(b))}
  assert len({round(v, 5) for v in candidates.values()}) == len(candidates)
  seen = set()
  for seed in range(12):
    got = float(_two_view(jax.random.key(seed), f1, f2, l1, l2, mode='cross'))
    match = [p for p, v in candidates.items() if abs(v - got) < 1e-5]
    assert len(match) == 1
    seen.add(match[0])
  assert len(seen) >= 3  # the shuffle really depends on the key


def test_two_view_resizes_labels_to_feature_grid_with_nearest():
  rng = np.random.default_rng(9)
  f1 = _unit(rng.normal(size=(2, 2, 3, 4))).astype(np.float32)
  f2 = _unit(rng.normal(size=(2, 2, 3, 4))).astype(np.float32)
  l1 = rng.integers(0, 3, size=(2, 4, 7)).astype(np.int32)
  l2 = rng.integers(0, 3, size=(2, 4, 7)).astype(np.int32)
  # The released code's resize_nearest_neighbor(align_corners=True): source index
  # round(dst * (in - 1) / (out - 1)), halves up: rows 0, 3 of 4; columns 0, 3, 6 of 7.
  rows, cols = np.array([0, 3]), np.array([0, 3, 6])
  small1 = l1[:, rows][:, :, cols].reshape(2, -1)
  small2 = l2[:, rows][:, :, cols].reshape(2, -1)
  got = _two_view(jax.random.key(0), f1, f2, l1, l2, mode='within')
  expected = (_np_loss(f1.reshape(2, 6, 4), small1, (VOID,), 0.07)
              + _np_loss(f2.reshape(2, 6, 4), small2, (VOID,), 0.07))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize('size_in, size_out', [(33, 7), (64, 16), (321, 41), (97, 25)])
def test_labels_land_on_their_features_grid(size_in, size_out):
  """Every resized label is the label of the source pixel nearest its feature's position.

  Features carry their own source position (a coordinate map resized bilinearly with
  align_corners, as the projection head resizes features); labels mark a class boundary at a
  known column. Each embedding pixel's label must be the class of the source pixel nearest to
  where its feature was sampled. PyTorch's floor rule, on these non-divisible grids, puts some
  labels up to a pixel away.
  """
  coords = np.broadcast_to(np.arange(size_in, dtype=np.float32)[None, None, :, None],
                           (1, size_in, size_in, 1))
  position = np.asarray(resize.bilinear_align_corners(jnp.asarray(coords),
                                                      (size_out, size_out)))[0, 0, :, 0]
  for boundary in (size_in // 3, size_in // 2, 2 * size_in // 3):
    labels = (np.arange(size_in)[None, None, :] >= boundary).astype(np.int32)
    labels = np.broadcast_to(labels, (1, size_in, size_in))
    got = np.asarray(resize.nearest_align_corners(jnp.asarray(labels),
                                                  (size_out, size_out)))[0, 0]
    np.testing.assert_array_equal(got, np.floor(position + 0.5) >= boundary)
  columns = np.broadcast_to(np.arange(size_in, dtype=np.int32), (1, size_in, size_in))
  landed = np.asarray(resize.nearest_align_corners(jnp.asarray(columns),
                                                   (size_out, size_out)))[0, 0]
  assert np.abs(landed - position).max() <= 0.5 + 1e-4
  floor_rule = np.asarray(resize.nearest(jnp.asarray(columns), (size_out, size_out)))[0, 0]
  assert np.abs(floor_rule - position).max() > 0.5  # the rule this replaced misses


def test_two_view_rejects_unknown_mode():
  f, l = _inputs(0)
  with pytest.raises(ValueError, match="'within' or 'cross'"):
    pc.two_view_loss(jax.random.key(0), f, f, l, l, mode='both')


def _np_bilinear_align_corners(x, size):
  """Output (i, j) samples input (i (H-1) / (h-1), j (W-1) / (w-1))."""
  b, in_h, in_w, c = x.shape
  out = np.zeros((b,) + tuple(size) + (c,))
  for i in range(size[0]):
    for j in range(size[1]):
      y = i * (in_h - 1) / (size[0] - 1)
      x_ = j * (in_w - 1) / (size[1] - 1)
      y0, x0 = min(int(y), in_h - 2), min(int(x_), in_w - 2)
      fy, fx = y - y0, x_ - x0
      out[:, i, j] = ((1 - fy) * (1 - fx) * x[:, y0, x0]
                      + (1 - fy) * fx * x[:, y0, x0 + 1]
                      + fy * (1 - fx) * x[:, y0 + 1, x0]
                      + fy * fx * x[:, y0 + 1, x0 + 1])
  return out


def test_projection_head_layers_resize_and_unit_norm():
  head = pc.ProjectionHead(num_layers=2, hidden_dim=8, out_dim=5, size=(3, 4))
  x = jax.random.normal(jax.random.key(1), (2, 6, 7, 3))

  @jax.jit
  def init_and_apply(key, x):
    variables = head.init(key, x)
    return variables, head.apply(variables, x, mutable=['batch_stats'])

  variables, (y, updates) = init_and_apply(jax.random.key(2), x)
  params = variables['params']
  assert params['conv0']['kernel'].shape == (1, 1, 3, 8)
  assert 'bias' not in params['conv0']
  assert params['conv_final']['kernel'].shape == (1, 1, 8, 5)
  assert params['conv_final']['bias'].shape == (5,)
  # PyTorch's default conv init: uniform within 1 / sqrt(fan_in).
  for name, fan_in in (('conv0', 3), ('conv_final', 8)):
    bound = 1 / np.sqrt(fan_in)
    kernel = np.abs(np.asarray(params[name]['kernel']))
    assert kernel.max() <= bound and kernel.max() > 0.5 * bound
  bias = np.abs(np.asarray(params['conv_final']['bias']))
  assert bias.max() <= 1 / np.sqrt(8)
  assert y.shape == (2, 3, 4, 5) and y.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), 1.0, rtol=1e-5)
  # Same computation by hand: resize, conv, train-mode BN, ReLU, conv, L2.
  r = _np_bilinear_align_corners(np.asarray(x, np.float64), (3, 4))
  h = r @ np.asarray(params['conv0']['kernel'][0, 0])
  h = (h - h.mean((0, 1, 2))) / np.sqrt(h.var((0, 1, 2)) + 1e-5)
  h = np.maximum(h * np.asarray(params['bn0']['scale'])
                 + np.asarray(params['bn0']['bias']), 0)
  o = h @ np.asarray(params['conv_final']['kernel'][0, 0]) + np.asarray(
      params['conv_final']['bias'])
  np.testing.assert_allclose(y, _unit(o), atol=1e-4)
  # PyTorch momentum 0.1: running mean moves 10% of the way.
  batch_mean = (r @ np.asarray(params['conv0']['kernel'][0, 0])).mean((0, 1, 2))
  np.testing.assert_allclose(updates['batch_stats']['bn0']['mean'],
                             0.1 * batch_mean, atol=1e-5)

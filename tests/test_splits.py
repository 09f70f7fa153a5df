"""Labelled-subset selection and partial labels (ReCo paper section 4; the reference's sampler)."""
import time

import numpy as np
import pytest

from reco_jax.data import splits


def _random_dataset(num_images=300, num_classes=6, rare_images=5, seed=0):
  """ids and present classes; class num_classes - 1 is rare (in `rare_images` images only)."""
  rng = np.random.default_rng(seed)
  ids, classes = [], []
  for i in range(num_images):
    k = rng.integers(1, 4)
    c = set(rng.choice(num_classes - 1, size=k, replace=False).tolist())
    if i < rare_images:
      c |= {num_classes - 1, 0}
    if rng.random() < 0.3:
      c.add(255)  # void is never a class
    ids.append(f'img{i:04d}')
    classes.append(sorted(c))
  return ids, classes


def _reference_rule(eligible_in_visit_order, present, num_labels, num_classes):
  """The VOC/Cityscapes sampler of the ReCo code, step by step (terminates on these inputs)."""
  pending, deferred, chosen = list(eligible_in_visit_order), [], []
  counter = np.zeros(num_classes)
  fill = np.arange(num_classes)
  while len(chosen) < num_labels:
    if not pending:
      pending, deferred = deferred, []
    image_id = pending.pop()
    if np.isin(fill, present[image_id]).any():
      chosen.append(image_id)
      counter[present[image_id]] += 1
    else:
      deferred.append(image_id)
    fill = np.where(counter == counter.min())[0]
  return chosen


def test_chosen_images_follow_the_rule_and_favour_rare_classes():
  ids, classes = _random_dataset()
  chosen = splits.select_labelled(ids, classes, 40, min_classes=2, num_classes=6, seed=0)
  assert len(chosen) == len(set(chosen)) == 40
  present = dict(zip(ids, classes))
  for image_id in chosen:
    assert len([c for c in present[image_id] if c != 255]) >= 2
  # All five images of the rare class are chosen: its count stays the lowest, so its images are
  # taken first; a uniform draw of 40 of 300 would hold fewer than one of them on average.
  assert {f'img{i:04d}' for i in range(5)} <= set(chosen)
  counts = np.zeros(6)
  for image_id in chosen:
    counts[[c for c in present[image_id] if c != 255]] += 1
  assert counts.min() >= 5


def test_same_choices_as_the_reference_rule_when_it_terminates():
  ids, classes = _random_dataset(rare_images=40, seed=1)
  present = {i: np.array([c for c in cs if c != 255]) for i, cs in zip(ids, classes)}
  eligible = sorted(i for i in ids if present[i].size >= 2)
  order = [eligible[k] for k in np.random.default_rng(7).permutation(len(eligible))]
  expected = _reference_rule(order, present, 60, 6)
  got = splits.select_labelled(ids, classes, 60, min_classes=2, num_classes=6, seed=7)
  assert got == expected


def test_deterministic_by_seed_and_seeds_differ():
  ids, classes = _random_dataset()
  kw = dict(min_classes=1, num_classes=6)
  a = splits.select_labelled(ids, classes, 30, seed=3, **kw)
  b = splits.select_labelled(list(reversed(ids)), list(reversed(classes)), 30, seed=3, **kw)
  c = splits.select_labelled(ids, classes, 30, seed=4, **kw)
  assert a == b  # input order does not matter
  assert a != c


def test_zero_labels_means_all_images():
  ids, classes = _random_dataset(num_images=20)
  assert splits.select_labelled(ids, classes, 0, min_classes=3, num_classes=6,
                                seed=0) == sorted(ids)


def test_finishes_where_the_literal_rule_would_loop_forever():
  # Class 2 is only in one image: once that image is chosen its count stays 1 while the others
  # grow, and the literal rule would wait forever for another image with class 2.
  ids = [f'i{k}' for k in range(12)]
  classes = [[0, 1]] * 11 + [[0, 1, 2]]
  t0 = time.monotonic()
  chosen = splits.select_labelled(ids, classes, 10, min_classes=2, num_classes=3, seed=0)
  assert time.monotonic() - t0 < 5
  assert len(set(chosen)) == 10 and 'i11' in chosen


@pytest.mark.parametrize('num_labels,min_classes,match', [
    (5, 4, 'only 3 of the 6 images'),
    (7, 1, 'only 6'),
    (-1, 1, '>= 0'),
])
def test_impossible_requests_raise_quickly(num_labels, min_classes, match):
  ids = [f'i{k}' for k in range(6)]
  classes = [[0, 1, 2, 3], [0, 1, 2, 3], [1, 2, 3, 4], [0], [1, 255], [255]]
  t0 = time.monotonic()
  with pytest.raises(ValueError, match=match):
    splits.select_labelled(ids, classes, num_labels, min_classes=min_classes, num_classes=5,
                           seed=0)
  assert time.monotonic() - t0 < 5


def test_uniform_subset_is_seeded_and_reproducible():
  ids, _ = _random_dataset()
  a = splits.select_uniform(ids, 40, seed=3)
  assert len(a) == len(set(a)) == 40 and set(a) <= set(ids)
  assert splits.select_uniform(list(reversed(ids)), 40, seed=3) == a  # input order no matter
  assert splits.select_uniform(ids, 40, seed=4) != a
  assert splits.select_uniform(ids, 10, seed=3) == a[:10]  # a smaller budget is nested
  assert splits.select_uniform(ids, 0, seed=3) == sorted(ids)
  with pytest.raises(ValueError, match='only 300'):
    splits.select_uniform(ids, 301, seed=0)
  with pytest.raises(ValueError, match='unique'):
    splits.select_uniform(['a', 'a'], 1, seed=0)


def test_uniform_subset_ignores_the_class_rule():
  ids, classes = _random_dataset()
  present = {i: [c for c in cs if c != 255] for i, cs in zip(ids, classes)}
  # Class 5 is in 5 of the 300 images: the class-balanced rule takes all 5, a uniform draw of
  # 40 about 0.7 of them on average (all 5 with odds below 1e-4).
  rare = {f'img{i:04d}' for i in range(5)}
  kw = dict(min_classes=2, num_classes=6)
  assert all(rare <= set(splits.select_labelled(ids, classes, 40, seed=s, **kw))
             for s in range(3))
  assert not any(rare <= set(splits.select_uniform(ids, 40, seed=s)) for s in range(20))
  # Nor does min_classes apply: images of one class are drawn (about a third of them)...
  assert any(len(present[i]) == 1 for i in splits.select_uniform(ids, 40, seed=0))
  # ...and a budget the class-balanced rule cannot meet stays an error there only.
  with pytest.raises(ValueError, match='with at least 4 classes each'):
    splits.select_labelled(ids, classes, 40, min_classes=4, num_classes=6, seed=0)
  assert len(splits.select_uniform(ids, 40, seed=0)) == 40


@pytest.mark.parametrize('total, labels', [(10582, 2118), (2975, 596)])
def test_zhaos_label_fractions_are_drawn_in_full(total, labels):
  # Zhao et al.'s settings: VOC 2,118 of 10,582 train images, Cityscapes 596 of 2,975.
  ids = [f'img{i:05d}' for i in range(total)]
  chosen = splits.select_uniform(ids, labels, seed=0)
  assert len(set(chosen)) == labels and set(chosen) <= set(ids)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match='one list of present classes per id'):
    splits.select_labelled(['a', 'b'], [[0]], 1, min_classes=1, num_classes=2, seed=0)
  with pytest.raises(ValueError, match='outside'):
    splits.select_labelled(['a'], [[5]], 1, min_classes=1, num_classes=2, seed=0)


def _label_with_regions():
  """A 60x80 label: big class 1, a class 2 split into two blobs, small class 3, void, class 0."""
  label = np.zeros((60, 80), np.uint8)
  label[5:55, 5:45] = 1
  label[5:20, 50:75] = 2
  label[40:55, 60:78] = 2
  label[25:28, 55:58] = 3
  label[:, :2] = 255
  return label


def _dilate5(mask):
  """Binary 5x5 square dilation (what cv2.dilate does with np.ones([5, 5]))."""
  h, w = mask.shape
  padded = np.pad(mask, 2)
  out = np.zeros_like(mask)
  for dy in range(5):
    for dx in range(5):
      out |= padded[dy:dy + h, dx:dx + w]
  return out


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_p0_keeps_exactly_one_true_pixel_per_class(seed):
  label = _label_with_regions()
  out = splits.partial_labels(label, 'p0', seed)
  assert out.dtype == np.uint8 and out.shape == label.shape
  for c in (0, 1, 2, 3):
    assert (out == c).sum() == 1
    assert label[out == c][0] == c
  assert ((out == 255) | (out == label)).all()


@pytest.mark.parametrize('mode,fraction', [('p1', 0.01), ('p5', 0.05), ('p25', 0.25)])
def test_grown_labels_match_the_dilation_loop(mode, fraction):
  label = _label_with_regions()
  for seed in range(4):
    out = splits.partial_labels(label, mode, seed)
    seeds = splits.partial_labels(label, 'p0', seed)  # same draw: the dilation's start pixel
    assert ((out == 255) | (out == label)).all()
    for c in (0, 1, 2, 3):
      cls = label == c
      target = int(fraction * cls.sum())
      grown = seeds == c
      kept = grown & cls
      while kept.sum() < target:
        grown = _dilate5(grown)
        kept = grown & cls
      np.testing.assert_array_equal(out == c, kept)
      assert (out == c).sum() >= max(target, 1)
    big = (out == 1).sum() / (label == 1).sum()
    assert fraction <= big <= 2.5 * fraction + 0.01


def test_partial_labels_deterministic_and_seed_dependent():
  label = _label_with_regions()
  a = splits.partial_labels(label[..., None], 'p5', 11)
  assert a.shape == (60, 80, 1)
  np.testing.assert_array_equal(a, splits.partial_labels(label[..., None], 'p5', 11))
  assert not np.array_equal(a, splits.partial_labels(label[..., None], 'p5', 12))
  assert splits.partial_seed(0, 'x') == splits.partial_seed(0, 'x') != splits.partial_seed(1, 'x')


def test_partial_labels_bad_input():
  with pytest.raises(ValueError, match='mode must be one of'):
    splits.partial_labels(np.zeros((4, 4), np.uint8), 'p10', 0)
  with pytest.raises(ValueError, match='uint8'):
    splits.partial_labels(np.zeros((4, 4), np.int32), 'p1', 0)

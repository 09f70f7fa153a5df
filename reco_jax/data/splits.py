"""Labelled subsets (partial dataset, full labels) and partial labels (full dataset, partial ones).

Both follow the ReCo paper's protocol (section 4.1 and 4.3; the reference's `get_pascal_idx`
and its partial-label generation), except the uniform subsets of Zhao et al.'s settings
(`select_uniform`), and are deterministic by seed, so every process of a multi-host run
derives the same subset and the same partial labels on its own.
"""
from collections.abc import Sequence
import hashlib

import numpy as np

from reco_jax import names


def _eligible(ids, classes, num_labels, min_classes, num_classes):
  """Checks `select_labelled`'s inputs; returns (the sorted ids of images with at least
  min_classes classes, {id: its classes}), or (every id sorted, {}) when num_labels == 0."""
  if len(ids) != len(classes):
    raise ValueError(f'select_labelled: got {len(ids)} ids but {len(classes)} class lists; pass '
                     'one list of present classes per id.')
  if len(set(ids)) != len(ids):
    raise ValueError('select_labelled: image ids must be unique.')
  if num_labels < 0:
    raise ValueError(f'select_labelled: num_labels must be >= 0 (0 = all images), got '
                     f'{num_labels}.')
  if min_classes < 1 or num_classes <= 0:
    raise ValueError(f'select_labelled: need min_classes >= 1 and num_classes > 0, got '
                     f'{min_classes} and {num_classes}.')
  if num_labels == 0:
    return sorted(ids), {}
  if num_labels > len(ids):
    raise ValueError(f'labels={num_labels} asks for {num_labels} labelled images but the '
                     f'split has only {len(ids)}; use labels=0 for all of them, or a smaller '
                     'labels=N.')

  present = {}
  for image_id, image_classes in zip(ids, classes):
    c = np.unique(np.asarray(image_classes, np.int64))
    c = c[c != names.VOID]
    if c.size and (c.min() < 0 or c.max() >= num_classes):
      raise ValueError(f'select_labelled: {image_id} has classes {c.tolist()} outside 0..'
                       f'{num_classes - 1} (and 255 for void); check num_classes.')
    present[image_id] = c
  eligible = [i for i in sorted(ids) if present[i].size >= min_classes]
  if len(eligible) < num_labels:
    raise ValueError(f'select_labelled: asked for {num_labels} labelled images with at least '
                     f'{min_classes} classes each, but only {len(eligible)} of the {len(ids)} '
                     'images have that many; ask for fewer labels or lower min_classes.')
  return eligible, present


def select_labelled(ids: Sequence[str], classes: Sequence[Sequence[int]], num_labels: int, *,
                    min_classes: int, num_classes: int, seed: int) -> list[str]:
  """Chooses `num_labels` images to keep labelled, balancing classes as ReCo does.

  The ids are shuffled with `seed` and visited in turn. An image is accepted when it has at least
  `min_classes` distinct non-void classes and contains one of the classes chosen least often so
  far; a rejected image is revisited after the remaining ones, and the passes repeat until
  `num_labels` images are chosen. A class that no remaining eligible image contains can never be
  chosen again, so it leaves the "least chosen" set (as the reference's SUN sampler does); while
  such classes exist the reference's VOC/Cityscapes sampler loops forever, and in every other case
  both make the same choices.

  Args:
    ids: image ids, one per image; their order does not matter (they are sorted first).
    classes: for each id, the class ids present in its label (void 255 is ignored).
    num_labels: how many images to choose; 0 means every image (the configs' "all labels").
    min_classes: the least number of distinct non-void classes a chosen image has (VOC 3,
      Cityscapes 12, SUN 1).
    num_classes: number of classes; class ids are 0 .. num_classes - 1.
    seed: shuffling seed; the same seed gives the same list.

  Returns:
    The chosen ids in the order they were chosen (all ids, sorted, when num_labels == 0).

  Raises:
    ValueError: on inconsistent inputs, or when fewer than `num_labels` images have
      `min_classes` classes (the request cannot be met).
  """
  eligible, present = _eligible(ids, classes, num_labels, min_classes, num_classes)
  if num_labels == 0:
    return eligible

  rng = np.random.default_rng(seed)
  pending = [eligible[k] for k in rng.permutation(len(eligible))]
  # For each class, how many images not chosen yet contain it.
  unchosen = np.zeros(num_classes, np.int64)
  for image_id in pending:
    unchosen[present[image_id]] += 1

  chosen = []
  counts = np.zeros(num_classes, np.int64)
  deferred = []
  progress = False
  while len(chosen) < num_labels:
    if not pending:
      if not progress:
        # Nothing changed during a whole pass, so nothing ever will; cannot happen while
        # eligible images remain (see the docstring), kept as a guard against hanging.
        raise ValueError(f'select_labelled: stuck after choosing {len(chosen)} of {num_labels} '
                         'images; no remaining image contains a least-chosen class.')
      pending, deferred, progress = deferred, [], False
    image_id = pending.pop()
    available = unchosen > 0  # never empty: this image is unchosen and has a class
    least = available & (counts == counts[available].min())
    if least[present[image_id]].any():
      chosen.append(image_id)
      counts[present[image_id]] += 1
      unchosen[present[image_id]] -= 1
      progress = True
    else:
      deferred.append(image_id)
  return chosen


def select_uniform(ids: Sequence[str], num_labels: int, *, seed: int) -> list[str]:
  """Chooses `num_labels` images uniformly at random, whatever their classes.

  Zhao et al.'s label settings are fractions of the training set drawn uniformly (VOC 2,118 of
  10,582 images, Cityscapes 596 of 2,975), not by ReCo's class-balanced rule
  (`select_labelled`). The ids are sorted and shuffled with `seed`; the first `num_labels` are
  chosen, so with one seed a smaller subset is part of every larger one.

  Args:
    ids: image ids, one per image; their order does not matter.
    num_labels: how many images to choose; 0 means every image.
    seed: shuffling seed; the same seed gives the same list.

  Returns:
    The chosen ids in the order they were drawn (all ids, sorted, when num_labels == 0).

  Raises:
    ValueError: repeated ids, or `num_labels` outside 0 .. len(ids).
  """
  if len(set(ids)) != len(ids):
    raise ValueError('select_uniform: image ids must be unique.')
  if num_labels < 0:
    raise ValueError(f'select_uniform: num_labels must be >= 0 (0 = all images), got '
                     f'{num_labels}.')
  if num_labels > len(ids):
    raise ValueError(f'labels={num_labels} asks for {num_labels} labelled images but the '
                     f'split has only {len(ids)}; use labels=0 for all of them, or a smaller '
                     'labels=N.')
  ordered = sorted(ids)
  if num_labels == 0:
    return ordered
  order = np.random.default_rng(seed).permutation(len(ordered))[:num_labels]
  return [ordered[k] for k in order]


def partial_seed(seed: int, image_id: str) -> int:
  """A stable per-image seed for `partial_labels` from a run seed and an image id."""
  digest = hashlib.sha256(f'{seed}:{image_id}'.encode()).digest()
  return int.from_bytes(digest[:8], 'little')


def partial_labels(label: np.ndarray, mode: str, seed: int) -> np.ndarray:
  """Keeps a few pixels of each class of a dense label, as in ReCo's partial-label setting.

  For every class present, one pixel is drawn uniformly from its pixels. 'p0' keeps only that
  pixel. 'p1'/'p5'/'p25' grow a square around it by repeated 5x5 dilations (each one widens the
  square by 2 pixels on every side, clipped to the image) until the square holds at least
  int(p * class pixels) pixels of the class, and keep the class pixels inside it; so the count
  reaches the target with the least number of dilations, and overshoots by at most one ring.
  The number of dilations is computed directly from each pixel's Chebyshev distance to the seed
  pixel, which is what the dilation loop would reach.

  Args:
    label: [H, W] (or [H, W, 1]) uint8 class ids, 255 = void.
    mode: one of 'p0', 'p1', 'p5', 'p25'.
    seed: random seed; the same seed and label give the same result.

  Returns:
    [H, W] (same shape as `label`) uint8: the kept pixels carry their class, all others 255.
  """
  if mode not in names.PARTIAL_FRACTIONS:
    raise ValueError(f'partial_labels: mode must be one of {sorted(names.PARTIAL_FRACTIONS)}, got {mode!r}.')
  label = np.asarray(label)
  if label.dtype != np.uint8 or not (label.ndim == 2 or (label.ndim == 3 and label.shape[-1] == 1)):
    raise ValueError(f'partial_labels: expected a uint8 label [H, W] or [H, W, 1], got '
                     f'{label.dtype} {label.shape}.')
  dense = label.reshape(label.shape[:2])
  fraction = names.PARTIAL_FRACTIONS[mode]
  rng = np.random.default_rng(seed)
  out = np.full_like(dense, names.VOID)
  for c in np.unique(dense):
    if c == names.VOID:
      continue
    ys, xs = np.nonzero(dense == c)
    k = rng.integers(ys.size)
    if mode == 'p0':
      out[ys[k], xs[k]] = c
      continue
    target = int(fraction * ys.size)
    # A pixel at Chebyshev distance d from the seed enters the square after ceil(d / 2) dilations.
    rings = (np.maximum(np.abs(ys - ys[k]), np.abs(xs - xs[k])) + 1) // 2
    dilations = np.partition(rings, target - 1)[target - 1] if target > 1 else 0
    keep = rings <= dilations
    out[ys[keep], xs[keep]] = c
  return out.reshape(label.shape)


def seeded_fraction(ids: Sequence[str], fraction: float, seed: int) -> list[str]:
  """A subset of round(fraction * len(ids)) ids (at least one), drawn with `seed`, in order."""
  count = max(1, int(round(fraction * len(ids))))
  rng = np.random.default_rng(int.from_bytes(
      hashlib.sha256(f'unlabelled_fraction/{seed}'.encode()).digest()[:8], 'little'))
  chosen = set(rng.choice(len(ids), size=count, replace=False).tolist())
  return [i for n, i in enumerate(ids) if n in chosen]


def labelled_subset(ids: Sequence[str], classes: Sequence[np.ndarray], num_labels: int, *,
                    min_classes: int, num_classes: int, seed: int,
                    labelled_pool: Sequence[str] | None = None,
                    subset: str = names.SUBSETS[0]) -> list[str]:
  """The labelled image ids, drawn from `labelled_pool` if given.

  subset: 'class_balanced' (`select_labelled`, ReCo's rule; min_classes and
  num_classes apply) or 'uniform' (`select_uniform`, Zhao et al.'s; the classes are
  not looked at).
  """
  if subset not in names.SUBSETS:
    raise ValueError(f'subset={subset!r}: expected one of {names.SUBSETS}.')
  pool_ids, pool_classes = list(ids), list(classes)
  if labelled_pool is not None:
    pool = set(labelled_pool)
    pool_ids = [i for i in ids if i in pool]
    pool_classes = [c for i, c in zip(ids, classes) if i in pool]
    if num_labels > len(pool_ids) or not pool_ids:
      raise ValueError(f'{num_labels} labelled images requested from a pool of '
                       f'{len(pool_ids)} train images ({len(pool)} listed); lower num_labels.')
  if subset == 'uniform':
    return select_uniform(pool_ids, num_labels, seed=seed)
  return select_labelled(pool_ids, pool_classes, num_labels, min_classes=min_classes,
                                num_classes=num_classes, seed=seed)


def unlabelled_selection(ids: Sequence[str], labelled_ids: Sequence[str], fraction: float,
                         seed: int) -> tuple[Sequence[str], bool, int]:
  """Which train images the unlabelled stream reads: (ids, keep, count) for the pipeline's streams.

  The images not labelled (all of them when every image is labelled, as in the reference),
  or a seeded `fraction` of those.
  """
  all_labelled = len(labelled_ids) == len(ids)
  if fraction < 1.0:
    chosen = set(labelled_ids)
    pool = ids if all_labelled else [i for i in ids if i not in chosen]
    u_ids = seeded_fraction(pool, fraction, seed)
    return u_ids, True, len(u_ids)
  if all_labelled:
    return labelled_ids, True, len(labelled_ids)
  return labelled_ids, False, len(ids) - len(labelled_ids)

"""ReCo regional contrastive loss (Liu et al., ICLR 2022), jit-able with fixed shapes.

For every class c present among the valid pixels: queries are drawn uniformly (with replacement)
from the valid pixels of c whose predicted probability of c is below a threshold ("hard"
queries); the positive key is the class prototype (mean representation over all valid pixels of
c); each query gets its own negative keys, drawn class-first from a softmax over the cosine
similarity between prototypes (the class relation graph), then uniformly inside the class. The
loss is a cross-entropy over cosine similarities with the positive at index 0, averaged over
queries, summed over classes and divided by the number of present classes.

With a feature bank (ReCo paper section 4.4; `reco_bank.py` keeps it), the positive keys,
the relation graph and the negative keys come from the bank's entries instead of the batch's
pixels; queries still come from the batch.

Cost. Gathering num_queries x num_negatives key vectors per class is the dominant cost (memory
bound), so the keys are gathered once, in blocks of query rows small enough to stay in cache, and
the backward pass never touches them again: the gradient of a query's cross-entropy with respect
to its unit vector is (softmax-weighted mean of its keys - positive key) / temperature, computed
in the forward pass and attached to the value through a stop-gradient surrogate.
"""
import dataclasses
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

QUERY_MODES = ('hard', 'random', 'easy')
KEY_MODES = ('active', 'random')
_EPS = 1e-8  # Norm floor of torch.cosine_similarity.


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the loss samples its queries and keys (the fields of `reco_loss`'s options).

  strong_threshold: delta_s; hard queries have prob[..., c] < delta_s.
  temperature: tau, for the similarity logits and the class relation graph.
  num_queries: queries per class, drawn with replacement.
  num_negatives: negative keys per query.
  query_mode: 'hard' (prob_c < delta_s), 'random' (all valid pixels of c) or 'easy'
    (prob_c > delta_s).
  key_mode: 'active' (class from the relation graph) or 'random' (uniform over the other
    present classes' valid pixels).
  shared_negatives: if True, the queries of a class share one set of num_negatives keys
    (drawn the same way). Much cheaper, but a different estimator: not the reference method.
  block_rows: query rows whose keys are gathered together (a cache-size knob; no effect on
    the value).
  """
  strong_threshold: float = 0.97
  temperature: float = 0.5
  num_queries: int = 256
  num_negatives: int = 512
  query_mode: str = 'hard'
  key_mode: str = 'active'
  shared_negatives: bool = False
  block_rows: int = 8

  def __post_init__(self):
    """Raises ValueError on an option outside its range."""
    if self.query_mode not in QUERY_MODES:
      raise ValueError(f'query_mode must be one of {QUERY_MODES}, got {self.query_mode!r}.')
    if self.key_mode not in KEY_MODES:
      raise ValueError(f'key_mode must be one of {KEY_MODES}, got {self.key_mode!r}.')
    if not (isinstance(self.num_queries, int) and self.num_queries >= 1
            and isinstance(self.num_negatives, int) and self.num_negatives >= 1):
      raise ValueError(f'num_queries and num_negatives must be positive ints, got '
                       f'{self.num_queries} and {self.num_negatives}.')
    if not self.temperature > 0:
      raise ValueError(f'temperature must be > 0, got {self.temperature}.')
    if not 0.0 <= self.strong_threshold <= 1.0:
      raise ValueError(f'strong_threshold is a probability in [0, 1], got '
                       f'{self.strong_threshold}.')
    if not (isinstance(self.block_rows, int) and self.block_rows >= 1):
      raise ValueError(f'block_rows must be a positive int, got {self.block_rows}.')


def _check_inputs(rep, labels, valid, prob):
  """Raises ValueError on shape and dtype problems."""
  if rep.ndim != 4:
    raise ValueError(f'rep must be [B, h, w, m], got shape {rep.shape}.')
  if not jnp.issubdtype(rep.dtype, jnp.floating):
    raise ValueError(f'rep must be a float array, got {rep.dtype}.')
  if labels.shape != rep.shape[:3] or valid.shape != rep.shape[:3]:
    raise ValueError(f'labels {labels.shape} and valid {valid.shape} must both be rep.shape[:3] '
                     f'= {rep.shape[:3]}; resize them to the representation resolution (nearest) '
                     'first.')
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f'labels must hold integer class ids, got {labels.dtype}.')
  if valid.dtype != jnp.bool_:
    raise ValueError(f'valid must be a bool mask, got {valid.dtype}.')
  if prob.ndim != 4 or prob.shape[:3] != rep.shape[:3] or prob.shape[-1] < 1:
    raise ValueError(f'prob must be [B, h, w, C] with [B, h, w] = {rep.shape[:3]}, got '
                     f'{prob.shape}.')


def _unit(x):
  """x / max(|x|, eps) along the last axis, float32."""
  return x * lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), _EPS * _EPS))


def _sort_by_class(cls, num_classes, block=4096):
  """Counting-sort layout: pixels of class c are order[offset[c] : offset[c] + count[c]].

  cls: [P] int32 in [0, num_classes], num_classes meaning "none" (sorted last).
  Returns order [P] int32 (stable within a class), count [num_classes] int32 and offset
  [num_classes] int32. With few classes, ranks from a blocked cumulative sum of one-hot rows
  and a scatter are several times faster than a comparison sort of the P pixels.
  """
  num_pixels = cls.shape[0]
  padded = -(-num_pixels // block) * block
  cls_padded = jnp.pad(cls, (0, padded - num_pixels), constant_values=num_classes)
  one_hot = (cls_padded[:, None] == jnp.arange(num_classes + 1)).astype(jnp.int32)
  one_hot = one_hot.reshape(padded // block, block, num_classes + 1)
  within = jnp.cumsum(one_hot, axis=1)
  before = jnp.cumsum(within[:, -1], axis=0) - within[:, -1]
  counts = jnp.sum(within[:, -1], axis=0)
  offsets = jnp.cumsum(counts) - counts
  rank = jnp.take_along_axis((within + before[:, None]).reshape(padded, num_classes + 1),
                             cls_padded[:, None], axis=1)[:, 0] - 1
  order = jnp.zeros(padded, jnp.int32).at[offsets[cls_padded] + rank].set(
      jnp.arange(padded, dtype=jnp.int32), unique_indices=True)
  return order[:num_pixels], counts[:num_classes], offsets[:num_classes]


def _scaled_index(bits, n):
  """floor(bits * n / 2**32) for uint32 bits and int32 n >= 0, exactly, in 32-bit arithmetic.

  A uniform 32-bit word mapped this way is uniform on [0, n) up to a relative bias of n / 2**32
  (floor(u * n) with a 23-bit float u would be off by up to n / 2**23, about 1.6% for a class
  that fills a 20x81x81 batch).
  """
  n = n.astype(jnp.uint32)
  lo16 = jnp.uint32(0xFFFF)
  bh, bl, nh, nl = bits >> 16, bits & lo16, n >> 16, n & lo16
  cross1, cross2 = bh * nl, bl * nh
  carry = ((cross1 & lo16) + (cross2 & lo16) + ((bl * nl) >> 16)) >> 16
  return (bh * nh + (cross1 >> 16) + (cross2 >> 16) + carry).astype(jnp.int32)


def _draw_in_class(bits, c, order, count, offset):
  """Pixel index drawn uniformly from class c's pixels, given uniform uint32 bits.

  Any shapes that broadcast; where class c has no pixel the result is an arbitrary pixel and
  the caller must mask it.
  """
  pos = offset[c] + _scaled_index(bits, count[c])
  return order[jnp.clip(pos, 0, order.shape[0] - 1)]


def _to_unit_float(bits):
  """uint32 bits -> float32 uniform on [0, 1) with 24 random bits."""
  return (bits >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


def _negative_class_probs(proto_unit, count, present, temperature, key_mode):
  """[C, C] float32: row c = distribution of negative classes for query class c (0 on absent)."""
  num_classes = count.shape[0]
  allowed = present[None, :] & ~jnp.eye(num_classes, dtype=bool)
  if key_mode == 'active':
    z = jnp.where(allowed, proto_unit @ proto_unit.T / temperature, -jnp.inf)
    zmax = jnp.max(z, axis=1, keepdims=True)
    zmax = jnp.where(jnp.isfinite(zmax), zmax, 0.0)
    weight = jnp.where(allowed, jnp.exp(z - zmax), 0.0)
  else:  # Uniform over the other classes' pixels: class weight = its pixel count.
    weight = jnp.where(allowed, count[None, :].astype(jnp.float32), 0.0)
  return weight / jnp.maximum(jnp.sum(weight, axis=1, keepdims=True), 1e-30)


def _draw_negative_classes(u, cdf, last):
  """Inverse-CDF class draw. u: [..., N] in [0, 1); cdf: [..., C]; last: [...] -> [..., N] int32.

  Counts the cdf entries <= u * total (searchsorted, side='right'); C is small, so comparing
  against all entries is cheaper than a binary search. A class of zero probability can only be
  hit through rounding at the top, which `last` (the highest class with mass) clips away.
  """
  target = u * cdf[..., -1:]
  j = jnp.sum((cdf[..., None, :] <= target[..., None]).astype(jnp.int32), axis=-1)
  return jnp.minimum(j, last[..., None])


def _contrast_rows(q_unit, pos_unit, keys, key_scale, temperature, shared=False):
  """Cross-entropy with target 0 over [positive, negatives] and its query gradient direction.

  q_unit: [R, Q, m] float32 unit queries; pos_unit: [R, 1, m] float32 unit positive keys;
  keys: raw key vectors (any float), [R, Q, N, m] or, with shared=True, [R, N, m] used by all Q
  queries of a row; key_scale: the matching inverse key norms ([R, Q, N] or [R, N]). Returns
  loss [R, Q] and the softmax-weighted mean of the unit keys (positive included) [R, Q, m],
  float32.
  """
  keys = keys.astype(jnp.float32)
  spec = 'rnm' if shared else 'rqnm'
  scale = key_scale[:, None] if shared else key_scale
  neg = jnp.einsum(f'rqm,{spec}->rqn', q_unit, keys) * scale / temperature
  pos = jnp.sum(q_unit * pos_unit, axis=-1) / temperature
  top = jnp.maximum(jnp.max(neg, axis=-1), pos)
  e_neg = jnp.exp(neg - top[..., None])
  e_pos = jnp.exp(pos - top)
  total = e_pos + jnp.sum(e_neg, axis=-1)
  loss = jnp.log(total) + top - pos
  weights = e_neg * scale / total[..., None]
  mean_key = (e_pos / total)[..., None] * pos_unit + jnp.einsum(f'rqn,{spec}->rqm', weights, keys)
  return loss, mean_key


def class_statistics(rep, labels, valid, num_classes):
  """Per-class sums and pixel counts of rep over valid pixels.

  rep: [B, h, w, m] float; labels: [B, h, w] int; valid: [B, h, w] bool. Labels outside
  [0, num_classes) count as invalid; invalid pixels may hold any finite value. Returns sums
  [C, m] float32 and counts [C] float32, with no gradient (prototypes are constants in ReCo).
  Summing these across devices gives global prototypes.
  """
  m = rep.shape[-1]
  labels = labels.reshape(-1)
  ok = valid.reshape(-1) & (labels >= 0) & (labels < num_classes)
  # A one-hot matmul reads rep once and beats a scatter-add by ~5x on CPU; invalid rows get
  # weight 0, which cancels any finite value.
  one_hot = (ok[:, None] & (labels[:, None] == jnp.arange(num_classes))).astype(rep.dtype)
  sums = jnp.einsum('pc,pm->cm', one_hot, lax.stop_gradient(rep).reshape(-1, m),
                    preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)
  counts = jnp.sum(one_hot, axis=0, dtype=jnp.float32)
  return sums, counts


def reco_loss(key, rep, labels, valid, prob, *, strong_threshold=0.97, temperature=0.5,
              num_queries=256, num_negatives=512, query_mode='hard', key_mode='active',
              shared_negatives=False, prototype_stats=None, bank=None, block_rows=8):
  """ReCo loss on one batch (ReCo paper Eq. 1-4; reference `compute_reco_loss`, lorenmt/reco).

  Args:
    key: PRNG key (typed or raw).
    rep: [B, h, w, m] representations, any float dtype; computed in float32.
    labels: [B, h, w] int class ids at representation resolution.
    valid: [B, h, w] bool; labels outside [0, C) are treated as invalid too. Invalid pixels
      may hold any finite value: it never reaches the value or the gradient.
    prob: [B, h, w, C] class probabilities (no gradient flows into them). C is static.
    strong_threshold, temperature, num_queries, num_negatives, query_mode, key_mode,
      shared_negatives, block_rows: how queries and keys are sampled (see `Sampling`).
    prototype_stats: optional (sums [C, m], counts [C]) from `class_statistics`, e.g. summed
      across devices, used for the prototypes instead of this batch's. Which classes are present
      (and so V and the key classes) is always decided by this batch.
    bank: optional feature bank (keys [C, K, m] float, count [C] int), as `reco_bank.init`
      makes it: entry k of class c is a key of c iff k < count[c]. When given, the bank is
      the key set: prototypes are the means of each class's entries, the negative classes
      are the classes with entries, and negatives are drawn uniformly from a class's entries.
      Queries, and V (the classes present among this batch's valid pixels, the divisor of
      the loss), still come from the batch; a query class needs entries of its own and of
      one other class, so with one class in the batch the loss is no longer 0 once the bank
      holds another. A bank holding exactly the batch's valid pixels, each class's in pixel
      order, gives the batch-mode loss and draws. Not with prototype_stats.

  Returns:
    float32 scalar. 0 when fewer than two classes are present. Gradients reach rep only at the
    sampled query pixels.
  """
  sampling = Sampling(strong_threshold=strong_threshold, temperature=temperature,
                      num_queries=num_queries, num_negatives=num_negatives,
                      query_mode=query_mode, key_mode=key_mode,
                      shared_negatives=shared_negatives, block_rows=block_rows)
  return _reco(key, rep, labels, valid, prob, sampling, prototype_stats=prototype_stats,
               bank=bank)[0]


class _KeySet(NamedTuple):
  """What queries are contrasted with: a [P, m] table of keys, their inverse norms [P], the
  unit class prototypes [C, m] (the positive keys), and the counting-sort layout of the keys
  by class (order [P], count [C], offset [C]: class c's keys are rows
  order[offset[c] : offset[c] + count[c]])."""
  table: jax.Array
  inv_norm: jax.Array
  proto_unit: jax.Array
  order: jax.Array
  count: jax.Array
  offset: jax.Array


def _reco(key, rep, labels, valid, prob, sampling: Sampling, *, prototype_stats=None,
          bank=None, return_samples=False):
  """`reco_loss`, plus (if return_samples) the sampled pixel indices into the flattened batch.

  Returns (loss, samples); samples is None or {'query': [C, Q], 'key': [C, Q, N] or, with
  shared negatives, [C, N]} int32, where inactive classes hold the out-of-range index P.
  With a bank, key indices point into its flattened [C * K] entries (C * K when inactive).
  """
  rep, labels, valid, prob = (jnp.asarray(x) for x in (rep, labels, valid, prob))
  _check_inputs(rep, labels, valid, prob)
  num_classes = prob.shape[-1]
  m = rep.shape[-1]
  num_pixels = rep.shape[0] * rep.shape[1] * rep.shape[2]
  if num_pixels >= 2**31 - 1:
    raise ValueError(f'{num_pixels} pixels do not fit int32 indices; split the batch.')
  if isinstance(key, jax.Array) and not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)

  table = rep.reshape(num_pixels, m)
  flat_labels = labels.reshape(num_pixels).astype(jnp.int32)
  ok = valid.reshape(num_pixels) & (flat_labels >= 0) & (flat_labels < num_classes)
  cls = jnp.where(ok, flat_labels, num_classes)
  prob = lax.stop_gradient(prob.reshape(num_pixels, num_classes)).astype(jnp.float32)
  p_own = jnp.take_along_axis(prob, jnp.minimum(cls, num_classes - 1)[:, None], axis=1)[:, 0]

  if bank is None:
    keys = _batch_keys(table, ok, cls, rep, labels, valid, num_classes, prototype_stats)
  else:
    if prototype_stats is not None:
      raise ValueError('prototype_stats and bank exclude each other: with a bank the '
                       'prototypes are the means of its entries.')
    keys = _bank_keys(bank, num_classes, m)
  # Classes with keys decide the negatives; V (the divisor) counts this batch's classes.
  present = keys.count > 0
  num_present = jnp.sum(present.astype(jnp.int32))
  in_batch = jnp.bincount(cls, length=num_classes + 1)[:num_classes] > 0
  num_divisor = jnp.sum(in_batch.astype(jnp.int32))

  query_idx, class_active = _draw_queries(key, sampling, ok, cls, p_own, present, num_present,
                                          in_batch, num_pixels, num_classes)
  query = table.at[query_idx].get(mode='fill', fill_value=0).astype(jnp.float32)
  q_unit = _unit(query)  # [C, Q, m], differentiable.
  q_unit_sg = lax.stop_gradient(q_unit)
  loss, mean_key, key_idx = _contrast_with_negatives(
      jax.random.split(key)[1], sampling, keys, q_unit_sg, present, class_active,
      return_samples)

  active = class_active[:, None]
  loss = jnp.where(active, loss, 0.0)
  step = jnp.where(active[..., None],
                   (mean_key - keys.proto_unit[:, None]) / sampling.temperature, 0.0)
  # Value: the loss; gradient w.r.t. q_unit: (weighted mean key - positive) / temperature.
  loss = loss + jnp.sum((q_unit - q_unit_sg) * step, axis=-1)
  per_class = jnp.sum(loss, axis=1) / sampling.num_queries
  total = jnp.where(num_present >= 2, jnp.sum(per_class) / jnp.maximum(num_divisor, 1), 0.0)
  samples = {'query': query_idx, 'key': key_idx} if return_samples else None
  return total, samples


def _draw_queries(key, sampling: Sampling, ok, cls, p_own, present, num_present, in_batch,
                  num_pixels, num_classes):
  """(query pixel indices int32 [C, Q], class_active bool [C]).

  A class is active when it has keys, eligible queries (by sampling.query_mode) and a second
  class with keys, and is in the batch. Inactive rows hold index num_pixels, which mode='fill'
  gathers turn into zeros: no invalid pixel value ever enters the arithmetic.
  """
  if sampling.query_mode == 'hard':
    eligible = ok & (p_own < sampling.strong_threshold)
  elif sampling.query_mode == 'easy':
    eligible = ok & (p_own > sampling.strong_threshold)
  else:
    eligible = ok
  order, count, offset = _sort_by_class(jnp.where(eligible, cls, num_classes), num_classes)
  class_active = present & (count > 0) & (num_present >= 2) & in_batch
  key_q, _ = jax.random.split(key)
  bits = jax.random.bits(key_q, (num_classes, sampling.num_queries), jnp.uint32)
  query_idx = _draw_in_class(bits, jnp.arange(num_classes)[:, None], order, count, offset)
  return jnp.where(class_active[:, None], query_idx, num_pixels), class_active


def _contrast_with_negatives(key_neg, sampling: Sampling, keys: _KeySet, q_unit_sg, present,
                             class_active, return_samples):
  """Draws the negative keys of every query and contrasts it with them and its positive.

  Returns loss [C, Q], the softmax-weighted mean key [C, Q, m] and the key indices (see
  `_reco`'s samples; None unless return_samples or shared negatives).
  """
  num_classes = keys.count.shape[0]
  num_keys = keys.order.shape[0]
  neg_prob = _negative_class_probs(keys.proto_unit, keys.count, present, sampling.temperature,
                                   sampling.key_mode)
  neg_cdf = jnp.cumsum(neg_prob, axis=1)
  neg_last = jnp.max(jnp.where(neg_prob > 0, jnp.arange(num_classes), 0), axis=1)

  def gather_keys(idx):
    return (keys.table.at[idx].get(mode='fill', fill_value=0),
            keys.inv_norm.at[idx].get(mode='fill', fill_value=0))

  if sampling.shared_negatives:
    uk = jax.random.bits(key_neg, (2, num_classes, sampling.num_negatives), jnp.uint32)
    neg_cls = _draw_negative_classes(_to_unit_float(uk[0]), neg_cdf, neg_last)
    idx = _draw_in_class(uk[1], neg_cls, keys.order, keys.count, keys.offset)
    key_idx = jnp.where(class_active[:, None], idx, num_keys)
    table, scale = gather_keys(key_idx)
    loss, mean_key = _contrast_rows(q_unit_sg, keys.proto_unit[:, None], table, scale,
                                    sampling.temperature, shared=True)
    return loss, mean_key, key_idx
  return _per_query_negatives(
      key_neg, q_unit_sg, keys.proto_unit, class_active, neg_cdf, neg_last, keys.order,
      keys.count, keys.offset, gather_keys, sampling.num_negatives, sampling.temperature,
      sampling.block_rows, return_samples)


def _batch_keys(table, ok, cls, rep, labels, valid, num_classes, prototype_stats) -> _KeySet:
  """The key set of a batch: its valid pixels, by class; the prototypes are the class means
  of this batch's representations, or of `prototype_stats` (sums [C, m], counts [C]).

  table: [P, m] the batch's representations; ok: bool [P] valid pixels; cls: int32 [P] their
  classes (num_classes where invalid).
  """
  m = table.shape[-1]
  # Inverse norms of the (stop-gradient) key table. Invalid pixels are never drawn as keys;
  # a huge value there squares to inf, which the mask drops.
  table_sg = lax.stop_gradient(table)
  sq = jnp.where(ok, jnp.sum(jnp.square(table_sg.astype(jnp.float32)), axis=-1), 1.0)
  inv_norm = lax.rsqrt(jnp.maximum(sq, _EPS * _EPS))
  if prototype_stats is None:
    proto_sum, proto_count = class_statistics(rep, labels, valid, num_classes)
  else:
    proto_sum, proto_count = (lax.stop_gradient(jnp.asarray(s, jnp.float32))
                              for s in prototype_stats)
    if proto_sum.shape != (num_classes, m) or proto_count.shape != (num_classes,):
      raise ValueError(f'prototype_stats must be (sums [{num_classes}, {m}], counts '
                       f'[{num_classes}]) as from class_statistics, got {proto_sum.shape} '
                       f'and {proto_count.shape}.')
  proto_unit = _unit(proto_sum / jnp.maximum(proto_count, 1.0)[:, None])
  order, count, offset = _sort_by_class(cls, num_classes)
  return _KeySet(table_sg, inv_norm, proto_unit, order, count, offset)


def _bank_keys(bank, num_classes, m) -> _KeySet:
  """The key set of a bank: its filled entries, by class; the prototypes are their means.

  bank: {'keys': [C, K, m] float, 'count': [C] int, ...}; entries k >= count[c] are empty.
  Entries of class c are rows c * K + [0, count[c]) of the [C * K, m] table (entries are
  filled from slot 0 up, so the filled ones are always the first), which is the layout
  `_sort_by_class` gives the batch's pixels: drawing from it needs no sort.
  """
  keys = lax.stop_gradient(jnp.asarray(bank['keys'])).astype(jnp.float32)
  count = lax.stop_gradient(jnp.asarray(bank['count'])).astype(jnp.int32)
  if keys.ndim != 3 or keys.shape[0] != num_classes or keys.shape[2] != m:
    raise ValueError(f'bank keys must be [C, K, m] = [{num_classes}, K, {m}], got '
                     f'{keys.shape}.')
  if count.shape != (num_classes,):
    raise ValueError(f'bank count must be [{num_classes}], got {count.shape}.')
  size = keys.shape[1]
  filled = jnp.arange(size) < count[:, None]
  keys = jnp.where(filled[..., None], keys, 0.0)
  sq = jnp.where(filled, jnp.sum(jnp.square(keys), axis=-1), 1.0)
  inv_norm = lax.rsqrt(jnp.maximum(sq, _EPS * _EPS)).reshape(-1)
  proto_unit = _unit(jnp.sum(keys, axis=1) / jnp.maximum(count, 1)[:, None])
  order = jnp.arange(num_classes * size, dtype=jnp.int32)
  offset = jnp.arange(num_classes, dtype=jnp.int32) * size
  return _KeySet(keys.reshape(-1, m), inv_norm, proto_unit, order, count, offset)


def _per_query_negatives(key, q_unit, proto_unit, class_active, neg_cdf, neg_last, key_order,
                         key_count, key_offset, gather_keys, num_negatives, temperature,
                         block_rows, return_samples):
  """Each query gets its own negatives; a loop over blocks of query rows bounds memory.

  Only the rows of active classes are visited: they are laid out class by class in the order
  of the active classes, and the loop runs for as many blocks as they fill (a data-dependent
  trip count over fixed-size blocks), so a batch with few classes costs proportionally less.
  Each row draws from its own key, folded from its class-major id, so neither the layout nor
  block_rows changes any draw.

  q_unit: [C, Q, m] (no gradient). Returns loss [C, Q], weighted mean key [C, Q, m] (rows of
  inactive classes hold 0) and (if return_samples, else None) the key indices [C, Q, N].
  """
  num_classes, num_queries, m = q_unit.shape
  num_pixels = key_order.shape[0]
  rows = num_classes * num_queries
  blocks = -(-rows // block_rows)
  padded = blocks * block_rows
  # Active classes first (stable), and where each class's rows start in that layout.
  class_rank = jnp.argsort(~class_active, stable=True).astype(jnp.int32)
  slot = jnp.zeros(num_classes, jnp.int32).at[class_rank].set(
      jnp.arange(num_classes, dtype=jnp.int32), unique_indices=True)
  active_rows = jnp.sum(class_active.astype(jnp.int32)) * num_queries
  layout = jnp.arange(padded, dtype=jnp.int32)
  row_class = class_rank[jnp.minimum(layout // num_queries, num_classes - 1)]
  row_ids = row_class * num_queries + layout % num_queries  # class-major id of each row
  row_active = layout < active_rows

  def body(b, outputs):
    start = b * block_rows
    ids_b, cls_b, act_b = (lax.dynamic_slice_in_dim(a, start, block_rows)
                           for a in (row_ids, row_class, row_active))
    q_b = q_unit.reshape(rows, m)[jnp.minimum(ids_b, rows - 1)]
    uk = jax.vmap(lambda i: jax.random.bits(jax.random.fold_in(key, i), (2, num_negatives),
                                            jnp.uint32))(ids_b)
    neg_cls = _draw_negative_classes(_to_unit_float(uk[:, 0]), neg_cdf[cls_b], neg_last[cls_b])
    idx = _draw_in_class(uk[:, 1], neg_cls, key_order, key_count, key_offset)
    idx = jnp.where(act_b[:, None], idx, num_pixels)
    keys, scale = gather_keys(idx)
    loss, mean_key = _contrast_rows(q_b[:, None], proto_unit[cls_b][:, None], keys[:, None],
                                    scale[:, None], temperature)
    new = (loss[:, 0], mean_key[:, 0], idx if return_samples else None)
    return jax.tree.map(lambda out, x: lax.dynamic_update_slice_in_dim(out, x, start, 0),
                        outputs, new)

  outputs = (jnp.zeros(padded, jnp.float32), jnp.zeros((padded, m), jnp.float32),
             jnp.full((padded, num_negatives), num_pixels, jnp.int32) if return_samples
             else None)
  # The first block runs outside the loop, so that inside shard_map the carry already varies
  # across devices as the block results do (its rows are never read back if no class is
  # active).
  outputs = body(0, outputs)
  num_blocks = (active_rows + block_rows - 1) // block_rows
  outputs = lax.fori_loop(1, num_blocks, body, outputs)
  # Back to class-major [C, Q, ...]; inactive classes read zeros (or index P) from the end.
  back = slot[:, None] * num_queries + jnp.arange(num_queries)
  back = jnp.where(class_active[:, None], back, padded)
  loss, mean_key = (a.at[back].get(mode='fill', fill_value=0) for a in outputs[:2])
  idx = (outputs[2].at[back].get(mode='fill', fill_value=num_pixels) if return_samples
         else None)
  return loss, mean_key, idx


def reco_loss_per_device(key, rep, labels, valid, prob, *, mesh, axis_name='data',
                         average_prototypes=False, bank=None, **loss_kwargs):
  """ReCo loss sampled per device: the mean over devices of `reco_loss` on each batch slice.

  rep/labels/valid/prob are global arrays sharded (or shardable) on `axis_name` along the batch
  dimension, shapes as in `reco_loss`; key is replicated. Device i samples from its own slice
  with `fold_in(key, i)`; representations never leave their device. With average_prototypes,
  the class prototypes come from per-class sums and counts summed across devices (C x m
  floats). bank: optional replicated feature bank (see `reco_loss`), the key set of every
  device. Differentiable; call it inside jit.
  """
  if bank is not None and average_prototypes:
    raise ValueError('average_prototypes has no effect with a bank: its prototypes already '
                     'come from the replicated bank. Turn one of them off.')
  spec = jax.sharding.PartitionSpec(axis_name)
  num_classes = prob.shape[-1]
  devices = mesh.shape[axis_name]
  if rep.shape[0] % devices:
    raise ValueError(f'batch {rep.shape[0]} is not divisible by the {devices} devices on mesh '
                     f'axis {axis_name!r}.')

  def local(key, rep, labels, valid, prob, bank):
    device_key = jax.random.fold_in(key, lax.axis_index(axis_name))
    stats = None
    if average_prototypes:
      sums, counts = class_statistics(rep, labels, valid, num_classes)
      stats = (lax.psum(sums, axis_name), lax.psum(counts, axis_name))
    loss = reco_loss(device_key, rep, labels, valid, prob, prototype_stats=stats, bank=bank,
                     **loss_kwargs)
    return lax.pmean(loss, axis_name)

  replicated = jax.sharding.PartitionSpec()
  return jax.shard_map(
      local, mesh=mesh, in_specs=(replicated, spec, spec, spec, spec, replicated),
      out_specs=replicated)(key, rep, labels, valid, prob, bank)

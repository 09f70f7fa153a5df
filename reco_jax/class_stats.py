"""Per-class statistics of embeddings over the labelled pixels of an evaluation set.

Two analyses of an embedding space rest on them: the class mean representations behind ReCo's
class relation graph (ReCo paper section 5, Eq. 3, Fig. 8; `reco_jax.relations`), and the
embedding probe that watches contrastive pretraining (`embedding_probe`). One fixed-shape
jitted accumulation serves both: `make_stats_step(embed, ...)` sums every embedding that
`embed(variables, images)` returns per class, batch after batch, and `class_means` turns the
totals into means with a single host transfer. Labels are resized to each embedding's map by
nearest neighbour, as ReCo computes its prototypes.
"""
from collections.abc import Callable, Iterable, Mapping, Sequence
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from reco_jax import parallel
from reco_jax.losses import reco as reco_lib
from reco_jax.models import resize

# embed(variables, images float32 [B, H, W, 3]) -> {name: float [B, h, w, D_name]}.
Embed = Callable[..., Mapping[str, jax.Array]]


def class_statistics(features: jax.Array, labels: jax.Array, valid: jax.Array | None,
                     num_classes: int) -> tuple[jax.Array, jax.Array]:
  """Per-class sums and pixel counts of `features` over the valid labelled pixels.

  features: float [B, h, w, D]; labels: int [B, H, W] class ids at the image size (255 =
  void; ids outside 0..C-1 are not counted); valid: bool [B] (False for padding examples)
  or None. Labels are resized to (h, w) by nearest neighbour, as for ReCo's prototypes.
  Returns sums float32 [C, D] and counts float32 [C] (exact below 2**24 pixels).
  """
  small = resize.nearest(labels.astype(jnp.int32), features.shape[1:3])
  ok = (small >= 0) & (small < num_classes)
  if valid is not None:
    ok = ok & valid.astype(bool)[:, None, None]
  return reco_lib.class_statistics(features.astype(jnp.float32), small, ok, num_classes)


def make_stats_step(embed: Embed, num_classes: int,
                    mesh: jax.sharding.Mesh | None = None) -> Callable:
  """Jitted stats_step(variables, batch, totals) -> totals, accumulating class statistics.

  batch: an eval batch {'image': float32 [B, H, W, 3], 'label': int32 [B, H, W],
  'valid': bool [B]}; totals: {E: (sums float32 [C, D_E], counts float32 [C])} for each
  embedding E of `embed`, from `zero_totals` or the previous call (donated). Every shape is
  fixed, so one compilation serves the whole evaluation set.
  """
  def stats_step(variables, batch, totals):
    features = embed(variables, batch['image'])
    out = {}
    for name, (sums, counts) in totals.items():
      more_sums, more_counts = class_statistics(features[name], batch['label'],
                                                batch.get('valid'), num_classes)
      out[name] = (sums + more_sums, counts + more_counts)
    return out

  out = parallel.replicated(mesh) if mesh is not None else None
  return jax.jit(stats_step, donate_argnums=2, out_shardings=out)


def zero_totals(embed: Embed, variables, image_shape: Sequence[int], num_classes: int,
                mesh: jax.sharding.Mesh | None = None) -> dict:
  """Zero totals for `make_stats_step`; image_shape: (B, H, W, 3) of an eval batch."""
  shapes = jax.eval_shape(embed, variables,
                          jax.ShapeDtypeStruct(tuple(image_shape), jnp.float32))
  totals = {name: (jnp.zeros((num_classes, shape.shape[-1]), jnp.float32),
                   jnp.zeros((num_classes,), jnp.float32)) for name, shape in shapes.items()}
  return jax.device_put(totals, parallel.replicated(mesh)) if mesh is not None else totals


@dataclasses.dataclass
class ClassMeans:
  """Mean embedding of each class: means float64 [C, D] (NaN rows for classes without pixels),
  counts int64 [C] pixels averaged."""
  means: np.ndarray
  counts: np.ndarray

  @property
  def present(self) -> np.ndarray:
    return self.counts > 0


def class_means(stats_step: Callable, totals: dict, variables, batches: Iterable,
                mesh: jax.sharding.Mesh) -> dict[str, ClassMeans]:
  """Runs stats_step over every batch of `batches` (host numpy batches, e.g. eval_iterator).

  Returns {E: ClassMeans}; the only host transfer is the final totals.
  """
  for local in batches:
    totals = stats_step(variables, parallel.shard_batch(mesh, local), totals)
  out = {}
  for name, (sums, counts) in totals.items():
    sums = np.asarray(parallel.to_host(sums), np.float64)
    counts = np.rint(np.asarray(parallel.to_host(counts))).astype(np.int64)
    with np.errstate(invalid='ignore', divide='ignore'):
      means = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], np.nan)
    out[name] = ClassMeans(means, counts)
  return out


def embedding_probe(space: ClassMeans) -> dict[str, float]:
  """Mean cosine similarity of pixel pairs of one class and of two classes.

  space: the class means of unit embeddings (e.g. over the validation pixels). For unit
  vectors the mean over all pairs (i, j) of classes c and d of f_i . f_j is m_c . m_d, m_c
  the class mean; within = mean over present classes of |m_c|^2 (pairs include i = j),
  between = mean over pairs of distinct present classes of m_c . m_d. Pretraining that works
  drives within up and between down.
  """
  means = space.means[space.present]
  gram = means @ means.T
  k = len(means)
  within = float(np.mean(np.diag(gram))) if k else float('nan')
  between = float((gram.sum() - np.trace(gram)) / (k * (k - 1))) if k > 1 else float('nan')
  return {'within_class_cosine': within, 'between_class_cosine': between,
          'cosine_gap': within - between}

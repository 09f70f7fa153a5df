"""What ReCo takes from a training step, for every method that supports `config.reco`.

The ReCo paper (section 3.3, and the reference's `train_semisup.py` / `train_sup.py`) applies
the loss of `losses/reco.py` to the representations of every student pass of a step:
- labelled images with their labels; with partial labels, the student's own predictions with
  confidence >= strong_threshold fill the pixels without a label;
- pseudo-labelled (mixed) images where the pseudo-label confidence is >= weak_threshold;
- labels and validity resized to the representation size with nearest neighbours;
- the branches concatenated per device, labelled first, as each GPU does in data-parallel
  PyTorch, and the loss sampled per device;
- class probabilities from the student's own logits, without gradient.
"""
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from reco_jax import names
from reco_jax import parallel
from reco_jax.losses import reco as reco_lib
from reco_jax.models import resize


class Branch(NamedTuple):
  """One student pass as ReCo reads it.

  rep: [B, h, w, m] representations; logits: [B, h', w', C] (the pass's output resolution);
  labels: int [B, H, W]; valid: bool [B, H, W] (the pixels that may be queries or keys).
  """
  rep: jax.Array
  logits: jax.Array
  labels: jax.Array
  valid: jax.Array


def labelled_branch(rep: jax.Array, logits: jax.Array, labels: jax.Array, *,
                    fill_logits: jax.Array | None = None,
                    strong_threshold: float = 0.97) -> Branch:
  """A labelled pass: the given labels (255 = void is invalid).

  fill_logits: for partially labelled images, the pass's logits at label size [B, H, W, C];
  the student's argmax then labels every unannotated pixel whose confidence is
  >= strong_threshold (the reference's fixed 0.97 is its strong threshold).
  """
  given = labels != names.VOID
  if fill_logits is None:
    return Branch(rep, logits, labels, given)
  prob = jax.nn.softmax(jax.lax.stop_gradient(fill_logits), axis=-1)
  filled = jnp.where(given, labels, jnp.argmax(prob, -1).astype(jnp.int32))
  return Branch(rep, logits, filled, given | (jnp.max(prob, -1) >= strong_threshold))


def pseudo_labelled_branch(rep: jax.Array, logits: jax.Array, labels: jax.Array,
                           confidence: jax.Array, *, weak_threshold: float) -> Branch:
  """A pseudo-labelled pass: valid where the pseudo-label confidence is >= weak_threshold."""
  return Branch(rep, logits, labels, confidence >= weak_threshold)


def resize_targets(labels: jax.Array, valid: jax.Array, size) -> tuple[jax.Array, jax.Array]:
  """Labels and validity at representation size, resized like the reference (nearest).

  labels: int32 [B, H, W] (255 = void); valid: bool [B, H, W]. Returns int32 [B, h, w] with
  void mapped to class 0 (masked out by the returned bool [B, h, w] validity anyway).
  """
  labels = resize.nearest(labels, tuple(size))
  valid = resize.nearest(valid.astype(jnp.int32), tuple(size)) > 0
  valid = valid & (labels != names.VOID)
  return jnp.where(valid, labels, 0).astype(jnp.int32), valid


def reco_term(key: jax.Array, branches: Sequence[Branch], *, mesh: jax.sharding.Mesh,
              config: ml_collections.ConfigDict) -> jax.Array:
  """The ReCo loss of one step over its branches (labelled first): float32 scalar.

  Reads config.strong_threshold, reco_temperature, num_queries, num_negatives, query_mode,
  key_mode and average_prototypes. Gradients flow into the representations only.
  """
  num_devices = mesh.shape[parallel.DATA_AXIS]
  targets = [resize_targets(b.labels, b.valid, b.rep.shape[1:3]) for b in branches]
  cat = lambda arrays: parallel.per_device_concat(arrays, num_devices)
  logits = jax.lax.stop_gradient(cat([b.logits for b in branches]))
  prob = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return reco_lib.reco_loss_per_device(
      key, cat([b.rep for b in branches]).astype(jnp.float32), cat([t[0] for t in targets]),
      cat([t[1] for t in targets]), prob, mesh=mesh, axis_name=parallel.DATA_AXIS,
      average_prototypes=bool(config.average_prototypes),
      strong_threshold=float(config.strong_threshold),
      temperature=float(config.reco_temperature), num_queries=int(config.num_queries),
      num_negatives=int(config.num_negatives), query_mode=config.query_mode,
      key_mode=config.key_mode)

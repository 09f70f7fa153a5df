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
With config.reco_bank_size > 0 the step first enqueues its keys into the feature bank kept in
`TrainState.extras` (`losses/reco_bank.py`), then samples the loss against the bank.
"""
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from reco_jax import names
from reco_jax import parallel
from reco_jax.losses import reco as reco_lib
from reco_jax.losses import reco_bank
from reco_jax.models import resize

BANK = reco_bank.NAME  # The feature bank's key in TrainState.extras and in a step's parts.


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


def bank_of(state, config: ml_collections.ConfigDict) -> dict | None:
  """The state's ReCo feature bank when config.reco_bank_size > 0, else None."""
  if not (config.reco and reco_bank.settings(config)[0]):
    return None
  if BANK not in state.extras:
    raise ValueError('config.reco_bank_size > 0 but the train state holds no ReCo bank; create '
                     'the state with this config (state.create_train_state).')
  return state.extras[BANK]


def keep_bank(state, parts: dict):
  """(state, parts) with the updated bank, if parts hold one, moved into state.extras."""
  if BANK not in parts:
    return state, parts
  parts = dict(parts)
  bank = parts.pop(BANK)
  return state.replace(extras={**state.extras, BANK: bank}), parts


def _write_order(key: jax.Array, labels: Sequence[jax.Array]):
  """Per branch: random uint32 priorities and global int32 pixel ids, each [B, h, w].

  Drawn for each branch's global shape, so they do not depend on the sharding; ids count the
  branches in order, then image, row and column.
  """
  priorities, ids, start = [], [], 0
  for i, branch_labels in enumerate(labels):
    shape = branch_labels.shape
    priorities.append(jax.random.bits(jax.random.fold_in(key, i), shape, jnp.uint32))
    ids.append(start + jnp.arange(branch_labels.size, dtype=jnp.int32).reshape(shape))
    start += branch_labels.size
  return priorities, ids


def update_bank(key: jax.Array, branches: Sequence[Branch], bank: dict, *,
                mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict) -> dict:
  """`bank` after enqueuing the keys of one step's branches (labelled first).

  config.reco_bank_writes valid pixels per class (at most K) of all branches, chosen as
  `reco_bank.update_per_device` describes; the same bank on any number of devices.
  """
  num_devices = mesh.shape[parallel.DATA_AXIS]
  targets = [resize_targets(b.labels, b.valid, b.rep.shape[1:3]) for b in branches]
  cat = lambda arrays: parallel.per_device_concat(arrays, num_devices)
  priorities, ids = _write_order(key, [t[0] for t in targets])
  return reco_bank.update_per_device(
      bank, cat([b.rep for b in branches]).astype(jnp.float32), cat([t[0] for t in targets]),
      cat([t[1] for t in targets]), cat(priorities), cat(ids), mesh=mesh,
      writes=reco_bank.settings(config)[1], axis_name=parallel.DATA_AXIS)


def reco_term(key: jax.Array, branches: Sequence[Branch], *, mesh: jax.sharding.Mesh,
              config: ml_collections.ConfigDict, bank: dict | None = None):
  """The ReCo loss of one step over its branches (labelled first): float32 scalar.

  Reads config.strong_threshold, reco_temperature, num_queries, num_negatives, query_mode,
  key_mode and average_prototypes. Gradients flow into the representations only.
  bank: the feature bank (`bank_of`), or None for batch-mode ReCo. With a bank, the step's
  keys are enqueued first (`update_bank` with the second half of split(key)) and the loss,
  sampled with the first half, reads the updated bank; returns (loss, updated bank).
  """
  if bank is not None:
    key, k_write = jax.random.split(key)
    bank = update_bank(k_write, branches, bank, mesh=mesh, config=config)
  num_devices = mesh.shape[parallel.DATA_AXIS]
  targets = [resize_targets(b.labels, b.valid, b.rep.shape[1:3]) for b in branches]
  cat = lambda arrays: parallel.per_device_concat(arrays, num_devices)
  logits = jax.lax.stop_gradient(cat([b.logits for b in branches]))
  prob = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  loss = reco_lib.reco_loss_per_device(
      key, cat([b.rep for b in branches]).astype(jnp.float32), cat([t[0] for t in targets]),
      cat([t[1] for t in targets]), prob, mesh=mesh, axis_name=parallel.DATA_AXIS,
      average_prototypes=bool(config.average_prototypes), bank=bank,
      strong_threshold=float(config.strong_threshold),
      temperature=float(config.reco_temperature), num_queries=int(config.num_queries),
      num_negatives=int(config.num_negatives), query_mode=config.query_mode,
      key_mode=config.key_mode)
  return loss if bank is None else (loss, bank)

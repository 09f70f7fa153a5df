"""ReCo with a feature bank (ReCo paper section 4.4): keys from earlier steps, per class.

The bank keeps, for each class c, a first-in-first-out queue of K key representations:
`keys[c]` is a ring buffer of K slots with a write pointer `pointer[c]` (the oldest entry once
the queue is full) and a fill level `count[c]`. With a bank, ReCo (`reco.reco_loss(bank=...)`)
takes its positive keys (class prototypes = means of a class's entries), its class relation
graph and its negative keys from the bank instead of the batch; queries stay the batch's hard
pixels, with gradient. The reference code (lorenmt/reco) has no bank, so what follows are
this implementation's choices, each with its reason:

- What is written: each step, for every class, `writes` = min(config.reco_bank_writes, K)
  pixels drawn uniformly without replacement from that class's valid pixels in the step's
  key set (the labelled and pseudo-labelled pixels that batch-mode ReCo draws its keys from),
  or all of them if the class has fewer; their representations are detached. A fixed number
  per class makes every step and every class weigh the same in the queue, whatever area the
  class covers; without replacement, no pixel is stored twice in a step.
- Write before the loss: the step's entries are enqueued first, then the loss reads the
  bank. Every class present in the batch then has a prototype, so no fallback to the batch is
  needed, and the current keys are among the negatives as in batch mode: a bank that holds
  exactly the batch's valid pixels gives the batch-mode loss (`tests/test_reco_bank.py`).
- A bank not yet full: only the first count[c] slots of class c are keys (slots fill from 0
  up, so the filled ones are always the first); a class with no entry is neither a negative
  class nor a query class. A step with two classes present fills both before its loss.
- Device independence: the bank is replicated state, and the same global batch and key
  write the same entries, in the same order, on 1 and N devices. The choice is made by
  random priorities drawn for the global batch (so independent of how it is sharded): the
  `writes` pixels of each class with the smallest (priority, pixel id) are written, in
  ascending order of their global pixel id (branches in order, then image, row, column).
  Each device picks its own `writes` best candidates per class; only their priorities and
  ids ([C, writes] ints per device) are all-gathered, and the chosen rows are assembled with
  one psum of a [C, writes, m] array that is zero except at the owning device, so no
  representation tensor leaves its device and the sum is exact.
- Fixed shapes throughout: sorts and masks, no host round trip.

A bank is a dict of arrays, kept in `TrainState.extras[NAME]` and checkpointed with it:
  keys: float32 [C, K, m]; count: int32 [C] (filled slots); pointer: int32 [C] (next slot).
"""
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections

NAME = 'reco_bank'  # Its key in TrainState.extras.
_NO_PIXEL = jnp.iinfo(jnp.int32).max  # Pixel id of an empty candidate: sorts last.


def settings(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(K, writes) from config.reco_bank_size and reco_bank_writes; K = 0 means no bank.

  Raises ValueError, saying what to set, for a negative or non-integer size, a non-positive
  number of writes, or a bank without ReCo or with average_prototypes.
  """
  size = config.get('reco_bank_size', 0)
  writes = config.get('reco_bank_writes', 64)
  if isinstance(size, bool) or not isinstance(size, int) or size < 0:
    raise ValueError(f'config.reco_bank_size must be a non-negative integer (0 = no bank), '
                     f'got {size!r}.')
  if size == 0:
    return 0, 0
  if isinstance(writes, bool) or not isinstance(writes, int) or writes <= 0:
    raise ValueError(f'config.reco_bank_writes must be a positive integer, got {writes!r}.')
  if not config.get('reco', False):
    raise ValueError(f'config.reco_bank_size={size} is the feature bank of the ReCo loss; set '
                     '--config.reco=True, or reco_bank_size=0.')
  if config.get('average_prototypes', False):
    raise ValueError('config.average_prototypes has no effect with a bank (its prototypes come '
                     'from the replicated bank); set it to False or reco_bank_size=0.')
  return size, min(writes, size)


def init(num_classes: int, size: int, rep_dim: int) -> dict:
  """An empty bank: keys float32 [C, K, m] zeros, count and pointer int32 [C] zeros."""
  if size <= 0 or num_classes <= 0 or rep_dim <= 0:
    raise ValueError(f'A bank needs positive num_classes, size and rep_dim, got '
                     f'{num_classes}, {size}, {rep_dim}.')
  return {'keys': jnp.zeros((num_classes, size, rep_dim), jnp.float32),
          'count': jnp.zeros(num_classes, jnp.int32),
          'pointer': jnp.zeros(num_classes, jnp.int32)}


def init_extras(config: ml_collections.ConfigDict, num_classes: int, rep_dim: int) -> dict:
  """{NAME: empty bank} when config.reco_bank_size > 0, else {} (the state's extras)."""
  size, _ = settings(config)
  return {NAME: init(num_classes, size, rep_dim)} if size else {}


def write(bank: dict, entries: jax.Array, num_new: jax.Array) -> dict:
  """Enqueues entries[c, :num_new[c]] into class c's queue, oldest entries overwritten first.

  entries: float [C, W, m] with W <= K, in write order; num_new: int [C] in [0, W].
  Entry i of class c goes to slot (pointer[c] + i) mod K; then pointer[c] advances by
  num_new[c] mod K and count[c] = min(count[c] + num_new[c], K).
  """
  keys, count, pointer = bank['keys'], bank['count'], bank['pointer']
  num_classes, size, _ = keys.shape
  width = entries.shape[1]
  if entries.ndim != 3 or entries.shape[0] != num_classes or entries.shape[2] != keys.shape[2]:
    raise ValueError(f'entries must be [C, W, m] = [{num_classes}, W, {keys.shape[2]}], got '
                     f'{entries.shape}.')
  if width > size:
    raise ValueError(f'{width} entries per class do not fit a queue of {size}; write at most '
                     'K per step.')
  num_new = jnp.clip(jnp.asarray(num_new, jnp.int32), 0, width)
  i = jnp.arange(width, dtype=jnp.int32)
  # W <= K, so the slots of one class are distinct; unused entries go out of range (dropped).
  slot = jnp.where(i < num_new[:, None], (pointer[:, None] + i) % size, size)
  rows = jnp.arange(num_classes)[:, None]
  keys = keys.at[rows, slot].set(entries.astype(keys.dtype), mode='drop')
  return {'keys': keys, 'count': jnp.minimum(count + num_new, size),
          'pointer': (pointer + num_new) % size}


def choose(rep, labels, valid, priority, pixel_id, *, num_classes: int, writes: int,
           axis_name: str | None = None):
  """The entries one step writes, from this device's pixels: (entries, num_new).

  rep: [b, h, w, m] float (detached here); labels: int [b, h, w]; valid: bool [b, h, w]
  (labels outside [0, C) count as invalid); priority: uint32 [b, h, w] random; pixel_id:
  int32 [b, h, w], distinct global ids. Per class, the `writes` valid pixels with the
  smallest (priority, pixel id) over all devices of `axis_name` (or this batch alone when
  None), in ascending pixel id order. Returns entries float32 [C, writes, m] (zeros past
  num_new[c]) and num_new int32 [C] = min(valid pixels of c, writes), both the same on every
  device.
  """
  m = rep.shape[-1]
  table = lax.stop_gradient(rep).reshape(-1, m).astype(jnp.float32)
  num_pixels = table.shape[0]
  flat_labels = labels.reshape(-1).astype(jnp.int32)
  ok = valid.reshape(-1) & (flat_labels >= 0) & (flat_labels < num_classes)
  cls = jnp.where(ok, flat_labels, num_classes)
  priority = priority.reshape(-1).astype(jnp.uint32)
  pixel_id = pixel_id.reshape(-1).astype(jnp.int32)
  # This device's candidates: each class's `writes` smallest (priority, id).
  _, s_priority, s_id, s_row = lax.sort(
      (cls, priority, pixel_id, jnp.arange(num_pixels, dtype=jnp.int32)), num_keys=3)
  count = jnp.bincount(cls, length=num_classes + 1)[:num_classes].astype(jnp.int32)
  offset = jnp.cumsum(count) - count
  i = jnp.arange(writes, dtype=jnp.int32)
  taken = i < count[:, None]
  pos = jnp.minimum(offset[:, None] + i, num_pixels - 1)
  cand_priority = jnp.where(taken, s_priority[pos], jnp.uint32(0xFFFFFFFF))
  cand_id = jnp.where(taken, s_id[pos], _NO_PIXEL)
  cand_row = s_row[pos]
  if axis_name is None:
    device, everyone = 0, (cand_priority, cand_id)
  else:
    device = lax.axis_index(axis_name)
    everyone = tuple(lax.all_gather(x, axis_name, axis=1, tiled=True)
                     for x in (cand_priority, cand_id))
    count = lax.psum(count, axis_name)
  # The global winners ([C, devices * writes] candidates, device-major), then in id order.
  source = jnp.broadcast_to(jnp.arange(everyone[0].shape[1], dtype=jnp.int32),
                            everyone[0].shape)
  _, win_id, win_source = lax.sort((*everyone, source), dimension=1, num_keys=2)
  win_id, win_source = lax.sort((win_id[:, :writes], win_source[:, :writes]), dimension=1,
                                num_keys=1)
  mine = (win_source // writes == device) & (win_id != _NO_PIXEL)
  rows = jnp.take_along_axis(cand_row, win_source % writes, axis=1)
  entries = jnp.where(mine[..., None], table[rows], 0.0)
  if axis_name is not None:
    entries = lax.psum(entries, axis_name)  # One owner per entry: an exact sum.
  return entries, jnp.minimum(count, writes)


def update_per_device(bank: dict, rep, labels, valid, priority, pixel_id, *,
                      mesh: jax.sharding.Mesh, writes: int, axis_name: str = 'data') -> dict:
  """`bank` after enqueuing one step's entries (`choose`) from batch-sharded global arrays.

  rep/labels/valid/priority/pixel_id: global arrays sharded on `axis_name` along the batch,
  shapes as in `choose`; bank: replicated. The result does not depend on the number of
  devices. Call it inside jit.
  """
  spec = jax.sharding.PartitionSpec(axis_name)
  replicated = jax.sharding.PartitionSpec()
  num_classes = bank['keys'].shape[0]
  local = lambda *args: choose(*args, num_classes=num_classes, writes=writes,
                               axis_name=axis_name)
  entries, num_new = jax.shard_map(
      local, mesh=mesh, in_specs=(spec,) * 5, out_specs=(replicated, replicated))(
          rep, labels, valid, priority, pixel_id)
  return write(bank, entries, num_new)

"""Data parallelism on a one-axis device mesh: state replicated, batches sharded on 'data'."""
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D ('data',) mesh over `devices` (default: all devices of all processes).

  The axis type is Auto so that jit propagates shardings itself; JAX's `make_mesh`
  would default to Explicit axes.
  """
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError('make_mesh needs at least one device; got an empty list.')
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy on every device of `mesh` (train state, metrics)."""
  return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding that splits the leading (batch) axis over the 'data' axis of `mesh`."""
  return NamedSharding(mesh, P(DATA_AXIS))


def shard_batch(mesh: Mesh, tree):
  """Assembles global arrays, sharded on the batch axis, from this process's part of a batch.

  tree: pytree of numpy arrays whose leading axis is this process's share of the global batch
  (each process passes different data; the global batch is their concatenation in process
  order). Returns the same pytree of global `jax.Array`s.
  """
  local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  sharding = data_sharding(mesh)

  def put(x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % local_devices:
      raise ValueError(
          f'shard_batch: a per-process batch of shape {x.shape} cannot be split over the '
          f'{local_devices} local devices of the mesh; make the per-process batch size a '
          f'multiple of {local_devices} (global batch = multiple of {mesh.size}).')
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(put, tree)


def per_device_concat(arrays: Sequence[jax.Array], num_devices: int) -> jax.Array:
  """Concatenates batch-sharded arrays so that each device's slice holds its own shards.

  arrays: [B_i, ...] each (equal trailing shapes), sharded over `num_devices` on the leading
  axis. Returns [sum B_i, ...] whose d-th block of rows is (the first array's d-th shard, the
  second's, ...), which is what each GPU concatenates in data-parallel PyTorch (labelled
  first). A plain concatenate would put all of the first array on the first devices.
  """
  sizes = [a.shape[0] for a in arrays]
  if any(n % num_devices for n in sizes):
    raise ValueError(f'Per-branch batch sizes {sizes} must be multiples of the {num_devices} '
                     'devices of the mesh; change config.batch_size.')
  blocks = [a.reshape((num_devices, a.shape[0] // num_devices) + a.shape[1:]) for a in arrays]
  return jnp.concatenate(blocks, axis=1).reshape((-1,) + arrays[0].shape[1:])


def to_host(tree):
  """Replicated (possibly multi-process) arrays -> numpy, without a cross-host gather.

  Each process reads its own first replica; non-array leaves pass through np.asarray.
  """
  def get(x):
    if isinstance(x, jax.Array):
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)
  return jax.tree.map(get, tree)


def sync(name: str) -> None:
  """Waits until every process reaches the barrier `name` (nothing to wait for on one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)

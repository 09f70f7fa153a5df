"""A model's predictions on the unlabelled training images, stored as a dataset of labels.

method=pseudo_label (Zhao et al., supplementary section 2) trains a first model on the
labelled images, labels every unlabelled training image with it, and trains the final model on
labelled + pseudo-labelled images. The labels are predicted at the full image resolution (the
image padded like an evaluation image, `predict.predict_images`' buckets), argmax, with the
pixels whose softmax confidence is below config.pseudo_label_threshold set to void; each
process predicts its share of the images data parallel over all its devices. They are written
once into a folder as TFRecord shards of {image_id, PNG label} (one per process) and a
manifest, which is written last: a folder without its manifest is incomplete, is never read,
and is written again from the start.
"""
from collections.abc import Sequence
import json
import time

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from reco_jax import console as console_lib
from reco_jax import inference
from reco_jax import inputs
from reco_jax import methods
from reco_jax import names
from reco_jax import parallel
from reco_jax import stages
from reco_jax import steps
from reco_jax import workdir as workdir_lib
from reco_jax.data import pipeline
from reco_jax.data import splits
from reco_jax.methods import common

MANIFEST = 'manifest.json'


def is_complete(folder: str | epath.Path) -> bool:
  return (epath.Path(folder) / MANIFEST).exists()


def _shard_name(index: int, count: int) -> str:
  return f'labels-{index:05d}-of-{count:05d}.tfrecord'


def make_label_fn(model, threshold: float, mesh: jax.sharding.Mesh | None = None):
  """Jitted label_fn(variables, images [B, H, W, 3]) -> uint8 [B, H, W] (255 = below threshold).

  With a mesh, the labels come back sharded on the batch axis like the images.
  """
  def label_fn(variables, images):
    logits, _ = model.apply(variables, images, train=False)
    prob = jax.nn.softmax(common.upsample(logits, images.shape[1:3]), axis=-1)
    classes = jnp.argmax(prob, axis=-1)
    confident = jnp.max(prob, axis=-1) >= threshold
    return jnp.where(confident, classes, names.VOID).astype(jnp.uint8)
  out = parallel.data_sharding(mesh) if mesh is not None else None
  return jax.jit(label_fn, out_shardings=out)


def predict_labels(label_fn, variables, images, *, mesh: jax.sharding.Mesh, eval_size,
                   batch_size: int) -> list[np.ndarray]:
  """uint8 [h, w] pseudo-labels of uint8 [h, w, 3] images, data parallel over `mesh`.

  label_fn: `make_label_fn(model, threshold, mesh)`; variables: replicated on `mesh`, whose
  devices are all this process's. Images are padded to `inference.bucket_size(size,
  eval_size)` and run in batches of `batch_size` (the last one zero-padded; a multiple of the
  mesh size), each split over the devices, so there are few compiled shapes.
  """
  return inference.map_in_buckets(
      lambda batch: jax.device_get(label_fn(variables, parallel.shard_batch(mesh, batch))),
      images, eval_size, batch_size)


def write(folder: str | epath.Path, config: ml_collections.ConfigDict, model, variables,
          builder, ids, *, source: str, chunk: int = 64,
          devices: Sequence[jax.Device] | None = None) -> int:
  """Labels the train images `ids` with the model and writes the dataset into `folder`.

  Every process labels its share of `ids` (`pipeline.decoded_images`) on all its local
  devices and writes one shard; process 0 writes the manifest once every shard is written.
  The mesh is the process's own devices, not all of the run's: the shares differ in number
  and image sizes, so each process runs its own sequence of fixed-shape batches (per process
  config.eval_batch_size / process count, split over the local devices) and none waits for
  another's. An incomplete folder left by a killed run is removed first. Returns the number
  of images this process labelled.

  source: the checkpoint the model came from (recorded in the manifest); variables: the
  model's, replicated (on any devices); devices: this process's devices to predict on
  (default all of them).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from reco_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  folder = epath.Path(folder)
  index, count = jax.process_index(), jax.process_count()
  devices = list(devices or jax.local_devices())
  if any(d.process_index != index for d in devices):
    raise ValueError(f'write: process {index} can predict on its own devices only; got '
                     f'{devices}.')
  if index == 0:
    if folder.exists():
      folder.rmtree()
    folder.mkdir(parents=True)
  parallel.sync('pseudo_labels_folder')
  mesh = parallel.make_mesh(devices)
  batch = max(1, int(config.eval_batch_size) // (count * mesh.size)) * mesh.size
  variables = jax.device_put(parallel.to_host(variables), parallel.replicated(mesh))
  label_fn = make_label_fn(model, float(config.pseudo_label_threshold), mesh)
  done = 0
  with tf.io.TFRecordWriter(str(folder / _shard_name(index, count))) as writer:
    stream = pipeline.decoded_images(builder, ids, process_index=index, process_count=count)
    pending = []
    for item in [*stream, None]:
      if item is not None:
        pending.append(item)
      if pending and (item is None or len(pending) == chunk):
        labels = predict_labels(label_fn, variables, [image for _, image in pending],
                                mesh=mesh, eval_size=tuple(config.eval_size), batch_size=batch)
        for (image_id, _), label in zip(pending, labels):
          png = tf.io.encode_png(label[..., None]).numpy()
          example = tf.train.Example(features=tf.train.Features(feature={
              'image_id': tf.train.Feature(bytes_list=tf.train.BytesList(
                  value=[image_id.encode()])),
              'label': tf.train.Feature(bytes_list=tf.train.BytesList(value=[png]))}))
          writer.write(example.SerializeToString())
        done += len(pending)
        pending = []
  parallel.sync('pseudo_labels_shards')
  if index == 0:
    manifest = {'images': len(ids), 'shards': [_shard_name(i, count) for i in range(count)],
                'threshold': float(config.pseudo_label_threshold), 'source': source}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
  parallel.sync('pseudo_labels_manifest')
  return done


def read(folder: str | epath.Path) -> dict[str, bytes]:
  """{image id: PNG label} of a complete pseudo-label folder."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  folder = epath.Path(folder)
  if not is_complete(folder):
    raise FileNotFoundError(f'{folder} holds no complete pseudo-label dataset (no {MANIFEST}); '
                            'run the training command again to write it.')
  manifest = json.loads((folder / MANIFEST).read_text())
  spec = {'image_id': tf.io.FixedLenFeature([], tf.string),
          'label': tf.io.FixedLenFeature([], tf.string)}
  out = {}
  for record in tf.data.TFRecordDataset([str(folder / s) for s in manifest['shards']]):
    example = tf.io.parse_single_example(record, spec)
    out[example['image_id'].numpy().decode()] = example['label'].numpy()
  if len(out) != manifest['images']:
    raise ValueError(f'{folder} lists {manifest["images"]} images but its shards hold '
                     f'{len(out)}; delete the folder and run the command again.')
  return out


def decode(png: bytes) -> np.ndarray:
  """uint8 [h, w] label of one stored PNG."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.decode_png(png, channels=1).numpy()[..., 0]


def write_stage(stage: stages.Stage, run_dir: epath.Path, where: epath.Path, builder, mesh,
                console) -> None:
  """Runs a PSEUDO_LABELS stage (`reco_jax.stages`) into `where`: the final model of stage 0
  (in run_dir / stage.pseudo_labels) labels the unlabelled train images. Nothing to do when
  `where` is complete."""
  if is_complete(where):
    console.say(f'The pseudo-labels in {where} are complete; nothing to do.')
    return
  config = stage.config
  source = stages.Stage(stage.pseudo_labels, stages.TRAIN, config)
  model, _ = methods.stage_model(source)
  directory = run_dir / stage.pseudo_labels / workdir_lib.CHECKPOINTS
  step = int(config.num_train_steps)
  state = workdir_lib.restore_state(config, model, directory, step, mesh=mesh)
  ids, _ = pipeline.train_ids_and_classes(builder)
  labelled = inputs.labelled_ids(config, builder)
  u_ids, keep, _ = splits.unlabelled_selection(ids, labelled, config.unlabelled_fraction,
                                                 config.seed)
  chosen = set(u_ids)
  targets = [i for i in ids if (i in chosen) == keep]
  start = time.time()
  write(where, config, model, steps.eval_variables(config, state), builder,
        targets, source=f'{directory}/{step}')
  console.say(f'Wrote the pseudo-labels of {len(targets)} images to {where} in '
              f'{console_lib.duration(time.time() - start)}.')

"""Host-side training loop: data, jitted steps, evaluation, checkpoints and metric writers.

`train_and_evaluate(config, workdir)` runs a whole experiment and resumes it automatically:
run the same command again and it continues from the latest checkpoint in
`workdir/checkpoints`. A resumed run reaches the same state as an uninterrupted one because
every source of randomness is a function of the step: the step key is
`fold_in(train_key, step)` (done inside the step) and the input iterators are rebuilt from
the config seed and fast-forwarded past the batches already consumed. The input pipeline is
deterministic and seeds every example's augmentation by its position in the stream, so the
skipped stream yields exactly the batches an uninterrupted run would see. Skipped batches
are dropped as encoded examples, before decoding and augmentation.
"""
from collections.abc import Iterator, Mapping
import collections
import math
import time
from typing import Any

from absl import logging
from clu import metric_writers
from clu import periodic_actions
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from reco_jax import console as console_lib
from reco_jax import defaults
from reco_jax import evaluation
from reco_jax import methods
from reco_jax import names
from reco_jax import parallel
from reco_jax import preemption
from reco_jax import pseudo_labels
from reco_jax import relations
from reco_jax import run_guard
from reco_jax import stages
from reco_jax import state as state_lib
from reco_jax import steps
from reco_jax import workdir as workdir_lib
from reco_jax.data import base
from reco_jax.data import toy
from reco_jax.methods import contrastive_pretraining
from reco_jax.models import imagenet

_DEEPLABV3P_ONLY = ('output_stride', 'aspp_dim', 'low_level_dim', 'head_dim')


class TrainingDivergedError(FloatingPointError):
  """A loss became NaN or infinite; no checkpoint of the diverged state was written."""


# --------------------------------------------------------------------------- config checks


def _pair(config, name):
  value = config[name]
  try:
    pair = tuple(int(v) for v in value)
  except TypeError:
    pair = ()
  if len(pair) != 2 or min(pair) <= 0 or any(int(v) != v for v in value):
    raise ValueError(f'config.{name} must be a pair of positive integers (height, width), '
                     f'got {value!r}.')
  return pair


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError, saying what was expected, for a config that cannot run.

  Checks that every field of `defaults.base_config()` is present (with the optimiser's), the
  choices (method, partial, model), positive sizes and step counts, and that the global batch
  sizes split evenly over the processes and devices.
  """
  schema = defaults.base_config()
  missing = [k for k in schema if k not in config]
  for group in ('optimizer', 'pretrain_optimizer', 'distortion'):
    missing += [f'{group}.{k}' for k in schema[group]
                if group in config and k not in config[group]]
  if missing:
    raise ValueError(f'The config lacks the fields {missing}; start from a file in configs/ '
                     '(reco_jax/defaults.py lists every field with its default).')
  method = methods.get(config.method)  # Names the valid methods for an unknown one.
  if config.split not in names.LABELLED_POOLS:
    raise ValueError(f'config.split={config.split!r}: expected one of '
                     f'{tuple(names.LABELLED_POOLS)}.')
  if config.subset not in names.SUBSETS:
    raise ValueError(f'config.subset={config.subset!r}: expected one of {names.SUBSETS}.')
  if not 0.0 < config.unlabelled_fraction <= 1.0:
    raise ValueError(f'config.unlabelled_fraction={config.unlabelled_fraction}: expected a '
                     'fraction in (0, 1].')
  if config.partial not in names.PARTIALS:
    raise ValueError(f"config.partial={config.partial!r}: expected '' (full labels) or one of "
                     f'{names.PARTIALS[1:]}.')
  if config.model.get('name') not in names.MODELS:
    raise ValueError(f'config.model.name={config.model.get("name")!r}: expected one of '
                     f'{names.MODELS}.')
  if config.model.get('dtype', 'float32') not in names.PRECISIONS.values():
    raise ValueError(f'config.model.dtype={config.model.get("dtype")!r}: expected one of '
                     f'{tuple(names.PRECISIONS.values())} (the config argument precision='
                     f'{"|".join(names.PRECISIONS)} sets it).')
  for name in ('num_classes', 'batch_size', 'eval_batch_size', 'num_train_steps',
               'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
               'keep_checkpoints', 'num_queries', 'num_negatives'):
    value = config[name]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f'config.{name} must be a positive integer, got {value!r}.')
  for name in ('labels', 'min_classes', 'num_image_summaries'):
    if not isinstance(config[name], int) or config[name] < 0:
      raise ValueError(f'config.{name} must be a non-negative integer, got {config[name]!r}.')
  _pair(config, 'crop_size')
  _pair(config, 'eval_size')
  low, high = config.scale_range
  if not 0 < low <= high:
    raise ValueError(f'config.scale_range must be (low, high) with 0 < low <= high, got '
                     f'{tuple(config.scale_range)}.')
  for name in ('ema_decay', 'strong_threshold', 'weak_threshold'):
    if not 0.0 <= config[name] <= 1.0:
      raise ValueError(f'config.{name} must be in [0, 1], got {config[name]}.')
  for group in ('optimizer', 'pretrain_optimizer'):
    if config[group].learning_rate <= 0:
      raise ValueError(f'config.{group}.learning_rate must be positive, got '
                       f'{config[group].learning_rate}.')
  _validate_pretraining(config)
  if hasattr(method, 'check_config'):  # What only this method needs or cannot do.
    method.check_config(config)
  processes, devices = jax.process_count(), jax.device_count()
  for name in ('batch_size', 'eval_batch_size'):
    if config[name] % devices:
      raise ValueError(f'config.{name}={config[name]} is the global batch; it must be a '
                       f'multiple of the {devices} devices ({processes} processes x '
                       f'{jax.local_device_count()} local devices). Set --config.{name} to a '
                       'multiple of it.')


def _validate_pretraining(config) -> None:
  """The pretraining and pseudo-label fields, and what they cannot be combined with."""
  if config.pretrain not in names.PRETRAINS:
    raise ValueError(f'config.pretrain={config.pretrain!r}: expected one of {names.PRETRAINS}.')
  pretraining = config.pretrain != 'none'
  if pretraining or config.method == 'pseudo_label':
    what = (f'pretrain={config.pretrain}' if pretraining else 'method=pseudo_label')
    if config.partial:
      raise ValueError(f'{what} needs dense labels; partial={config.partial} labels a few '
                       'pixels per image. Drop one of them.')
  if pretraining and config.method == 's4gan':
    raise ValueError('pretrain is not supported with method=s4gan (its discriminator has no '
                     'pretrained counterpart); use pretrain=none, or another method.')
  if config.method == 'pseudo_label' and config.labels == 0:
    raise ValueError('method=pseudo_label labels the unlabelled images, and labels=0 leaves '
                     'none; choose labels=N (the labelled images).')
  if not pretraining:
    return
  for name in ('pretrain_steps', 'embedding_stride', 'contrast_temperature'):
    value = config[name]
    if isinstance(value, bool) or value <= 0:
      raise ValueError(f'config.{name} must be positive, got {value!r}.')
  dims = tuple(config.projection_dims)
  if not dims or any(int(d) != d or d <= 0 for d in dims):
    raise ValueError(f'config.projection_dims must be positive widths, the last one the '
                     f'embedding, got {dims}.')
  for name in ('jitter_prob', 'grey_prob'):
    if not 0.0 <= config.distortion[name] <= 1.0:
      raise ValueError(f'config.distortion.{name} must be in [0, 1], got '
                       f'{config.distortion[name]}.')
  if not 0.0 <= config.distortion.hue <= 0.5:
    raise ValueError(f'config.distortion.hue must be in [0, 0.5], got {config.distortion.hue}.')
  if not 0.0 <= config.pseudo_label_threshold < 1.0:
    raise ValueError(f'config.pseudo_label_threshold must be in [0, 1), got '
                     f'{config.pseudo_label_threshold}.')


# --------------------------------------------------------------------------- data


def _prepare_dataset(config):
  """The prepared TFDS builder, or an error saying how to get the dataset."""
  import tensorflow_datasets as tfds  # Heavy import only where the data is needed.
  try:
    builder = base.prepare(config.dataset, config.data_dir or None, config.manual_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f'Unknown dataset {config.dataset!r}: expected one of reco_voc, reco_cityscapes, '
        'reco_sun_rgbd, reco_toy, reco_folder (config.dataset).') from e
  except (AssertionError, FileNotFoundError, tfds.core.download.DownloadError) as e:
    raise FileNotFoundError(
        f'Dataset {config.dataset!r} is not prepared in '
        f'{config.data_dir or "the TFDS default data dir ($TFDS_DATA_DIR)"} and could not be '
        f'built: {e}\nPut the raw files in a folder and pass --config.manual_dir=FOLDER (the '
        f'builder docstring in reco_jax/data describes the layout), or point '
        f'--config.data_dir at a directory holding the prepared dataset.') from e
  classes = base.class_names(builder)
  if len(classes) != config.num_classes:
    raise ValueError(f'config.num_classes={config.num_classes} but dataset {config.dataset!r} '
                     f'has {len(classes)} classes; set --config.num_classes={len(classes)}.')
  return builder


def _eval_split(builder) -> str:
  for split in workdir_lib.EVAL_SPLITS:
    if split in builder.info.splits:
      return split
  raise ValueError(f'Dataset {builder.name!r} has no evaluation split: expected one of '
                   f'{workdir_lib.EVAL_SPLITS}, found {list(builder.info.splits)}.')


def branch_batches(config) -> tuple[int, int]:
  """(labelled, unlabelled) global images per step of config.method.

  The method's BRANCHES in multiples of config.batch_size: a method without an unlabelled
  branch (supervised) reads 2 x batch_size labelled images, as the reference's supervised
  runs do.
  """
  return _branch_sizes(config, methods.get(config.method).BRANCHES)


def _branch_sizes(config, branches) -> tuple[int, int]:
  labelled, unlabelled = branches
  return labelled * config.batch_size, unlabelled * config.batch_size


def _train_iterators(config, builder, start_batch: int, *, method, pseudo=None):
  """(labelled, unlabelled or None, labelled ids) for this process, after `start_batch`.

  method: the method module (its BRANCHES and LABELLED_PHOTOMETRIC); pseudo: {image id: PNG
  label} joining the labelled stream.
  """
  from reco_jax.data import pipeline  # TF pulled in only by the data path.
  labelled_batch, unlabelled_batch = _branch_sizes(config, method.BRANCHES)
  kwargs = dict(
      num_labels=config.labels,
      min_classes=config.min_classes,
      num_classes=config.num_classes,
      partial=config.partial,
      crop_size=tuple(config.crop_size),
      scale_range=tuple(config.scale_range),
      labelled_batch=labelled_batch,
      unlabelled_batch=unlabelled_batch,
      seed=config.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      start_batch=start_batch,
      labelled_pool=_labelled_pool(config.split),
      unlabelled_fraction=float(config.unlabelled_fraction),
      pseudo_labels=pseudo,
      hue_jitter=float(config.hue_jitter),
      subset=config.subset,
      labelled_photometric=getattr(method, 'LABELLED_PHOTOMETRIC', True))
  return pipeline.train_iterators(builder, **kwargs)


def _labelled_pool(split: str) -> list[str] | None:
  """The shipped id list the labelled subset of config.split is drawn from (None: all)."""
  filename = names.LABELLED_POOLS[split]
  if filename is None:
    return None
  from reco_jax.data import raw_io  # pylint: disable=g-import-not-at-top
  return raw_io.shipped_ids(filename)


def _eval_iterator(config, builder):
  from reco_jax.data import pipeline
  return pipeline.eval_iterator(
      builder, split=_eval_split(builder), eval_size=tuple(config.eval_size),
      batch_size=config.eval_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count())


def _global_batches(mesh, labelled, unlabelled) -> Iterator[dict]:
  """Global train batches, one prefetched ahead."""
  def make():
    local = next(labelled)
    batch = {'labelled': {'image': local['image'], 'label': local['label']}}
    if unlabelled is not None:
      # Partial-label runs also carry the sparse labels of the unlabelled branch.
      batch['unlabelled'] = dict(next(unlabelled))
    return parallel.shard_batch(mesh, batch)

  # The transfer of the next batch overlaps the running step (device_put is asynchronous).
  queue = collections.deque([make()])
  while True:
    queue.append(make())
    yield queue.popleft()


# --------------------------------------------------------------------------- host helpers


def _flatten(d: Mapping[str, Any]) -> dict[str, Any]:
  """The config as flat hparams: values that are not scalars become strings."""
  return {k: v if isinstance(v, (bool, int, float, str)) else str(v)
          for k, v in run_guard.flatten(d).items()}


def _write_run_files(config, workdir: epath.Path, labelled_ids) -> None:
  """Resolved config and labelled image ids, written once by process 0."""
  if jax.process_index() != 0:
    return
  _write_config(config, workdir)
  (workdir / 'labelled_ids.txt').write_text(''.join(f'{i}\n' for i in labelled_ids))


def _write_config(config, workdir: epath.Path) -> None:
  """workdir/config.json (process 0). A resumed run differs from it at most in the fields
  `run_guard.MAY_CHANGE` lists (checked on start), which it updates."""
  if jax.process_index() != 0:
    return
  path = workdir / workdir_lib.CONFIG_FILE
  path.write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def _diverged(step, what, last_saved, checkpoint_dir):
  saved = (f'the last good checkpoint (step {last_saved}) in {checkpoint_dir} is intact'
           if last_saved else 'no checkpoint was written')
  return TrainingDivergedError(
      f'Training diverged at step {step}: {what}; {saved}. Lower '
      'config.optimizer.learning_rate or check the input data, then run again.')


def _check_finite(records, last_saved, checkpoint_dir):
  """Raises TrainingDivergedError naming the first step with a NaN/Inf loss or gradient."""
  for step, metrics in records:
    bad = [k for k, v in metrics.items() if not np.all(np.isfinite(v))]
    if bad:
      losses = {k: float(v) for k, v in metrics.items() if 'loss' in k}
      parts = ', '.join(f'{k}={v:.6g}' for k, v in sorted(losses.items()))
      raise _diverged(step, f'non-finite {", ".join(sorted(bad))} ({parts})', last_saved,
                      checkpoint_dir)


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


# --------------------------------------------------------------------------- evaluation


def evaluate(eval_step, variables, eval_batches, mesh, num_classes: int):
  """Confusion matrix over the whole eval set: int64 [C, C], rows = ground truth.

  Per-batch int32 matrices come from the devices; they are summed on the host in int64 so
  large evaluation sets cannot overflow. Returns (confusion, first global batch or None).
  """
  confusions, first = [], None
  for local in eval_batches:
    batch = parallel.shard_batch(mesh, local)
    if first is None:
      first = batch
    confusions.append(eval_step(variables, batch))
  total = np.zeros((num_classes, num_classes), np.int64)
  for confusion in confusions:
    total += parallel.to_host(confusion).astype(np.int64)
  return total, first


# --------------------------------------------------------------------------- training


def _relation_image(config, model, mesh, stats_step, variables, eval_batches, class_names,
                    step):
  """The relation graph of the class mean representations on the eval set, as an image."""
  totals = relations.init_totals(config, model, variables,
                                 (config.eval_batch_size, *config.eval_size, 3), ('R',), mesh)
  means = relations.class_means(stats_step, totals, variables, eval_batches, mesh)
  return relations.relation_image(means['R'], class_names, f'representation R, step {step}')


def build_model(config, *, features_only: bool = False):
  """The linen model of config.model: `name` selects the architecture, other keys go to it.

  DeepLabV2 (output stride 8, no ASPP or decoder) does not take the DeepLabV3+ width and
  stride keys; they are dropped for it so one config serves both backbones.
  features_only: the network up to its last feature map before the classifier (pretraining).
  """
  from reco_jax.models import deeplab
  kwargs = dict(config.model.to_dict())
  name = kwargs.pop('name')
  if name == 'deeplabv2':
    for key in _DEEPLABV3P_ONLY:
      kwargs.pop(key, None)
  kwargs['dtype'] = jnp.dtype(kwargs.get('dtype', 'float32'))
  if features_only:
    kwargs['features_only'] = True
  try:
    return deeplab.build_model(name, num_classes=config.num_classes, **kwargs)
  except TypeError as e:
    raise ValueError(f'config.model has a key the {name} model does not take ({e}); its '
                     f'fields are those of deeplab.{deeplab.MODELS[name].__name__}.') from e


def stage_model(stage: stages.Stage):
  """(model, method module) of a training or pretraining stage."""
  if stage.kind == stages.PRETRAIN:
    segmenter = build_model(stage.config, features_only=True)
    return (contrastive_pretraining.build_network(stage.config, segmenter),
            contrastive_pretraining)
  return build_model(stage.config), methods.get(stage.config.method)


def initial_state(stage: stages.Stage, run_dir: epath.Path, model, mesh) -> state_lib.TrainState:
  """The state a stage starts from: initialised from the config seed, and for a fine-tuning
  stage with the backbone and decoder of its pretraining stage's final checkpoint (the
  classifier and representation heads stay freshly initialised, the projection head is
  dropped, the optimiser starts afresh)."""
  config = stage.config
  init_key, _ = jax.random.split(jax.random.key(config.seed))
  state = state_lib.create_train_state(config, model, init_key,
                                       (*tuple(config.crop_size), 3), mesh=mesh,
                                       initial_weights=stage.init_from is None)
  if stage.init_from is None:
    return state
  source = stages.Stage(stage.init_from, stages.PRETRAIN,
                        stages.pretraining_config(config))
  network, _ = stage_model(source)
  directory = run_dir / stage.init_from / workdir_lib.CHECKPOINTS
  step = int(source.config.num_train_steps)
  pretrained = workdir_lib.restore_state(source.config, network, directory, step, mesh=mesh)
  variables = contrastive_pretraining.finetune_variables(
      parallel.to_host(pretrained.student_variables()),
      parallel.to_host(state.student_variables()))
  return state_lib.create_train_state_from(config, model, variables, init_key,
                                           (1, *tuple(config.crop_size), 3), mesh=mesh)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> state_lib.TrainState:
  """Runs every stage of a run (`reco_jax.stages`), resuming where a killed run stopped.

  A run without pretraining (and not method=pseudo_label) is one stage that trains and
  periodically evaluates a model in `workdir` itself.

  Args:
    config: a config from configs/ (fields as in reco_jax/defaults.py).
    workdir: local or gs:// directory for checkpoints, TensorBoard events, config.json and
      labelled_ids.txt (in a sub-folder per stage when there are several).

  Returns:
    The final TrainState of the last stage (replicated on the device mesh).

  Raises:
    ValueError: an invalid config.
    FileNotFoundError: the dataset is not prepared and its raw files are missing.
    TrainingDivergedError: a NaN/Inf loss; checkpoints before it are kept.
  """
  validate_config(config)
  workdir = epath.Path(workdir)
  run_guard.check_same_run(config, workdir)  # Before anything in the workdir is written.
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
  with run_guard.workdir_lock(workdir), preemption.Preemption() as preempt:
    return _run_stages(config, workdir, preempt)


def _run_stages(config, workdir: epath.Path, preempt) -> state_lib.TrainState:
  """Every stage of `train_and_evaluate`'s plan, in turn."""
  plan = stages.plan(config)
  console = console_lib.Console(1, enabled=jax.process_index() == 0)
  _initial_weights(config, plan, workdir, console)
  builder = _prepare_dataset(config)
  mesh = parallel.make_mesh()
  if len(plan) > 1 and jax.process_index() == 0:
    _write_config(config, workdir)
    stages.write_index(config, workdir)
  state = None
  for number, stage in enumerate(plan, start=1):
    where = workdir / stage.folder if stage.folder else workdir
    if len(plan) > 1:
      console.say(f'Stage {number}/{len(plan)}: {_describe(stage)} in {where}.')
    if stage.kind == stages.PSEUDO_LABELS:
      _write_pseudo_labels(stage, workdir, where, builder, mesh, console)
    else:
      state = _train_stage(stage, workdir, where, builder, mesh, preempt)
  return state


def _initial_weights(config, plan, workdir: epath.Path, console) -> None:
  """Resolves config.init_weights before the data is prepared, if a stage starts from them
  (one without checkpoints and not initialised from a pretraining stage): ImageNet weights
  are fetched now, so that an offline run fails at once, naming the file to place. Says
  which initial weights the run uses."""
  def started(stage):
    directory = (workdir / stage.folder if stage.folder else workdir) / workdir_lib.CHECKPOINTS
    return directory.exists() and any(p.name.isdigit() for p in directory.iterdir())

  if any(s.kind != stages.PSEUDO_LABELS and s.init_from is None and not started(s)
         for s in plan):
    weights = imagenet.prepare(config.init_weights, config.model.backbone)
    logging.info('Initial weights: %s.', weights.description)
    console.say(f'Initial weights: {weights.description}.')


def _describe(stage: stages.Stage) -> str:
  c = stage.config
  if stage.kind == stages.PRETRAIN:
    return f'{c.pretrain}-image contrastive pretraining, {c.num_train_steps} steps,'
  if stage.kind == stages.PSEUDO_LABELS:
    return f'pseudo-labels of the unlabelled images from {stage.pseudo_labels},'
  extra = ' on labelled + pseudo-labelled images' if stage.pseudo_labels else ''
  start = ' from the pretrained network' if stage.init_from else ''
  return f'{c.method}{" + ReCo" * bool(c.reco)}{extra}{start}, {c.num_train_steps} steps,'


def _write_pseudo_labels(stage, run_dir, where, builder, mesh, console) -> None:
  """The PSEUDO_LABELS stage: stage 0's final model labels the unlabelled train images."""
  from reco_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  if pseudo_labels.is_complete(where):
    console.say(f'The pseudo-labels in {where} are complete; nothing to do.')
    return
  config = stage.config
  source = stages.Stage(stage.pseudo_labels, stages.TRAIN, config)
  model, _ = stage_model(source)
  directory = run_dir / stage.pseudo_labels / workdir_lib.CHECKPOINTS
  step = int(config.num_train_steps)
  state = workdir_lib.restore_state(config, model, directory, step, mesh=mesh)
  ids, _ = pipeline.train_ids_and_classes(builder)
  labelled = _labelled_ids(config, builder)
  u_ids, keep, _ = pipeline.unlabelled_selection(ids, labelled, config.unlabelled_fraction,
                                                 config.seed)
  chosen = set(u_ids)
  targets = [i for i in ids if (i in chosen) == keep]
  start = time.time()
  pseudo_labels.write(where, config, model, steps.eval_variables(config, state), builder,
                      targets, source=f'{directory}/{step}')
  console.say(f'Wrote the pseudo-labels of {len(targets)} images to {where} in '
              f'{console_lib.duration(time.time() - start)}.')


def _labelled_ids(config, builder) -> list[str]:
  """The labelled subset of config, as the input pipeline draws it."""
  from reco_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  ids, classes = pipeline.train_ids_and_classes(builder)
  return pipeline.labelled_subset(ids, classes, config.labels, min_classes=config.min_classes,
                                  num_classes=config.num_classes, seed=config.seed,
                                  labelled_pool=_labelled_pool(config.split),
                                  subset=config.subset)


class _SegmentationEval:
  """Evaluation of a segmentation stage: mIoU, per-class IoU, example panels, relations."""

  def __init__(self, config, model, mesh, builder, class_names):
    self.config, self.model, self.mesh, self.class_names = config, model, mesh, class_names
    self.eval_step = steps.make_eval_step(config, model, mesh)
    self.query_fn = relations.make_query_maps_fn(model)
    if config.reco:  # The class relation graph (ReCo paper Fig. 8) at each evaluation.
      self.stats_step = relations.make_class_stats_step(config, model, mesh, embeddings=('R',))

  def __call__(self, state, eval_batches, writer, console, done) -> float:
    config = self.config
    variables = steps.eval_variables(config, state)
    confusion, first = evaluate(self.eval_step, variables, eval_batches, self.mesh,
                                config.num_classes)
    miou = evaluation.mean_iou(confusion)
    iou = evaluation.iou_from_confusion(confusion)
    scalars = {'eval/miou': miou, 'eval/pixel_accuracy': evaluation.pixel_accuracy(confusion)}
    scalars.update({f'eval/iou/{name}': float(v) for name, v in zip(self.class_names, iou)})
    writer.write_scalars(done, scalars)
    if first is not None and config.num_image_summaries:
      # image | ground truth | prediction | easy and hard queries (ReCo paper Fig. 2).
      writer.write_images(done, {'eval/examples': relations.query_panel_images(
          config, variables, first, self.query_fn)})
    if config.reco:
      writer.write_images(done, {'eval/relations_R': _relation_image(
          config, self.model, self.mesh, self.stats_step, variables, eval_batches,
          self.class_names, done)})
    console.evaluation(done, miou)
    return miou


class _ProbeEval:
  """Evaluation of a pretraining stage: the embedding probe on the validation pixels."""

  def __init__(self, config, model, mesh):
    self.config, self.mesh = config, mesh
    network = model.clone(embedding_size=None)  # Any evaluation size; same parameters.
    self.probe_step = contrastive_pretraining.make_probe_step(config, network, mesh)

  def __call__(self, state, eval_batches, writer, console, done) -> None:
    totals = contrastive_pretraining.probe_totals(self.config, self.mesh)
    variables = state.student_variables()
    for local in eval_batches:
      totals = self.probe_step(variables, parallel.shard_batch(self.mesh, local), totals)
    sums, counts = parallel.to_host(totals)
    probe = contrastive_pretraining.embedding_probe(sums, counts)
    writer.write_scalars(done, {f'eval/{k}': v for k, v in probe.items()})
    console.probe(done, probe['within_class_cosine'], probe['between_class_cosine'])


def _train_stage(stage: stages.Stage, run_dir: epath.Path, workdir: epath.Path, builder,
                 mesh, preempt) -> state_lib.TrainState:
  """Trains (or pretrains) one stage in `workdir`; resumes from workdir/checkpoints.

  preempt: the run's `preemption.Preemption`; on a notice the stage saves the step it is at
  and raises `preemption.Preempted`.
  """
  config = stage.config
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
  class_names = base.class_names(builder)
  model, method = stage_model(stage)
  _, train_key = jax.random.split(jax.random.key(config.seed))
  pretraining = stage.kind == stages.PRETRAIN

  checkpoint_dir = workdir / workdir_lib.CHECKPOINTS
  # The latest states, and the one with the best eval mIoU whatever its age.
  manager, best_manager = workdir_lib.checkpoint_managers(workdir, config.keep_checkpoints)
  total = config.num_train_steps
  parts = list(method.LOSS_PARTS) + ['reco_loss'] * bool(config.reco and not pretraining)
  console = console_lib.Console(total, parts, enabled=jax.process_index() == 0)
  start = manager.latest_step() or 0
  if start:
    init_key, _ = jax.random.split(jax.random.key(config.seed))
    state = state_lib.create_train_state(config, model, init_key,
                                         (*tuple(config.crop_size), 3), mesh=mesh,
                                         initial_weights=False)
    state, start = workdir_lib.restore_latest(manager, workdir_lib.abstract(state),
                                              console.say)
    if int(parallel.to_host(state.step)) != start:
      raise ValueError(f'Checkpoint {start} in {checkpoint_dir} holds step '
                       f'{int(parallel.to_host(state.step))}; the directory is inconsistent.')
    best_step = best_manager.best_step()
    if best_step is not None:
      console.best = (float(best_manager.metrics(best_step)[workdir_lib.BEST_METRIC]), best_step)
    if start >= total:
      console.say(f'The run in {workdir} is complete (step {start}); nothing to do.')
      manager.close()
      best_manager.close()
      return state
    console.say(f'Resuming from the checkpoint of step {start} in {checkpoint_dir}.')
  else:
    state = initial_state(stage, run_dir, model, mesh)

  pseudo = pseudo_labels.read(run_dir / stage.pseudo_labels) if stage.pseudo_labels else None
  labelled, unlabelled, labelled_ids = _train_iterators(
      config, builder, start, method=method, pseudo=pseudo)
  _write_run_files(config, workdir, labelled_ids)
  eval_batches = _eval_iterator(config, builder)

  train_step = steps.make_train_step(config, model, mesh, method=method)
  evaluate_fn = (_ProbeEval(config, model, mesh) if pretraining else
                 _SegmentationEval(config, model, mesh, builder, class_names))

  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)
  if start == 0:
    writer.write_hparams(_flatten(config.to_dict()))
  report = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps,
                                           writer=writer)
  images_per_step = sum(_branch_sizes(config, method.BRANCHES))
  batches = _global_batches(mesh, labelled, unlabelled)

  last_saved = start
  pending = []  # (step, device metrics) not yet checked on the host.
  window = []  # (step, host metrics) checked and not yet logged.
  window_start = time.time()
  try:
    for step in range(start, total):
      done = step + 1
      with jax.profiler.StepTraceAnnotation('train', step_num=done):
        batch = next(batches)
        # The step folds state.step into the key itself: same key here at every step.
        state, metrics = train_step(state, batch, train_key)
      pending.append((done, metrics))
      report(done)

      log = done % config.log_every_steps == 0 or done == total
      evaluate_now = done % config.eval_every_steps == 0 or done == total
      save = done % config.checkpoint_every_steps == 0 or done == total
      # A notice at the last step lets the stage end as usual (its checkpoint is saved).
      stop = preempt.stop_at(done, sync=log or evaluate_now or save) and done < total
      save = save or stop
      if log or evaluate_now or save:
        # Fetching the metrics syncs with the devices; done only at these steps so that
        # dispatch runs ahead otherwise. A NaN state is never saved: it is caught here first.
        records = [(s, parallel.to_host(m)) for s, m in pending]
        pending = []
        _check_finite(records, last_saved, checkpoint_dir)
        window.extend(records)
        # A finite loss can still come with overflowing parameters: never save or keep those.
        if (evaluate_now or save) and not bool(
            parallel.to_host(_all_finite((state.params, state.ema_params)))):
          raise _diverged(done, 'non-finite parameters', last_saved, checkpoint_dir)
      if log:
        elapsed = time.time() - window_start
        scalars = {f'train/{k}': float(np.mean([m[k] for _, m in window]))
                   for k in window[-1][1]}
        scalars['train/images_per_second'] = images_per_step * len(window) / elapsed
        writer.write_scalars(done, scalars)
        console.train(done, {k[len('train/'):]: v for k, v in scalars.items()},
                      len(window) / elapsed)
        window, window_start = [], time.time()
      if evaluate_now:
        with report.timed('eval'):
          miou = evaluate_fn(state, eval_batches, writer, console, done)
          # A run stopped between this save and the regular checkpoint below repeats this
          # evaluation when resumed; the state is the same, so the saved one stands.
          if miou is not None and done not in best_manager.all_steps():
            best_manager.save(done, args=ocp.args.StandardSave(state), metrics={
                workdir_lib.BEST_METRIC: miou if math.isfinite(miou) else -1.0})
      if save:
        manager.save(done, args=ocp.args.StandardSave(state))
        last_saved = done
      if log or evaluate_now:
        writer.flush()
      if stop:
        manager.wait_until_finished()
        raise preemption.Preempted(done, checkpoint_dir)
  finally:
    manager.wait_until_finished()
    best_manager.wait_until_finished()
    writer.flush()
    writer.close()
  if console.best is not None:
    console.say(f'Finished at step {total}: best eval mIoU {console.best[0]:.4f} at step '
                f'{console.best[1]}; checkpoints in {workdir}.')
    if not pretraining and (reference := toy.reference_line(config.dataset, config.labels,
                                                            config.num_train_steps)):
      console.say(reference)
  logging.info('Finished at step %d; parameter fingerprint of this process: %r', total,
               params_fingerprint(state.params))
  return state


def params_fingerprint(params) -> float:
  """Sum of |p| over this process's own replica of the parameters (float64).

  Computed on the host from local data without any collective, so comparing the value
  logged by each process checks that the replicas of a multi-host run agree.
  """
  leaves = jax.tree.leaves(parallel.to_host(params))
  return float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in leaves))

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
import dataclasses
import time
from collections.abc import Mapping
from typing import Any

from absl import logging
from clu import metric_writers
from clu import periodic_actions
from etils import epath
import jax
import ml_collections
import numpy as np

from reco_jax import checkpointer
from reco_jax import config_checks
from reco_jax import console as console_lib
from reco_jax import data as data_lib
from reco_jax import inputs
from reco_jax import methods
from reco_jax import parallel
from reco_jax import preemption
from reco_jax import pseudo_labels
from reco_jax import run_guard
from reco_jax import stage_eval
from reco_jax import stages
from reco_jax import state as state_lib
from reco_jax import steps
from reco_jax import workdir as workdir_lib
from reco_jax.data import base
from reco_jax.data import toy
from reco_jax.methods import contrastive_pretraining
from reco_jax.models import imagenet


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


# --------------------------------------------------------------------------- training


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
  network, _ = methods.stage_model(source)
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
  config_checks.validate_config(config)
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
  builder = data_lib.prepare_for_config(config)
  mesh = parallel.make_mesh()
  if len(plan) > 1 and jax.process_index() == 0:
    _write_config(config, workdir)
    stages.write_index(config, workdir)
  state = None
  for number, stage in enumerate(plan, start=1):
    where = workdir / stage.folder if stage.folder else workdir
    if len(plan) > 1:
      console.say(f'Stage {number}/{len(plan)}: {stages.describe(stage)} in {where}.')
    if stage.kind == stages.PSEUDO_LABELS:
      pseudo_labels.write_stage(stage, workdir, where, builder, mesh, console)
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


class _TrainLog:
  """The train metrics of each log interval, averaged, to TensorBoard and the console."""

  def __init__(self, writer, console, images_per_step: int):
    self.writer, self.console, self.images_per_step = writer, console, images_per_step
    self.window, self.start = [], time.time()  # (step, host metrics) not yet logged.

  def add(self, records) -> None:
    self.window.extend(records)

  def write(self, step: int) -> None:
    elapsed = time.time() - self.start
    scalars = {f'train/{k}': float(np.mean([m[k] for _, m in self.window]))
               for k in self.window[-1][1]}
    scalars['train/images_per_second'] = self.images_per_step * len(self.window) / elapsed
    self.writer.write_scalars(step, scalars)
    self.console.train(step, {k[len('train/'):]: v for k, v in scalars.items()},
                       len(self.window) / elapsed)
    self.window, self.start = [], time.time()


def _train_stage(stage: stages.Stage, run_dir: epath.Path, workdir: epath.Path, builder,
                 mesh, preempt) -> state_lib.TrainState:
  """Trains (or pretrains) one stage in `workdir`; resumes from workdir/checkpoints.

  preempt: the run's `preemption.Preemption`; on a notice the stage saves the step it is at
  and raises `preemption.Preempted`.
  """
  config = stage.config
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
  model, method = methods.stage_model(stage)
  pretraining = stage.kind == stages.PRETRAIN
  total = config.num_train_steps
  parts = list(method.loss_parts) + ['reco_loss'] * bool(config.reco and not pretraining)
  console = console_lib.Console(total, parts, enabled=jax.process_index() == 0)
  checkpoints = checkpointer.Checkpointer(workdir, config.keep_checkpoints)
  state, start = checkpoints.restore(config, model, mesh, console)
  if start >= total:
    console.say(f'The run in {workdir} is complete (step {start}); nothing to do.')
    checkpoints.close()
    return state
  if start:
    console.say(f'Resuming from the checkpoint of step {start} in {checkpoints.directory}.')
  else:
    state = initial_state(stage, run_dir, model, mesh)

  pseudo = pseudo_labels.read(run_dir / stage.pseudo_labels) if stage.pseudo_labels else None
  labelled, unlabelled, labelled_ids = inputs.train_streams(
      config, builder, start, method=method, pseudo=pseudo)
  _write_run_files(config, workdir, labelled_ids)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)
  if start == 0:
    writer.write_hparams(_flatten(config.to_dict()))
  loop = _Loop(
      config=config, console=console, checkpoints=checkpoints, writer=writer, preempt=preempt,
      train_step=steps.make_train_step(config, model, mesh, method=method),
      evaluate=(stage_eval.ProbeEval(config, model, mesh) if pretraining else
                stage_eval.SegmentationEval(config, model, mesh, base.class_names(builder))),
      eval_batches=inputs.eval_stream(config, builder),
      log=_TrainLog(writer, console, sum(inputs.branch_sizes(config, method.branches))))
  try:
    state = loop.run(state, inputs.global_batches(mesh, labelled, unlabelled), start)
  finally:
    checkpoints.wait()
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


@dataclasses.dataclass
class _Loop:
  """The steps of a stage and their three cadences: log, evaluate (and keep the best) and save.

  Device metrics are fetched, and checked for divergence, only at those steps, so that
  dispatch runs ahead otherwise.
  """
  config: ml_collections.ConfigDict
  console: console_lib.Console
  checkpoints: checkpointer.Checkpointer
  writer: Any
  preempt: preemption.Preemption
  train_step: Any
  evaluate: Any
  eval_batches: Any
  log: _TrainLog

  def run(self, state, batches, start: int):
    config, total = self.config, self.config.num_train_steps
    _, train_key = jax.random.split(jax.random.key(config.seed))
    report = periodic_actions.ReportProgress(num_train_steps=total, writer=self.writer)
    pending = []  # (step, device metrics) not yet checked on the host.
    for step in range(start, total):
      done = step + 1
      with jax.profiler.StepTraceAnnotation('train', step_num=done):
        # The step folds state.step into the key itself: same key here at every step.
        state, metrics = self.train_step(state, next(batches), train_key)
      pending.append((done, metrics))
      report(done)
      log = done % config.log_every_steps == 0 or done == total
      evaluate = done % config.eval_every_steps == 0 or done == total
      save = done % config.checkpoint_every_steps == 0 or done == total
      # A notice at the last step lets the stage end as usual (its checkpoint is saved).
      stop = self.preempt.stop_at(done, sync=log or evaluate or save) and done < total
      save = save or stop
      if log or evaluate or save:
        # A NaN state is never saved: it is caught here first.
        records = [(s, parallel.to_host(m)) for s, m in pending]
        pending = []
        self.checkpoints.check_metrics(records)
        self.log.add(records)
        if evaluate or save:
          self.checkpoints.check_parameters(done, state)
      if log:
        self.log.write(done)
      if evaluate:
        with report.timed('eval'):
          miou = self.evaluate(state, self.eval_batches, self.writer, self.console, done)
          if miou is not None:
            self.checkpoints.save_best(done, state, miou)
      if save:
        self.checkpoints.save(done, state)
      if log or evaluate:
        self.writer.flush()
      if stop:
        self.checkpoints.latest.wait_until_finished()
        raise preemption.Preempted(done, self.checkpoints.directory)
    return state


def params_fingerprint(params) -> float:
  """Sum of |p| over this process's own replica of the parameters (float64).

  Computed on the host from local data without any collective, so comparing the value
  logged by each process checks that the replicas of a multi-host run agree.
  """
  leaves = jax.tree.leaves(parallel.to_host(params))
  return float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in leaves))

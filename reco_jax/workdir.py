"""What a training workdir holds, read back: its config, checkpoint managers and states.

`reco_jax.train` writes, and the tools (`reco_jax.evaluate`, `predict`, `relations`,
`results`) read:

  WORKDIR/config.json          the resolved config (ConfigDict.to_json_best_effort)
  WORKDIR/checkpoints/STEP     the latest train states (orbax, ocp.args.StandardSave)
  WORKDIR/checkpoints_best/S   the state with the best eval mIoU
  WORKDIR/events.out.tfevents.*  TensorBoard scalars (CLU metric writers)

The managers are built here with the trainer's options so that both sides agree on them.
"""
from collections.abc import Sequence
import dataclasses
import json
import logging
import os
import sys
from typing import Any

from etils import epath
import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp

from reco_jax import names
from reco_jax import stages
from reco_jax import state as state_lib
from reco_jax.models import deeplab

CONFIG_FILE = 'config.json'
CHECKPOINTS = 'checkpoints'
BEST_CHECKPOINTS = 'checkpoints_best'
BEST_METRIC = names.MIOU_TAG
# The evaluation split is the first of these the dataset has (as in reco_jax.train).


def _train_hint(workdir) -> str:
  return (f'Train into it first (python -m reco_jax.main --config=configs/... '
          f'--workdir={workdir}), or pass the --workdir of a finished run.')


def read_config(workdir: str | epath.Path) -> ml_collections.ConfigDict:
  """The config a run wrote to WORKDIR/config.json, as a ConfigDict (nested dicts included).

  JSON has no tuples, so pairs such as crop_size come back as lists; every consumer takes
  them through tuple(...).

  Raises:
    FileNotFoundError: no config.json in `workdir`, naming what was expected.
    ValueError: config.json is not a JSON object.
  """
  workdir = epath.Path(workdir)
  path = workdir / CONFIG_FILE
  if not path.exists():
    what = 'does not exist' if not workdir.exists() else f'has no {CONFIG_FILE}'
    raise FileNotFoundError(
        f'{workdir} {what}: expected a training workdir holding {CONFIG_FILE} (written by '
        f'reco_jax.train) and checkpoints under {CHECKPOINTS}/. {_train_hint(workdir)}')
  try:
    values = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON ({e}); it should be the config written by '
                     'reco_jax.train.') from e
  if not isinstance(values, dict):
    raise ValueError(f'{path} holds a {type(values).__name__}, expected a JSON object (the '
                     'config written by reco_jax.train).')
  return ml_collections.ConfigDict(values)


def best_manager_options() -> ocp.CheckpointManagerOptions:
  """Options of the best-checkpoint manager: one state, the one with the highest eval mIoU.

  Its directory is not created up front: it appears with the first save. On several hosts
  the two managers' barriers need distinct names, or the finalisation of one manager's save
  can meet the other's barrier and both wait until they time out.
  """
  return ocp.CheckpointManagerOptions(
      max_to_keep=1, best_fn=lambda metrics: metrics[BEST_METRIC], best_mode='max',
      create=False, multiprocessing_options=ocp.options.MultiprocessingOptions(
          barrier_sync_key_prefix='best'))


def checkpoint_managers(workdir: str | epath.Path, keep: int
                        ) -> tuple[ocp.CheckpointManager, ocp.CheckpointManager]:
  """(latest, best) managers for training into `workdir`, as reco_jax.train creates them.

  keep: how many of the latest checkpoints to keep (config.keep_checkpoints). Save to the
  best manager with metrics={BEST_METRIC: miou}; its directory appears with its first save, so
  a run that never evaluates (a pretraining stage) has none.
  """
  workdir = epath.Path(workdir)
  latest = ocp.CheckpointManager(workdir / CHECKPOINTS, options=ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True))
  best = ocp.CheckpointManager(workdir / BEST_CHECKPOINTS, options=best_manager_options())
  return latest, best


def checkpoint_steps(directory: epath.Path, best: bool) -> tuple[list[int], int | None]:
  """(all steps, best or latest step) of the checkpoints in `directory` (read only)."""
  if not directory.exists():
    return [], None
  options = (best_manager_options() if best else
             ocp.CheckpointManagerOptions(create=False))
  with ocp.CheckpointManager(directory, options=options) as manager:
    steps = list(manager.all_steps())
    if not steps:
      return [], None
    # A best directory whose metrics cannot be read still has one step: its latest.
    chosen = (manager.best_step() if best else None) or manager.latest_step()
  return sorted(steps), chosen


def find_checkpoint(workdir: str | epath.Path, checkpoint: str | int = 'best'
                    ) -> tuple[epath.Path, int]:
  """(checkpoint directory, step) that `checkpoint` names in `workdir`.

  checkpoint: 'best' (checkpoints_best; the latest checkpoint when the run never evaluated),
    'latest' (checkpoints, the newest step) or a step number (an int or its digits), looked
    up in checkpoints/ first, then in checkpoints_best/.

  Raises:
    FileNotFoundError: the workdir has no checkpoints at all.
    ValueError: `checkpoint` is neither 'best', 'latest' nor a saved step (the message lists
      the saved steps).
  """
  workdir = epath.Path(workdir)
  latest_dir, best_dir = workdir / CHECKPOINTS, workdir / BEST_CHECKPOINTS
  latest_steps, latest = checkpoint_steps(latest_dir, best=False)
  best_steps, best = checkpoint_steps(best_dir, best=True)
  if latest is None and best is None:
    raise FileNotFoundError(
        f'{workdir} has no checkpoints: expected orbax checkpoints under {latest_dir} or '
        f'{best_dir} (reco_jax.train saves them every config.checkpoint_every_steps). '
        f'{_train_hint(workdir)}')
  saved = (f'saved steps: {latest_steps} in {CHECKPOINTS}/, {best_steps} in '
           f'{BEST_CHECKPOINTS}/')
  text = str(checkpoint).strip().lower()
  if text == 'best':
    return (best_dir, best) if best is not None else (latest_dir, latest)
  if text == 'latest':
    return (latest_dir, latest) if latest is not None else (best_dir, best)
  if not text.isdigit():
    raise ValueError(f'Unknown checkpoint {checkpoint!r}: expected best, latest or a step '
                     f'number ({saved}).')
  step = int(text)
  if step in latest_steps:
    return latest_dir, step
  if step in best_steps:
    return best_dir, step
  raise ValueError(f'{workdir} has no checkpoint of step {step}; {saved}. Pass one of them, '
                   'best or latest.')


@dataclasses.dataclass
class Run:
  """A trained run loaded back: its config, model, restored train state and checkpoint step."""
  workdir: epath.Path
  config: ml_collections.ConfigDict
  model: nn.Module
  state: state_lib.TrainState
  step: int
  checkpoint_dir: epath.Path

  def eval_variables(self) -> dict[str, Any]:
    """The evaluated variables, as in training (the teacher for semi-supervised runs)."""
    from reco_jax import steps  # The training steps only where they are needed.
    return steps.eval_variables(self.config, self.state)


def restore_state(config: ml_collections.ConfigDict, model: nn.Module,
                  directory: str | epath.Path, step: int,
                  mesh: jax.sharding.Mesh | None = None) -> state_lib.TrainState:
  """The train state of `step` from the orbax checkpoints in `directory`.

  Restores into the structure of the trainer's state (`state.abstract_train_state` with the
  config's model and crop size), so every leaf comes back with the trainer's shape, dtype and
  (replicated on `mesh`) sharding. config.init_weights is not read: the checkpoint replaces
  whatever the initialisation would load.
  """
  target = state_lib.abstract_train_state(config, model, (*tuple(config.crop_size), 3), mesh)
  options = ocp.CheckpointManagerOptions(create=False)
  _quiet_abandoned_reads()
  with ocp.CheckpointManager(epath.Path(directory), options=options) as manager:
    try:
      return manager.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as e:  # pylint: disable=broad-except  (Orbax raises many kinds)
      raise ValueError(f'The checkpoint of step {step} in {directory} cannot be restored: '
                       f'{short_cause(e)}.') from None


FAILED_CHECKPOINTS = 'checkpoints_failed'


def short_cause(error: BaseException) -> str:
  """The first line of an error's message, with its type, cut at a word to about 200
  characters (TensorStore's pointer to its 'full details', a method's repr, dropped)."""
  first = (str(error).strip().splitlines() or [''])[0].split(' See full TensorStore details')[0]
  if len(first) > 200:
    first = first[:200].rsplit(' ', 1)[0] + ' [...]'
  return f'{type(error).__name__}: {first}' if first else type(error).__name__


def _quiet_abandoned_reads() -> None:
  """Silences, from a first restore on, the reads that a failed Orbax restore leaves behind.

  When one array of a checkpoint cannot be read, the restore raises while TensorStore still
  reads the others. Each of those reads then completes into Orbax's closed event loop, is
  collected unawaited, or ends with an error nobody retrieves, and Python would print a
  traceback for each one (`sys.unraisablehook`, or asyncio's logger): dozens to hundreds around
  the one-line report, some before the restore has even raised. Every other unraisable error
  and asyncio log record is printed as before.
  """
  previous = sys.unraisablehook
  if getattr(previous, 'quiets_abandoned_reads', False):
    return

  def hook(unraisable):
    value, obj = unraisable.exc_value, unraisable.object
    if ((isinstance(value, RuntimeError) and str(value) == 'Event loop is closed')
        or getattr(obj, '__name__', '') == '_read_array_index_and_device_put'):
      return
    previous(unraisable)

  hook.quiets_abandoned_reads = True
  sys.unraisablehook = hook
  logging.getLogger('asyncio').addFilter(_abandoned_read_record)


def _abandoned_read_record(record: logging.LogRecord) -> bool:
  """False (drop) for asyncio's report of a checkpoint read's error that nobody retrieved."""
  message = record.getMessage()  # 'Future exception was never retrieved\nfuture: <...>'
  return not (message.split('\n', 1)[0].endswith('exception was never retrieved')
              and 'tensorstore_spec' in message)


def restore_latest(manager: ocp.CheckpointManager, target, say) -> tuple[Any, int]:
  """(state, step) of the newest checkpoint of `manager` that restores into `target`.

  One that fails is reported on one line (step, path, cause) through `say` and moved aside to
  WORKDIR/checkpoints_failed/STEP, never deleted; the next newest is tried. Raises ValueError
  when none restores.
  """
  directory = epath.Path(manager.directory)
  _quiet_abandoned_reads()
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return manager.restore(step, args=ocp.args.StandardRestore(target)), step
    except Exception as e:  # pylint: disable=broad-except  (Orbax raises many kinds)
      aside = directory.parent / FAILED_CHECKPOINTS / str(step)
      if jax.process_index() == 0:
        aside.parent.mkdir(parents=True, exist_ok=True)
        if aside.exists():
          aside = aside.with_name(f'{step}.{len(list(aside.parent.iterdir()))}')
        (directory / str(step)).rename(aside)
      say(f'The checkpoint of step {step} in {directory} cannot be restored '
          f'({short_cause(e)}); moved to {aside}, trying the one before it.')
      multihost_barrier(f'checkpoint_failed_{step}')
      manager.reload()
  raise ValueError(f'No checkpoint in {directory} can be restored (the failed ones are in '
                   f'{directory.parent / FAILED_CHECKPOINTS}); use a new --workdir to start '
                   'again.')


def multihost_barrier(name: str) -> None:
  """Waits for every process (a no-op on one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def load_run(workdir: str | epath.Path, checkpoint: str | int = 'best',
             mesh: jax.sharding.Mesh | None = None,
             overrides: dict[str, Any] | None = None) -> Run:
  """Config, model and the state of `checkpoint` (see find_checkpoint) of a training workdir.

  overrides: config fields to replace before anything is built (e.g. {'data_dir': ...} when
  the dataset moved); unknown fields are an error.
  """
  workdir = stages.final_stage_dir(workdir)  # A run of several stages: its final model.
  config = read_config(workdir)
  for key, value in (overrides or {}).items():
    if key not in config:
      raise ValueError(f'Cannot override config.{key}: {workdir / CONFIG_FILE} has no such '
                       f'field (fields: {", ".join(sorted(config))}).')
    config[key] = value
  directory, step = find_checkpoint(workdir, checkpoint)
  model = deeplab.model_from_config(config)
  state = restore_state(config, model, directory, step, mesh=mesh)
  return Run(workdir, config, model, state, step, directory)


def check_batch(batch_size: int, flag: str = '--eval_batch_size') -> int:
  """`batch_size`, or a clear error when it does not split over this machine's devices."""
  devices = jax.device_count()
  if batch_size <= 0 or batch_size % devices:
    raise ValueError(f'The batch size {batch_size} must be a positive multiple of the '
                     f'{devices} devices here; pass {flag}=N with N a multiple of {devices}.')
  return batch_size


def expand_paths(patterns: Sequence[str]) -> list[epath.Path]:
  """Paths matching shell-style globs (a pattern without wildcards is taken as it is)."""
  out = []
  for pattern in patterns:
    if any(c in pattern for c in '*?['):
      out.extend(sorted(epath.Path(p) for p in _glob(pattern)))
    else:
      out.append(epath.Path(pattern))
  return out


def _glob(pattern: str) -> list[str]:
  import tensorflow as tf  # gfile globs local and gs:// paths alike.
  return tf.io.gfile.glob(pattern)


def check_output_file(path: str | epath.Path, flag: str) -> epath.Path:
  """A tool's output file: not a directory, and inside a directory it can write in (created
  if missing).

  Checked before anything costly runs, so a bad destination fails first. flag: the
  command-line flag that named it, for the message.
  """
  path = epath.Path(path)
  if path.is_dir():
    raise ValueError(f'{flag}={path} is a directory; give a file name inside it, e.g. '
                     f'{flag}={path / "results.md"}.')
  _writable_directory(path.parent, f'{flag}={path}')
  return path


def check_output_dir(path: str | epath.Path, flag: str) -> epath.Path:
  """A tool's output directory: created if missing, an error if a file is in its place or it
  cannot be written in."""
  path = epath.Path(path)
  if path.exists() and not path.is_dir():
    raise ValueError(f'{flag}={path} is a file, not a directory; give a directory for the '
                     'outputs (it is created if missing).')
  _writable_directory(path, f'{flag}={path}')
  return path


def _writable_directory(directory: epath.Path, given: str) -> None:
  """Creates `directory` if missing and writes and removes a file in it, or raises ValueError
  naming `given` (the flag as the user wrote it)."""
  for parent in (directory, *directory.parents):
    if parent.exists():
      if not parent.is_dir():
        raise ValueError(f'{given}: {parent} is a file, not a directory; choose another path.')
      break
  probe = directory / f'.reco_jax_write_check_{os.getpid()}'
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe.write_text('')
    probe.unlink()
  except OSError as e:
    raise ValueError(f'{given}: cannot write in {directory} ({short_cause(e)}); choose another '
                     'path.') from None


def user_errors(main_fn):
  """Wraps a tool's main: `setup_tool` first; the expected errors (bad input) end it with
  their message only.

  FileNotFoundError, PermissionError and ValueError carry what was expected (or the path
  refused) and how to fix it; a traceback would bury that.
  """
  import functools  # pylint: disable=g-import-not-at-top

  @functools.wraps(main_fn)
  def wrapped(argv):
    from absl import flags  # pylint: disable=g-import-not-at-top
    setup_tool(flags.FLAGS['verbosity'].present)
    try:
      return main_fn(argv)
    except (FileNotFoundError, PermissionError, ValueError) as e:
      print(f'{sys.argv[0].split("/")[-1]}: error: {e}', file=sys.stderr)
      sys.exit(2)
  return wrapped


def setup_tool(verbosity_flag_given: bool = False) -> None:
  """Common start of the tools' `main`: library chatter at WARNING, TensorFlow off the GPUs.

  verbosity_flag_given: the user passed --verbosity (or -v); then absl's level is theirs.
  TensorFlow only reads data here, so it must not take accelerator memory from JAX.
  """
  from absl import logging  # pylint: disable=g-import-not-at-top
  from reco_jax import console  # pylint: disable=g-import-not-at-top
  if not verbosity_flag_given:
    logging.set_verbosity(logging.WARNING)
  tf = console.import_tensorflow(quiet=not verbosity_flag_given)
  tf.get_logger().setLevel('ERROR')  # Deprecation notices of the TF1 event reader.
  try:
    tf.config.set_visible_devices([], 'GPU')
    tf.config.set_visible_devices([], 'TPU')
  except RuntimeError:  # TensorFlow already initialised its devices (a tool called in-process).
    pass

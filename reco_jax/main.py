"""Entry point: `python -m reco_jax.main --config=configs/voc.py:labels=200 --workdir=DIR`.

Config values can be overridden with `--config.name=value` (e.g. `--config.num_train_steps=100`).
Multi-host runs call `jax.distributed.initialize` first: with `--distributed` (Cloud TPU pods,
SLURM and other clusters JAX detects itself) or with an explicit `--coordinator_address`,
`--num_processes` and `--process_id`.

The console shows one line per log interval and per evaluation; library logs are kept at
WARNING unless `--verbosity` is given (`--verbosity=0` for INFO, 1 for debug).
"""
from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from reco_jax import console
from reco_jax.models import imagenet

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config file, e.g. configs/voc.py:labels=200.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory (local or gs://) for checkpoints, '
                               'TensorBoard events, config.json and labelled_ids.txt.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() with cluster auto-detection.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, for a multi-process run without '
    'cluster auto-detection.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Index of this process.')

flags.mark_flags_as_required(['config', 'workdir'])
# The exit status of a run stopped by a preemption notice (SIGTERM), as a shell reports a
# process ended by SIGTERM: 128 + 15.
PREEMPTED_EXIT_CODE = 143


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}.')
  quiet = not flags.FLAGS['verbosity'].present
  if quiet:
    logging.set_verbosity(logging.WARNING)
  # TensorFlow only feeds data: it must not take accelerator memory from JAX.
  tf = console.import_tensorflow(quiet)
  tf.config.set_visible_devices([], 'GPU')
  tf.config.set_visible_devices([], 'TPU')

  if _COORDINATOR.value is not None:
    if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
      raise app.UsageError('--coordinator_address needs --num_processes and --process_id.')
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()
  logging.info('JAX process %d of %d, %d local / %d global devices (%s).',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)

  from reco_jax import preemption  # pylint: disable=g-import-not-at-top
  from reco_jax import train  # pylint: disable=g-import-not-at-top
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (imagenet.DownloadError, imagenet.ChecksumError, ValueError) as e:
    # The message says what to do; the stack's traceback would bury it.
    raise SystemExit(f'Error: {e}') from None
  except preemption.Preempted as e:
    print(e, flush=True)
    raise SystemExit(PREEMPTED_EXIT_CODE) from None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with two errors of the config flag on one line each instead of a
  traceback: an error a config file raises on purpose (a ValueError or TypeError naming what
  to fix, e.g. an own-data folder's lists), and an override of a field the config lacks."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    error, wrapped = e.__cause__ or e.__context__, False
    while error is not None and str(error).startswith('Error whilst parsing config file'):
      error, wrapped = error.__cause__ or error.__context__, True  # ml_collections' wrapper
    if wrapped and isinstance(error, (TypeError, ValueError)):
      raise SystemExit(f'Error: {error}') from None
    # absl's own words (parsing again through absl would define the override flags twice).
    raise SystemExit(f'FATAL Flags parsing error: {e}\n'
                     'Pass --helpshort or --helpfull to see help on flags.') from None
  except AttributeError as e:  # ConfigDict's own error for --config.NAME of no field NAME.
    name = str(e).strip('"\'')
    given = [arg.split('=', 1)[0] for arg in argv[1:]
             if arg.startswith('--config.') and name in arg.split('=', 1)[0].split('.')]
    if not given:
      raise
    raise SystemExit(f'Error: {given[0]}: the config has no field {name!r}; an override '
                     '--config.NAME=VALUE must name one of its fields (see the config file '
                     'and reco_jax/defaults.py).') from None


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)

"""One run per workdir: the config a workdir was made with, and a lock against a second trainer.

A workdir resumes the run it holds and no other. On start the trainer compares the config
with the workdir's `config.json`: the fields that change the run (data, labels, split, method,
model, seed, schedule, losses, ...) must match, and a difference is an error listing each
field with both values; only the fields in `MAY_CHANGE` (logging and checkpoint cadence,
evaluation batch, data paths, ...) may differ on resume. Nothing in the workdir is written
before this check passes.

The lock is an advisory `flock` on `WORKDIR/.lock`, held by process 0 while it trains: a
second trainer on the same workdir is refused, and a killed one leaves nothing stuck (the
operating system drops the lock with the process). Workdirs on object stores (gs://) are not
locked.
"""
from collections.abc import Iterator, Mapping
import contextlib
import json
import os
from typing import Any

from etils import epath
import jax
import ml_collections

from reco_jax import defaults
from reco_jax import workdir as workdir_lib

LOCK_FILE = '.lock'
# Fields that may differ when a run resumes: they change how it is watched, saved or fed,
# not what it computes.
MAY_CHANGE = frozenset({
    'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
    'eval_batch_size', 'num_image_summaries', 'data_dir', 'manual_dir', 'recompute_labelled',
})


def flatten(values: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a.b': value} of nested mappings (lists kept as lists)."""
  flat = {}
  for key, value in values.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def differences(saved: Mapping[str, Any], config: Mapping[str, Any]
                ) -> list[tuple[str, Any, Any]]:
  """(field, saved value, new value) of the fields outside MAY_CHANGE that differ.

  A field the saved config lacks (written before the field existed) matches its default,
  which is what that run computed with.
  """
  old, new = flatten(saved), flatten(config)
  default = flatten(json.loads(defaults.base_config().to_json_best_effort()))
  missing = object()
  pairs = ((k, old.get(k, default.get(k, missing)), new.get(k, missing))
           for k in sorted(set(old) | set(new)) if k.split('.')[0] not in MAY_CHANGE)
  return [(k, a, b) for k, a, b in pairs if a != b]


def check_same_run(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Raises ValueError if `workdir` holds a run of another config (see the module doc)."""
  path = epath.Path(workdir) / workdir_lib.CONFIG_FILE
  if not path.exists():
    return
  try:
    saved = json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(f'{path} is not valid JSON ({e}); the workdir holds something else than '
                     'a run. Use a new --workdir.') from None
  new = json.loads(config.to_json_best_effort())
  diff = differences(saved, new)
  if diff:
    shown = lambda v: '(absent)' if not isinstance(v, (str, int, float, bool, list, type(None))
                                                   ) else json.dumps(v)
    rows = '\n'.join(f'  {k}: {shown(a)} in the workdir, {shown(b)} now' for k, a, b in diff)
    raise ValueError(f'{workdir} holds a run of another config ({path}); a workdir holds one '
                     f'run, and these fields would change it:\n{rows}\nUse a new --workdir '
                     f'for this config (or the command that made {workdir} to resume it).')


@contextlib.contextmanager
def workdir_lock(workdir: epath.Path) -> Iterator[None]:
  """Holds WORKDIR/.lock (process 0, local workdirs) while the block runs; a ValueError if
  another process holds it."""
  if jax.process_index() != 0 or '://' in str(workdir):
    yield
    return
  import fcntl  # pylint: disable=g-import-not-at-top  (POSIX only)
  path = os.path.join(os.fspath(workdir), LOCK_FILE)
  with open(path, 'a+', encoding='utf-8') as f:
    try:
      fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or 'another process'
      raise ValueError(f'{workdir} is in use by a running trainer ({holder}); one run at a time '
                       'may train in a workdir. Wait for it to end, or use another '
                       '--workdir.') from None
    f.seek(0)
    f.truncate()
    f.write(f'process {os.getpid()} on {os.uname().nodename}\n')
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)

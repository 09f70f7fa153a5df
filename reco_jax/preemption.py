"""Preemption: a SIGTERM (a preempted TPU VM, a cluster scheduler) ends training at a checkpoint.

The trainer asks `Preemption.stop_at(step)` after every step. On one process a SIGTERM sets a
flag, and the step running when it came is the last: the trainer saves a checkpoint of it
and raises `Preempted`. On several processes all of them must save the same step: with
JAX's preemption service (started by `jax.distributed.initialize`; on Cloud TPU it delivers
the notice to every host) they agree through `multihost_utils.reached_preemption_sync_point`,
called at every step; without it, each process's flag is shared at the steps where the
processes synchronise anyway (`sync=True`: logging, evaluation, checkpoints), so a notice waits
at most one logging interval.
"""
import signal

import jax
from jax.experimental import multihost_utils
import numpy as np


class Preempted(Exception):
  """Training stopped on a preemption notice after saving the checkpoint of `step`."""

  def __init__(self, step: int, checkpoint_dir):
    super().__init__(f'Preempted: stopped at step {step} after saving its checkpoint in '
                     f'{checkpoint_dir}; run the same command to resume from it.')
    self.step = step


class Preemption:
  """Watches for a preemption notice while training (a context manager: the SIGTERM handler
  is installed on entry and the previous one restored on exit)."""

  def __init__(self):
    self.signalled = False
    self._previous = None
    self._service = jax.process_count() > 1 and _has_sync_service()

  def __enter__(self) -> 'Preemption':
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: signals cannot be caught here.
      self._previous = None
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self.signalled = True

  def stop_at(self, step: int, sync: bool) -> bool:
    """Whether `step` (just trained) is the last before a preemption: save it and stop.

    sync: whether the processes synchronise at this step anyway.
    """
    if jax.process_count() == 1:
      return self.signalled
    if self._service:
      return multihost_utils.reached_preemption_sync_point(step)
    if not sync:
      return False
    flags = multihost_utils.process_allgather(np.asarray(self.signalled, np.int32))
    return bool(np.any(flags))


def _has_sync_service() -> bool:
  """Whether jax.distributed started its preemption sync manager."""
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return getattr(distributed.global_state, 'preemption_sync_manager', None) is not None

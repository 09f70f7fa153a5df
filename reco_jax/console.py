"""What a training run prints for people: one line per log interval and per evaluation.

Library logs stay at WARNING (see main.py); these lines are printed by process 0 only.
"""
import os
import sys
from typing import TextIO

_SHORT = {'sup_loss': 'sup', 'unsup_loss': 'unsup', 'reco_loss': 'reco', 'fp_loss': 'fp',
          'contrast_loss': 'contrast'}


def duration(seconds: float) -> str:
  """'1h02m', '5m07s' or '42s'."""
  seconds = max(int(round(seconds)), 0)
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f'{hours}h{minutes:02d}m'
  if minutes:
    return f'{minutes}m{secs:02d}s'
  return f'{secs}s'


class Console:
  """Progress lines of one run: `say`, `train` and `evaluation` print to `stream`.

  total: the run's number of steps; parts: the loss terms the method has (sup_loss,
  unsup_loss, reco_loss); enabled: False on every process but the first.
  """

  def __init__(self, total: int, parts=('sup_loss',), *, enabled: bool = True,
               stream: TextIO | None = None):
    self._total = total
    self._parts = tuple(parts)
    self._width = len(str(total))
    self._enabled = enabled
    self._stream = stream
    self.best: tuple[float, int] | None = None  # (mIoU, step)

  def say(self, text: str) -> None:
    if self._enabled:
      print(text, file=self._stream or sys.stdout, flush=True)

  def _step(self, step: int) -> str:
    return f'step {step:>{self._width}}/{self._total}'

  def train(self, step: int, scalars: dict[str, float], steps_per_second: float) -> None:
    """scalars: the interval's mean metrics (loss, sup_loss, ...), without a prefix."""
    parts = ', '.join(f'{_SHORT.get(name, name)} {scalars[name]:.4f}' for name in self._parts)
    eta = (self._total - step) / steps_per_second if steps_per_second > 0 else 0.0
    self.say(f'{self._step(step)}  loss {scalars["loss"]:.4f} ({parts})  '
             f'{steps_per_second:.2f} steps/s  ETA {duration(eta)}')

  def evaluation(self, step: int, miou: float) -> None:
    if self.best is None or miou > self.best[0]:
      self.best = (miou, step)
    self.say(f'{self._step(step)}  eval mIoU {miou:.4f}  '
             f'(best {self.best[0]:.4f} at step {self.best[1]})')

  def probe(self, step: int, within: float, between: float) -> None:
    """The embedding probe of a pretraining evaluation (mean pairwise cosine similarities)."""
    self.say(f'{self._step(step)}  eval embedding cosine: within-class {within:.3f}, '
             f'between-class {between:.3f} (gap {within - between:.3f})')


def import_tensorflow(quiet: bool):
  """TensorFlow (it only feeds data); with `quiet`, its C++ start-up lines are not printed.

  They are written to the process's stderr before TF reads any log setting, so the file
  descriptor itself is pointed at /dev/null for the import; Python errors still show.
  """
  if not quiet:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)
  return tf

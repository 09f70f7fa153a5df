"""A training stage's checkpoints: the latest ones, the best one, and the divergence guard.

The latest checkpoints (config.keep_checkpoints of them, every config.checkpoint_every_steps
steps) resume a run; the best one (by eval mIoU, whatever its age) is what the tools load by
default. A NaN or infinite loss, gradient or parameter is caught before either is written
(`reco_jax.divergence`).
"""
import math

from etils import epath
import ml_collections
import orbax.checkpoint as ocp

from reco_jax import divergence
from reco_jax import parallel
from reco_jax import state as state_lib
from reco_jax import workdir as workdir_lib


class Checkpointer:
  """A stage's checkpoints: the latest ones (config.keep_checkpoints) and the one with the best
  eval mIoU whatever its age, with the guard that keeps a diverged state out of both."""

  def __init__(self, workdir: epath.Path, keep: int):
    self.directory = workdir / workdir_lib.CHECKPOINTS
    self.latest, self.best = workdir_lib.checkpoint_managers(workdir, keep)
    self.last_saved = 0  # The step of the newest good checkpoint, named by divergence errors.

  def restore(self, config: ml_collections.ConfigDict, model, mesh, console
              ) -> tuple[state_lib.TrainState | None, int]:
    """(state, step) of the newest checkpoint that restores ((None, 0): none was saved)."""
    if not self.latest.latest_step():
      return None, 0
    like = state_lib.abstract_train_state(config, model, (*tuple(config.crop_size), 3), mesh)
    state, step = workdir_lib.restore_latest(self.latest, like, console.say)
    if int(parallel.to_host(state.step)) != step:
      raise ValueError(f'Checkpoint {step} in {self.directory} holds step '
                       f'{int(parallel.to_host(state.step))}; the directory is inconsistent.')
    if (best := self.best.best_step()) is not None:
      console.best = (float(self.best.metrics(best)[workdir_lib.BEST_METRIC]), best)
    self.last_saved = step
    return state, step

  def check_metrics(self, records) -> None:
    divergence.check_finite(records, self.last_saved, self.directory)

  def check_parameters(self, step: int, state) -> None:
    """A finite loss can still come with overflowing parameters: never save or keep those."""
    if not bool(parallel.to_host(divergence.all_finite((state.params, state.ema_params)))):
      raise divergence.diverged(step, 'non-finite parameters', self.last_saved, self.directory)

  def save_best(self, step: int, state, miou: float) -> None:
    # A run stopped between this save and the regular checkpoint repeats this evaluation when
    # resumed; the state is the same, so the saved one stands.
    if step not in self.best.all_steps():
      self.best.save(step, args=ocp.args.StandardSave(state), metrics={
          workdir_lib.BEST_METRIC: miou if math.isfinite(miou) else -1.0})

  def save(self, step: int, state) -> None:
    self.latest.save(step, args=ocp.args.StandardSave(state))
    self.last_saved = step

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()

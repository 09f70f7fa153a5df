"""The trainer's guard against divergence: a NaN or infinite loss, gradient or parameter stops
the run with an error naming the step and the last good checkpoint, before anything diverged is
saved."""
import jax
import jax.numpy as jnp
import numpy as np


class TrainingDivergedError(FloatingPointError):
  """A loss became NaN or infinite; no checkpoint of the diverged state was written."""


def diverged(step: int, what: str, last_saved: int, checkpoint_dir) -> 'TrainingDivergedError':
  """The error for a run that diverged at `step`, saying whether a good checkpoint is left."""
  saved = (f'the last good checkpoint (step {last_saved}) in {checkpoint_dir} is intact'
           if last_saved else 'no checkpoint was written')
  return TrainingDivergedError(
      f'Training diverged at step {step}: {what}; {saved}. Lower '
      'config.optimizer.learning_rate or check the input data, then run again.')


def check_finite(records, last_saved, checkpoint_dir):
  """Raises TrainingDivergedError naming the first step with a NaN/Inf loss or gradient."""
  for step, metrics in records:
    bad = [k for k, v in metrics.items() if not np.all(np.isfinite(v))]
    if bad:
      losses = {k: float(v) for k, v in metrics.items() if 'loss' in k}
      parts = ', '.join(f'{k}={v:.6g}' for k, v in sorted(losses.items()))
      raise diverged(step, f'non-finite {", ".join(sorted(bad))} ({parts})', last_saved,
                      checkpoint_dir)


@jax.jit
def all_finite(tree) -> jax.Array:
  """Whether every element of every leaf of `tree` is finite: bool [] on the devices."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))

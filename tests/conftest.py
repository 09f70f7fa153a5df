"""Shared test setup: several simulated CPU devices, set before any device use."""
import contextlib
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Unoptimised CPU code generation: the tests' programs are compiled far more than they are run.
# It leaves XLA's HLO passes, and so buffer assignment and memory analysis, as they are.
# Subprocesses (the entry point, two-process runs) inherit it.
os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''),
                                    '--xla_backend_optimization_level=0',
                                    '--xla_llvm_disable_expensive_passes=true']).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import tolerances  # noqa: E402

jax.config.update('jax_num_cpu_devices', 4)
jax.config.update('jax_threefry_partitionable', True)


def _record_tolerance_ratios():
  """With RECO_JAX_TOLERANCE_LOG set, numpy's and pytest's comparisons log their ratios too."""
  assert_allclose = np.testing.assert_allclose

  def recording_assert_allclose(actual, desired, rtol=1e-7, atol=0, equal_nan=True, **kw):
    if rtol or atol:
      try:
        tolerances.record(tolerances.ratio(actual, desired, rtol, atol))
      except (TypeError, ValueError):  # not numbers, or shapes that differ: numpy says so below
        pass
    return assert_allclose(actual, desired, rtol=rtol, atol=atol, equal_nan=equal_nan, **kw)

  approx_scalar = type(pytest.approx(1.0))
  approx_eq = approx_scalar.__eq__

  def recording_eq(self, actual):
    if isinstance(actual, (int, float)) and isinstance(self.expected, (int, float)):
      tolerance = self.tolerance
      if tolerance:
        tolerances.record(abs(actual - self.expected) / tolerance)
    return approx_eq(self, actual)

  np.testing.assert_allclose = recording_assert_allclose
  approx_scalar.__eq__ = recording_eq


if os.environ.get('RECO_JAX_TOLERANCE_LOG'):
  _record_tolerance_ratios()


@contextlib.contextmanager
def persistent_compilation_cache(directory, min_compile_secs: float):
  """A persistent XLA cache in `directory` while the context lasts, then none again.

  Runs of the same step in one test module then compile once.
  """
  from jax._src import compilation_cache as cc
  reset = getattr(cc, 'reset_cache', lambda: None)
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes')
  saved = {name: getattr(jax.config, name) for name in names}
  jax.config.update(names[0], str(directory))
  jax.config.update(names[1], min_compile_secs)
  jax.config.update(names[2], 0)
  reset()  # An earlier compile in this process may have initialised it disabled.
  try:
    yield
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)
    reset()


def sigterm_at_call(monkeypatch, call: int):
  """Makes the process receive a real SIGTERM during its `call`-th training step."""
  import signal  # pylint: disable=g-import-not-at-top
  from reco_jax import steps  # pylint: disable=g-import-not-at-top
  make_train_step = steps.make_train_step
  calls = []

  def make(*args, **kwargs):
    step_fn = make_train_step(*args, **kwargs)

    def step(state, batch, key):
      calls.append(1)
      if len(calls) == call:
        os.kill(os.getpid(), signal.SIGTERM)
      return step_fn(state, batch, key)
    return step

  monkeypatch.setattr(steps, 'make_train_step', make)

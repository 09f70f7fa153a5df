"""Shared test setup: several simulated CPU devices, set before any device use."""
import gc
import os
import pathlib

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# The tests' programs are compiled far more than they are run, so CPU code is generated cheaply:
# - unoptimised: XLA's HLO passes, and so buffer assignment and memory analysis, stay as they are;
# - by XLA's legacy CPU emitters, which compile a train step with about a third of the CPU
#   time of the fusion emitters that users run. They round some operations differently, so
#   the tests whose numbers must be those of users' programs compile with the fusion emitters
#   (`helpers.PRODUCTION_EMITTERS`): the golden steps, every step they share
#   (`helpers.compile_step`), and what tests compare with those steps to a few ulps.
# Subprocesses (the entry point, two-process runs) inherit the flags.
os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''),
                                    '--xla_backend_optimization_level=0',
                                    '--xla_llvm_disable_expensive_passes=true',
                                    '--xla_cpu_use_fusion_emitters=false']).strip()

import pytest  # noqa: E402


def pytest_configure(config):
  """In every process that runs tests: 4 simulated CPU devices (before any device use), the
  libraries and the suite's helpers loaded, and Python's collector set for them.

  The xdist controller runs no test and skips this: it would spend 4 s importing jax,
  TensorFlow and the package before it starts the workers.
  """
  if getattr(config.option, 'dist', 'no') != 'no' and not hasattr(config, 'workerinput'):
    return
  # pylint: disable=global-variable-undefined,import-outside-toplevel,redefined-outer-name
  global filelock, jax, jnp, np, tolerances, helpers, data_lib, parallel, train
  import filelock
  import jax
  import jax.numpy as jnp
  import numpy as np

  import tolerances

  jax.config.update('jax_num_cpu_devices', 4)
  jax.config.update('jax_threefry_partitionable', True)
  if os.environ.get('RECO_JAX_TOLERANCE_LOG'):
    _record_tolerance_ratios()

  import helpers  # after the device and XLA settings above
  from reco_jax import data as data_lib
  from reco_jax import parallel
  from reco_jax import train

  # Tracing allocates objects by the million, and each of Python's full collections walks
  # every object of the libraries loaded above, which live as long as the process: they leave
  # the collector's view, and it runs less often (6 % of the suite's CPU time).
  gc.freeze()
  gc.set_threshold(200_000, 50, 50)


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


def session_dir(tmp_path_factory, name: str) -> pathlib.Path:
  """A folder that every xdist worker of this session shares (each worker has its own basetemp
  beneath the session's)."""
  base = tmp_path_factory.getbasetemp()
  path = (base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base) / name
  path.mkdir(exist_ok=True)
  return path


# Under `-n auto`, tests that share work in a process are one unit, which one worker runs:
# the modules whose tests share a trained run, so that it is trained once (test_train and
# test_tools share the session's `toy_run`, test_pretraining trains its staged run); the
# modules whose tests compile the same train steps (`helpers.compile_step`: the golden configs),
# so that each compiles once. Every other test is a unit of its own. Units with the most tests
# go first.
SHARED_RUN_UNITS = {'test_train.py': 'the toy run', 'test_tools.py': 'the toy run',
                    'test_pretraining.py': 'the staged run'}
SHARED_STEP_MODULES = ('test_golden_steps.py', 'test_steps.py', 'test_parallel_equivalence.py',
                       'test_unimatch.py')

try:
  from xdist.scheduler import LoadScopeScheduling  # noqa: E402
except ImportError:  # the suite also runs without xdist, on one process
  LoadScopeScheduling = None

if LoadScopeScheduling is not None:

  class _SharedWorkScheduling(LoadScopeScheduling):

    def _split_scope(self, nodeid):
      module = nodeid.split('::', 1)[0]
      name = module.rsplit('/', 1)[-1]
      if name in SHARED_STEP_MODULES:
        # UniMatch's steps are shared by its golden cases and test_unimatch alone: a unit of
        # their own, which the other worker can take.
        unimatch = name == 'test_unimatch.py' or '[unimatch' in nodeid
        return 'shared train steps' + (': unimatch' if unimatch else '')
      return SHARED_RUN_UNITS.get(name, nodeid)

  def pytest_xdist_make_scheduler(config, log):
    return _SharedWorkScheduling(config, log)


@pytest.fixture(scope='session')
def toy_data_dir(tmp_path_factory):
  """TFDS dir holding the 48/12-image 'reco_toy/tiny' dataset, built once per session."""
  data_dir = session_dir(tmp_path_factory, 'toy_tfds')
  with filelock.FileLock(data_dir.with_suffix('.lock')):  # one worker builds, the others wait
    data_lib.prepare('reco_toy/tiny', str(data_dir))
  return str(data_dir)


@pytest.fixture(scope='session')
def jax_cache_dir(tmp_path_factory):
  """This worker's persistent XLA cache, shared by the modules that run the trainer."""
  return tmp_path_factory.mktemp('jax_cache')


@pytest.fixture(scope='module')
def trainer_compilations(jax_cache_dir):  # pylint: disable=redefined-outer-name
  """For a module's trainer runs: the worker's persistent XLA cache, and a rerun's model,
  optimiser and steps reused (`helpers.reused_trainer_compilations`); then neither."""
  with helpers.trainer_compilations(jax_cache_dir):
    yield


@pytest.fixture(scope='session')
def toy_run(toy_data_dir, jax_cache_dir, tmp_path_factory):  # pylint: disable=redefined-outer-name
  """(config, workdir, final state) of a finished runlocal toy run, trained once per worker for
  the modules that need a trained workdir (test_train, test_tools).

  ClassMix + ReCo (Mean Teacher: the teacher is evaluated) for TOY_STEPS steps on
  reco_toy/tiny, evaluated and checkpointed at steps 2 and 4.
  """
  config = helpers.toy_run_config(toy_data_dir, eval_every_steps=2)
  workdir = tmp_path_factory.mktemp('toy_run')
  with helpers.trainer_compilations(jax_cache_dir):
    state = train.train_and_evaluate(config, str(workdir))
  return config, workdir, state


# The tiny DeepLabV3+ of the step tests (helpers.tiny_model) on one device.
@pytest.fixture(scope='module')
def mesh():
  return parallel.make_mesh(jax.devices()[:1])


@pytest.fixture(scope='module')
def model():
  return helpers.shared_model_and_state()[0]


@pytest.fixture(scope='module')
def initial_state():
  return helpers.shared_model_and_state()[1]


@pytest.fixture
def state(initial_state):  # pylint: disable=redefined-outer-name
  # Steps donate their input state: hand each test its own buffers.
  return jax.tree.map(jnp.copy, initial_state)

"""Float32 tolerances for the suite's numeric comparisons, and a record of how close they come.

Float32 keeps 24 significant bits, so one rounding moves a value by at most EPS / 2 of itself
(EPS = 2**-23, about 1.2e-7). What a comparison may allow follows from how its two sides are
computed:

- **The same reductions in the same order** (a resumed run against an uninterrupted one, the same
  program twice): equal bits, or a few ulps where XLA fuses the two programs differently. `atol`
  1e-6 on values of order one is about ten ulps.
- **A shallow computation in two reduction orders** (a loss or a few operations on given
  inputs, run on 1 against N devices, recomputed, jitted against its parts, or with another
  CPU's vector width: SSE, AVX2 or AVX-512). A sum of n float32 terms
  computed in another order moves by about sqrt(n) * EPS of the sum of |terms| (rounding errors
  add like a random walk; n * EPS is the worst case). The tiny tests' largest sums run over
  4 images x 33 x 33 pixels = 4,356 terms: sqrt(n) * EPS = 8e-6. `ONE_PASS` = 1e-5 covers one
  such reduction per quantity compared, relative to its magnitude.
- **A pass through the network in two reduction orders or two libraries** (a training step's
  forward and backward pass, the PyTorch parity tests: XLA against oneDNN), about 18
  convolutions of a tiny DeepLab with BatchNorm between them: each layer adds its own rounding
  to what it receives, so the error relative to the output grows with depth. `DEEP_PASS` =
  1e-4, ten shallow computations' worth.
- **Several training steps in two reduction orders.** Each step starts from the previous step's
  differences and can amplify them: the update divides by BatchNorm's batch deviation, momentum
  carries them on, and a changed gradient changes every later forward pass. No finite bound
  follows from the arithmetic alone, so the suite states one: `DEEP_PASS` at step 1, growing
  threefold per step (`steps_rtol`), 9e-4 at step 3. It stays far below what a wrong reduction
  gives: a mean where the reference sums, or a lost device's share, moves a loss and its update
  by 25 % or more (`tests/isa_matrix.sh` runs such a variant and shows it fails).
- **States after several steps** are compared as updates from the common start, relative to the
  largest update of each leaf (`assert_updates_close`): parameters of order one move by 1e-3 in
  three steps, and a tolerance relative to the parameters would not see a wrong update.

Set `RECO_JAX_TOLERANCE_LOG` to a file and every comparison of the suite appends the ratio of its
observed difference to its tolerance there (conftest.py hooks `np.testing.assert_allclose` and
`pytest.approx` too); `tests/isa_matrix.sh` summarises them per test module.
"""
import json
import os
import sys

import jax
import numpy as np

EPS = float(np.finfo(np.float32).eps)
ONE_PASS = 1e-5
DEEP_PASS = 10 * ONE_PASS
STEP_GROWTH = 3.0
_LOG = os.environ.get('RECO_JAX_TOLERANCE_LOG')


def steps_rtol(step: int) -> float:
  """Relative tolerance for a quantity after `step` (1-based) steps in two reduction orders."""
  return DEEP_PASS * STEP_GROWTH ** (step - 1)


def record(ratio: float) -> None:
  """Appends observed difference / tolerance for the running test (when a log is set)."""
  if not _LOG or not np.isfinite(ratio):
    return
  frame, where = sys._getframe(1), ''  # pylint: disable=protected-access
  while frame is not None:
    name = frame.f_code.co_filename
    if os.path.basename(name).startswith('test_'):
      where = f'{os.path.basename(name)}:{frame.f_lineno}'
      break
    frame = frame.f_back
  test = os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]
  line = json.dumps({'test': test, 'where': where, 'ratio': float(ratio)}) + '\n'
  with open(_LOG, 'a', encoding='utf-8') as f:
    f.write(line)


def ratio(actual, desired, rtol: float, atol: float) -> float:
  """max |actual - desired| / (atol + rtol |desired|) over the elements (0 where both are NaN)."""
  actual = np.asarray(actual, np.float64)
  desired = np.asarray(desired, np.float64)
  diff = np.abs(actual - desired)
  both_nan = np.isnan(actual) & np.isnan(desired)
  allowed = atol + rtol * np.abs(desired)
  with np.errstate(divide='ignore', invalid='ignore'):
    r = np.where(both_nan, 0.0, np.where(diff == 0, 0.0, diff / allowed))
  return float(np.max(r, initial=0.0))


def assert_histories_close(got: list[dict], want: list[dict], *, atol: float = 1e-6) -> None:
  """Per-step metric dicts agree: step s to `steps_rtol(s)` relative, with an `atol` floor."""
  assert [sorted(m) for m in got] == [sorted(m) for m in want]
  bad = []
  for step, (g, w) in enumerate(zip(got, want), start=1):
    rtol = steps_rtol(step)
    for name in w:
      r = ratio(g[name], w[name], rtol, atol)
      record(r)
      if r > 1:
        bad.append(f'step {step} {name}: {g[name]!r} vs {w[name]!r} (rtol {rtol:g})')
  assert not bad, '\n'.join(bad)


def assert_updates_close(got, want, start, *, steps: int, err_msg: str = '') -> None:
  """Two states after `steps` steps from `start` agree leaf by leaf, as updates.

  Each leaf's difference may be `steps_rtol(steps)` of the leaf's largest update from `start`;
  plus ONE_PASS of the largest update in the tree, for leaves whose exact update is zero (a
  bias ahead of BatchNorm): they move by the rounding of sums whose terms are as large as the
  other leaves' gradients; plus 4 EPS of the leaf's largest value (adding an update rounds).
  """
  assert jax.tree.structure(got) == jax.tree.structure(want) == jax.tree.structure(start)
  rtol = steps_rtol(steps)
  bad = []
  paths, wants = _paths_and_leaves(want)
  triples = [tuple(np.asarray(x, np.float64) for x in leaves) for leaves in
             zip(wants, jax.tree.leaves(got), jax.tree.leaves(start))]
  largest = max((np.max(np.abs(w - s)) for w, _, s in triples if w.size), default=0.0)
  for path, (w, g, s) in zip(paths, triples):
    if w.size == 0:
      continue
    allowed = (rtol * np.max(np.abs(w - s)) + ONE_PASS * largest
               + 4 * EPS * np.max(np.abs(w)))
    diff = np.max(np.abs(g - w))
    r = 0.0 if diff == 0 else diff / allowed if allowed > 0 else np.inf
    record(r)
    if r > 1:
      bad.append(f'{err_msg}{path}: max difference {diff:.3g} > {allowed:.3g}')
  assert not bad, '\n'.join(bad)


def _paths_and_leaves(tree):
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [jax.tree_util.keystr(p) for p, _ in flat], [x for _, x in flat]

"""End-to-end training on a tiny toy dataset: outputs, exact resume, NaN handling, errors."""
import dataclasses
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import toy
import helpers
from helpers import TOY_STEPS, event_tags, host, restore, toy_run_config
from reco_jax import divergence
from reco_jax import inputs
from reco_jax import methods
from reco_jax import steps
from reco_jax import train
from reco_jax import viz
from reco_jax import workdir as workdir_lib
from reco_jax.models import deeplab

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The unawaited Orbax reads of test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before.
ORBAX_UNAWAITED_READS = ('ignore:Exception ignored in. <coroutine object '
                         '_read_array_index_and_device_put:pytest.PytestUnraisableExceptionWarning')
# The run of the session (conftest.toy_run), shared with test_tools, and its reruns' steps.
pytestmark = [pytest.mark.filterwarnings(ORBAX_UNAWAITED_READS),
              pytest.mark.usefixtures('trainer_compilations')]


def test_end_to_end_writes_events_checkpoints_config_and_ids(toy_run):
  config, workdir, state = toy_run
  assert int(state.step) == TOY_STEPS
  tags = event_tags(workdir)
  assert tags['eval/miou'] == [2, TOY_STEPS]
  assert tags['eval/iou/background'] == [2, TOY_STEPS] and 'eval/iou/rings' in tags
  assert tags['train/loss'] == [1, 2, 3, 4]
  for name in ('sup_loss', 'unsup_loss', 'reco_loss', 'learning_rate', 'pseudo_confidence',
               'images_per_second'):
    assert f'train/{name}' in tags, name
  # image | ground truth | prediction | easy | hard query panels, and the relation graph.
  assert tags['eval/examples'] == [2, TOY_STEPS] and tags['eval/relations_R'] == [2, TOY_STEPS]
  with ocp.CheckpointManager(workdir / 'checkpoints') as manager:
    assert manager.all_steps() == [2, 4]
  miou = helpers.logged_scalars(workdir)['eval/miou']
  with ocp.CheckpointManager(workdir / 'checkpoints_best') as manager:
    assert manager.all_steps() == [max(miou, key=miou.get)]
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['dataset'] == 'reco_toy/tiny' and saved['num_train_steps'] == TOY_STEPS
  assert saved['model']['backbone'] == 'resnet_tiny' and saved['method'] == 'classmix'
  ids = (workdir / 'labelled_ids.txt').read_text().split()
  assert len(ids) == config.labels == len(set(ids))
  assert all(i.startswith('train_') for i in ids)
  # The training loss moved and the latest checkpoint holds the returned state.
  restored = restore(workdir / 'checkpoints', TOY_STEPS, state)
  np.testing.assert_array_equal(
      jax.tree.leaves(host(restored.params))[0], jax.tree.leaves(host(state.params))[0])


def test_resumed_run_matches_uninterrupted_run(toy_run, tmp_path):
  config, workdir, state = toy_run
  # A run killed after its step-2 checkpoint: the same workdir without the later one. (Its
  # best-mIoU checkpoint stays: a run can stop between the two saves of a step.)
  killed = tmp_path / 'killed'
  shutil.copytree(workdir, killed)
  shutil.rmtree(killed / 'checkpoints' / str(TOY_STEPS))
  for events in killed.glob('events.out.tfevents.*'):
    events.unlink()
  resumed = train.train_and_evaluate(config, str(killed))
  # It continued from step 2 (it logged steps 3 and 4 only) ...
  assert event_tags(killed)['train/loss'] == [3, 4]
  assert int(resumed.step) == TOY_STEPS
  # ... and reached the uninterrupted run's state: student, teacher and optimiser.
  for name in ('params', 'batch_stats', 'ema_params', 'ema_batch_stats', 'opt_state'):
    a, b = host(getattr(state, name)), host(getattr(resumed, name))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(x, y, rtol=0, atol=1e-6, err_msg=name)


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(
    toy_run, toy_data_dir, tmp_path, monkeypatch):
  config, full_workdir, _ = toy_run
  make_train_step = steps.make_train_step

  def make_poisoned(*args, **kwargs):
    step_fn = make_train_step(*args, **kwargs)
    calls = []

    def poisoned(state, batch, key):
      calls.append(1)
      if len(calls) == 3:  # a corrupted input at step 3 makes the real loss NaN
        batch = jax.tree.map(lambda x: x * np.nan if x.dtype == np.float32 else x, batch)
      return step_fn(state, batch, key)
    return poisoned

  monkeypatch.setattr(steps, 'make_train_step', make_poisoned)
  workdir = tmp_path / 'nan'
  with pytest.raises(divergence.TrainingDivergedError, match=r'step 3: non-finite') as err:
    train.train_and_evaluate(config, str(workdir))
  message = str(err.value)
  assert 'loss=nan' in message and 'sup_loss=' in message and 'reco_loss=' in message
  assert 'step 2' in message and 'learning_rate' in message
  with ocp.CheckpointManager(workdir / 'checkpoints') as manager:
    assert manager.latest_step() == 2
  # The kept checkpoint is finite and equal to the healthy run's step-2 checkpoint.
  like = restore(full_workdir / 'checkpoints', 2, toy_run[2])
  kept = restore(workdir / 'checkpoints', 2, like)
  for x, y in zip(jax.tree.leaves(host(like)), jax.tree.leaves(host(kept))):
    assert np.all(np.isfinite(x))
    np.testing.assert_array_equal(x, y)


def _killed_copy(workdir, tmp_path, name):
  """A copy of a finished run's workdir without its TensorBoard events."""
  copy = tmp_path / name
  shutil.copytree(workdir, copy)
  for events in copy.glob('events.out.tfevents.*'):
    events.unlink()
  return copy


def _assert_same_state(a, b):
  for name in ('params', 'batch_stats', 'ema_params', 'ema_batch_stats', 'opt_state'):
    for x, y in zip(jax.tree.leaves(host(getattr(a, name))),
                    jax.tree.leaves(host(getattr(b, name))), strict=True):
      np.testing.assert_allclose(x, y, rtol=0, atol=1e-6, err_msg=name)


def test_a_workdir_holds_one_run(toy_run, toy_data_dir, tmp_path):
  config, workdir, _ = toy_run
  reused = _killed_copy(workdir, tmp_path, 'reused')
  before = {name: (reused / name).read_text() for name in ('config.json', 'labelled_ids.txt')}
  other = toy_run_config(toy_data_dir, method='supervised', labels=8)
  with pytest.raises(ValueError, match=r'holds a run of another config') as err:
    train.train_and_evaluate(other, str(reused))
  message = str(err.value)
  assert 'labels: 16 in the workdir, 8 now' in message
  assert 'method: "classmix" in the workdir, "supervised" now' in message
  assert 'Use a new --workdir' in message and 'log_every_steps' not in message
  # Nothing the first run wrote was touched.
  assert {name: (reused / name).read_text() for name in before} == before
  # Logging and checkpoint cadence may change on resume: the finished run is found complete.
  resumed = train.train_and_evaluate(toy_run_config(toy_data_dir, log_every_steps=2,
                                                 eval_batch_size=8), str(reused))
  assert int(resumed.step) == config.num_train_steps


def test_a_second_trainer_on_a_workdir_is_refused(toy_run, toy_data_dir, tmp_path):
  import fcntl  # pylint: disable=g-import-not-at-top
  config, workdir, _ = toy_run
  busy = _killed_copy(workdir, tmp_path, 'busy')
  with open(busy / '.lock', 'a+') as held:  # a live trainer holds it
    fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(ValueError, match='is in use by a running trainer'):
      train.train_and_evaluate(config, str(busy))
  # The lock file of a trainer that is gone blocks nothing (this copy holds the full run's).
  assert int(train.train_and_evaluate(config, str(busy)).step) == config.num_train_steps


# Orbax's restores of the truncated checkpoint leave read coroutines that are never awaited
# (and a callback on a closed event loop): Python reports them when it collects them, in this
# test or a later one of this module (ORBAX_UNAWAITED_READS).
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(toy_run, tmp_path, capsys):
  config, workdir, state = toy_run
  broken = _killed_copy(workdir, tmp_path, 'broken')
  files = sorted((p for p in (broken / 'checkpoints' / str(TOY_STEPS)).rglob('*') if p.is_file()),
                 key=lambda p: p.stat().st_size)
  largest = files[-1]
  largest.write_bytes(largest.read_bytes()[:largest.stat().st_size // 2])  # truncated
  # The tools say it in a line, without Orbax's traceback.
  model = deeplab.model_from_config(config)
  with pytest.raises(ValueError, match=f'step {TOY_STEPS} in .* cannot be restored'):
    workdir_lib.restore_state(config, model, broken / 'checkpoints', TOY_STEPS)
  resumed = train.train_and_evaluate(config, str(broken))
  printed = capsys.readouterr().out
  assert f'The checkpoint of step {TOY_STEPS} in' in printed and 'trying the one before' in printed
  assert 'Resuming from the checkpoint of step 2' in printed
  assert event_tags(broken)['train/loss'] == [3, 4]
  # Moved aside, not deleted; the run reached the uninterrupted run's state.
  assert (broken / workdir_lib.FAILED_CHECKPOINTS / str(TOY_STEPS)).is_dir()
  _assert_same_state(state, resumed)


def test_a_failed_restore_silences_its_abandoned_reads_and_nothing_else(monkeypatch):
  # They complete into Orbax's closed event loop: dozens to hundreds of tracebacks otherwise.
  reported = []
  monkeypatch.setattr(sys, 'unraisablehook', reported.append)
  workdir_lib._quiet_abandoned_reads()  # pylint: disable=protected-access
  workdir_lib._quiet_abandoned_reads()  # pylint: disable=protected-access  (installed once)

  async def _read_array_index_and_device_put():
    pass

  read = _read_array_index_and_device_put()
  read.close()
  other = types.SimpleNamespace(exc_value=RuntimeError('another'), object=None)
  for unraisable in (types.SimpleNamespace(exc_value=RuntimeError('Event loop is closed'),
                                           object=None),
                     types.SimpleNamespace(exc_value=None, object=read), other):
    sys.unraisablehook(unraisable)
  assert reported == [other]
  # asyncio's report of a read's error that nobody retrieved, and of anything else.
  records = [logging.LogRecord('asyncio', logging.ERROR, 'base_events.py', 1, message, None,
                               None) for message in (
      "Future exception was never retrieved\nfuture: <Future finished exception=ValueError("
      "'NOT_FOUND: ... [tensorstore_spec=...]')>",
      'Future exception was never retrieved\nfuture: <Future finished exception=KeyError()>')]
  assert [bool(logging.getLogger('asyncio').filter(r)) for r in records] == [False, True]


def test_short_cause_keeps_the_first_line_without_tensorstores_pointer():
  cause = workdir_lib.short_cause(ValueError(
      'Encountered error while reading array index: (slice(0, 3, 1)). See full TensorStore '
      'details: <bound method pybind11_detail_function_record_v1_system_libstdcpp>\nmore'))
  assert cause == 'ValueError: Encountered error while reading array index: (slice(0, 3, 1)).'
  long = workdir_lib.short_cause(OSError('word ' * 100))
  assert long.endswith('word [...]') and len(long) < 230


def test_sigterm_saves_the_step_and_the_rerun_resumes_exactly(toy_run, tmp_path, monkeypatch):
  from reco_jax import preemption  # pylint: disable=g-import-not-at-top
  config, _, state = toy_run
  workdir = tmp_path / 'preempted'
  helpers.sigterm_at_call(monkeypatch, 3)
  with pytest.raises(preemption.Preempted, match='stopped at step 3 after saving'):
    train.train_and_evaluate(config, str(workdir))
  monkeypatch.undo()
  with ocp.CheckpointManager(workdir / 'checkpoints') as manager:
    assert manager.latest_step() == 3  # a checkpoint off the regular cadence of 2
  resumed = train.train_and_evaluate(config, str(workdir))
  assert event_tags(workdir)['train/loss'] == [1, 2, 3, 4]
  _assert_same_state(state, resumed)


def test_invalid_config_errors_are_clear(toy_data_dir, tmp_path):
  with pytest.raises(ValueError, match='multiple of the 4 devices'):
    train.train_and_evaluate(toy_run_config(toy_data_dir, batch_size=6), str(tmp_path))
  with pytest.raises(ValueError, match='config.method'):
    train.train_and_evaluate(toy_run_config(toy_data_dir, method='mixup'), str(tmp_path))
  with pytest.raises(ValueError, match='num_classes=9'):
    train.train_and_evaluate(toy_run_config(toy_data_dir, num_classes=21), str(tmp_path))
  with pytest.raises(ValueError, match='Unknown dataset .reco_vocc.*reco_voc'):
    train.train_and_evaluate(toy_run_config(toy_data_dir, dataset='reco_vocc'), str(tmp_path))
  incomplete = toy_run_config(toy_data_dir)
  incomplete.unlock()
  del incomplete['weak_threshold']
  del incomplete.optimizer['momentum']
  with pytest.raises(ValueError, match=r"lacks the fields \['weak_threshold', "
                     r"'optimizer.momentum'\]"):
    train.train_and_evaluate(incomplete, str(tmp_path))


def test_train_iterators_take_the_configs_data_fields(monkeypatch):
  """The training streams are built from the config's fields, not the pipeline's defaults."""
  from reco_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  seen = {}
  monkeypatch.setattr(pipeline, 'train_iterators', lambda builder, data, **kwargs: seen.update(
      dataclasses.asdict(data), **kwargs, builder=builder))
  config = toy_run_config('unused', hue_jitter=0.1, scale_range=(0.5, 1.5), labels=7,
                       unlabelled_fraction=0.5, seed=3, subset='uniform')
  inputs.train_streams(config, 'the builder', 5, method=methods.get('classmix'))
  assert seen['builder'] == 'the builder' and seen['start_batch'] == 5
  assert seen['hue_jitter'] == 0.1 and seen['scale_range'] == (0.5, 1.5)
  assert seen['num_labels'] == 7 and seen['unlabelled_fraction'] == 0.5 and seen['seed'] == 3
  assert seen['labelled_batch'] == seen['unlabelled_batch'] == config.batch_size
  assert seen['crop_size'] == tuple(config.crop_size)
  assert seen['subset'] == 'uniform' and seen['labelled_photometric']
  # UniMatch's labelled images get geometric augmentation only, and 2 unlabelled batches.
  inputs.train_streams(config, 'the builder', 5, method=methods.get('unimatch'))
  assert not seen['labelled_photometric']
  assert seen['unlabelled_batch'] == 2 * config.batch_size


@pytest.mark.parametrize('arg, subset', [
    ('runlocal,method=supervised,pretrain=within', 'uniform'),
    ('runlocal', 'class_balanced'),
    ('runlocal,method=pseudo_label,pretrain=within,subset=class_balanced', 'class_balanced')])
def test_the_subset_argument_reaches_the_labelled_id_selection(monkeypatch, arg, subset):
  """The config argument decides the draw of the training streams and of the pseudo-label
  stage's labelled ids (inputs.labelled_ids) alike."""
  from reco_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from reco_jax.data import splits  # pylint: disable=g-import-not-at-top
  ids = [f'train_{i:05d}' for i in range(48)]
  classes = [np.array([i % 9]) for i in range(48)]  # one class each: below min_classes
  monkeypatch.setattr(pipeline, 'train_ids_and_classes', lambda builder: (ids, classes))
  drawn = []
  real = splits.labelled_subset
  monkeypatch.setattr(splits, 'labelled_subset',
                      lambda *a, **kw: drawn.append(kw['subset']) or real(*a, **kw))
  config = toy.get_config(arg)
  if subset == 'uniform':
    assert inputs.labelled_ids(config, 'the builder') == splits.select_uniform(
        ids, config.labels, seed=config.seed)
  else:
    with pytest.raises(ValueError, match='at least 2 classes'):
      inputs.labelled_ids(config, 'the builder')
  assert drawn == [subset]


def test_missing_dataset_says_what_to_do(tmp_path):
  c = toy_run_config(str(tmp_path / 'empty_tfds'), dataset='reco_voc', num_classes=21)
  with pytest.raises(FileNotFoundError, match='manual_dir') as err:
    train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert 'reco_voc' in str(err.value)


def test_main_rejects_misspelt_config_override(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'reco_jax.main', '--config=configs/toy.py:runlocal',
       '--config.num_train_step=5', f'--workdir={tmp_path}'],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
  assert out.returncode != 0
  assert 'num_train_step' in out.stderr
  out = subprocess.run(
      [sys.executable, '-m', 'reco_jax.main', '--config=configs/toy.py:runlocl',
       f'--workdir={tmp_path}'],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
  assert out.returncode != 0
  assert "Unknown config argument 'runlocl'" in out.stderr and 'runlocal' in out.stderr


def test_voc_palette_and_panels():
  palette = viz.voc_palette()
  assert palette.shape == (256, 3) and palette.dtype == np.uint8
  np.testing.assert_array_equal(palette[:4], [[0, 0, 0], [128, 0, 0], [0, 128, 0],
                                              [128, 128, 0]])
  np.testing.assert_array_equal(palette[15], [192, 128, 128])  # person
  np.testing.assert_array_equal(palette[255], [224, 224, 192])
  images = np.zeros((2, 5, 6, 3), np.float32)  # normalised zeros = the ImageNet mean
  labels = np.full((2, 5, 6), 255, np.int32)
  preds = np.ones((2, 5, 6), np.int32)
  panels = viz.segmentation_panels(images, labels, preds, gap=2)
  assert panels.shape == (2, 5, 3 * 6 + 4, 3) and panels.dtype == np.uint8
  np.testing.assert_array_equal(panels[0, 0, 0], [124, 116, 104])  # mean colour
  np.testing.assert_array_equal(panels[0, 0, 6], [255, 255, 255])  # separator
  np.testing.assert_array_equal(panels[0, 0, 8], [224, 224, 192])  # void
  np.testing.assert_array_equal(panels[0, 0, 16], [128, 0, 0])  # class 1
  with pytest.raises(ValueError, match=r'\[B, H, W\]'):
    viz.segmentation_panels(images, labels[0], preds)

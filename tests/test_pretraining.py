"""Contrastive pretraining (Zhao et al.) and the staged runs: step, fine-tuning start, resume,
pseudo-labels, config errors."""
import importlib.util
import json
import pathlib
import shutil
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import toy
from reco_jax import class_stats
from reco_jax import config_checks
from reco_jax import data as data_lib
from reco_jax import inference
from reco_jax import methods
from reco_jax import normalization
from reco_jax import parallel
from reco_jax import pseudo_labels
from reco_jax import results
from reco_jax import stages
from reco_jax import state as state_lib
from reco_jax import steps
from reco_jax import train
from reco_jax import workdir as workdir_lib
from reco_jax.data import pipeline
from reco_jax.data import splits
from reco_jax.losses import pixel_contrast
from reco_jax.methods import contrastive_pretraining as cp
from reco_jax.models import deeplab
import helpers
from helpers import event_tags, host, toy_run_config

STEPS = 4


pytestmark = pytest.mark.usefixtures('trainer_compilations')


def _pretrain_config(mode='within', **overrides):
  c = toy.get_config(f'runlocal,method=supervised,pretrain={mode}')
  for key, value in overrides.items():
    c[key] = value
  return c


def _batch(config, rng):
  size = tuple(config.crop_size)
  labels = rng.integers(0, 4, size=(2 * config.batch_size, *size)).astype(np.int32)
  labels[:, :5] = 255
  images = rng.normal(size=(*labels.shape, 3)).astype(np.float32)
  return {'labelled': {'image': images, 'label': labels}}


@pytest.mark.parametrize('mode', ['within', 'cross'])
def test_pretraining_step_loss_is_the_standalone_loss(mode, request):
  # Within-image: the staged run's own pretraining stage.
  if mode == 'within':
    stage = stages.plan(request.getfixturevalue('staged_run')[0])[0]
  else:
    stage = stages.Stage('pretrain', stages.PRETRAIN, stages.pretraining_config(
        _pretrain_config(mode)))
  config = stage.config
  assert stage.kind == stages.PRETRAIN
  network, method = methods.stage_model(stage)
  mesh = parallel.make_mesh()
  state = state_lib.create_train_state(config, network, jax.random.key(1),
                                       (*config.crop_size, 3), mesh=mesh)
  assert set(state.params) == {'segmenter', 'projection'}
  # The segmentation network minus its final layer: the classifier head's hidden layer is in.
  segmenter = set(state.params['segmenter'])
  assert {'classifier_conv', 'classifier_bn'} <= segmenter
  assert not any(k.startswith(('classifier_out', 'representation')) for k in segmenter)
  batch = _batch(config, np.random.default_rng(0))
  key = jax.random.key(7)
  variables = host(state.student_variables())
  # The step and the loss by hand compile as users' programs do: compiled by the suite's
  # cheaper CPU emitters, the two programs' losses differ by 8e-4 of their value.
  sharded = parallel.shard_batch(mesh, batch)
  step = helpers.uncached_step(config, network, mesh, state, sharded, key, method=method)
  _, metrics = step(state, sharded, key)
  # The same loss by hand: the step's keys, both views in one training-mode pass, the loss
  # function of losses/pixel_contrast.py on the embeddings.
  images, labels = batch['labelled']['image'], batch['labelled']['label']
  n = len(images)

  @helpers.jit_as_steps  # one program, not hundreds of single operations
  def by_hand(variables):
    k_view, _, k_loss = jax.random.split(jax.random.fold_in(key, 0), 3)
    views = jnp.concatenate([images, cp.distort(k_view, images, config)])
    embeddings, _ = network.apply(variables, views, train=True, mutable=['batch_stats'])
    return embeddings, pixel_contrast.two_view_loss(
        k_loss, embeddings[:n], embeddings[n:], labels, labels, mode=mode, temperature=0.07)

  embeddings, expected = by_hand(variables)
  assert embeddings.shape == (2 * len(images), *cp.embedding_size(config),
                              config.projection_dims[-1])
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['contrast_loss']), float(expected), rtol=2e-5)
  assert float(metrics['contrast_loss']) > 0


def test_distortion_changes_colours_only():
  config = _pretrain_config()
  rng = np.random.default_rng(0)
  images = rng.normal(size=(6, 8, 8, 3)).astype(np.float32)
  flat = np.broadcast_to(images[:, :1, :1], images.shape)  # one colour per image
  out = np.asarray(cp.distort(jax.random.key(0), jnp.asarray(flat), config))
  # A uniform image stays uniform: nothing moves a pixel, so the labels stay aligned.
  np.testing.assert_allclose(out, np.broadcast_to(out[:, :1, :1], out.shape), atol=1e-5)
  grey = ml_collections.ConfigDict(config.to_dict())
  grey.distortion.jitter_prob, grey.distortion.grey_prob = 0.0, 1.0
  out = np.asarray(cp.distort(jax.random.key(0), jnp.asarray(images), grey))
  x = np.clip(normalization.denormalize(out), 0, 1)
  np.testing.assert_allclose(x[..., 0], x[..., 2], atol=1e-5)  # grey: R = G = B
  src = np.clip(normalization.denormalize(images), 0, 1)
  np.testing.assert_allclose(x[..., 0], src @ np.array([0.299, 0.587, 0.114]), atol=1e-5)


def test_embedding_probe_is_the_mean_pairwise_cosine():
  rng = np.random.default_rng(0)
  f = rng.normal(size=(30, 5))
  f /= np.linalg.norm(f, axis=1, keepdims=True)
  labels = rng.integers(0, 3, size=30)
  sums = np.stack([f[labels == c].sum(0) for c in range(4)])  # class 3 absent
  counts = np.bincount(labels, minlength=4)
  with np.errstate(invalid='ignore'):
    means = sums / counts[:, None]
  probe = class_stats.embedding_probe(class_stats.ClassMeans(means, counts))
  cos = f @ f.T
  within = np.mean([cos[np.ix_(labels == c, labels == c)].mean() for c in range(3)])
  between = np.mean([cos[np.ix_(labels == c, labels == d)].mean()
                     for c in range(3) for d in range(3) if c != d])
  np.testing.assert_allclose(probe['within_class_cosine'], within)
  np.testing.assert_allclose(probe['between_class_cosine'], between)


def test_stage_plans():
  folders = lambda arg: [(s.folder, s.kind) for s in stages.plan(toy.get_config(arg))]
  assert folders('method=classmix') == [('', 'train')]
  assert folders('method=classmix,pretrain=cross') == [('pretrain', 'pretrain'),
                                                       ('finetune', 'train')]
  assert folders('method=pseudo_label') == [
      ('stage0', 'train'), ('pseudo_labels', 'pseudo_labels'), ('train', 'train')]
  plan = stages.plan(toy.get_config('method=pseudo_label,pretrain=within'))
  assert [s.folder for s in plan] == ['stage0/pretrain', 'stage0/finetune', 'pseudo_labels',
                                      'pretrain', 'finetune']
  assert [s.config.method for s in plan if s.kind == 'train'] == ['supervised'] * 2
  assert plan[0].config.num_train_steps == plan[0].config.pretrain_steps == 2000
  assert plan[2].pseudo_labels == 'stage0/finetune'
  assert plan[3].pseudo_labels == plan[4].pseudo_labels == 'pseudo_labels'
  assert plan[4].init_from == 'pretrain' and plan[1].init_from == 'stage0/pretrain'
  # Every stage draws the same labelled images: Zhao et al.'s uniform subset.
  assert {s.config.subset for s in plan} == {'uniform'}
  # Zhao et al.'s settings have no ReCo unless asked for.
  assert not toy.get_config('method=supervised,pretrain=within').reco
  assert toy.get_config('method=classmix,pretrain=within,reco=True').reco


@pytest.fixture(scope='module')
def staged_run(toy_data_dir, tmp_path_factory):
  """An uninterrupted supervised run with within-image pretraining: (config, workdir, state)."""
  config = toy_run_config(toy_data_dir, method='supervised', reco=False, pretrain='within',
                       pretrain_steps=STEPS, num_image_summaries=0)
  workdir = tmp_path_factory.mktemp('staged')
  state = train.train_and_evaluate(config, str(workdir))
  return config, workdir, state


def test_staged_run_folders_events_and_finetuning_start(staged_run):
  config, workdir, state = staged_run
  assert int(state.step) == STEPS
  tags = event_tags(workdir / 'pretrain')
  assert tags['train/contrast_loss'] == [1, 2, 3, 4]
  assert tags['eval/within_class_cosine'] == tags['eval/cosine_gap'] == [STEPS]
  assert 'eval/miou' not in tags
  # No mIoU, no best checkpoint: the pretraining stage leaves no checkpoints_best/ at all.
  assert not (workdir / 'pretrain' / workdir_lib.BEST_CHECKPOINTS).exists()
  assert (workdir / 'finetune' / workdir_lib.BEST_CHECKPOINTS).is_dir()
  assert event_tags(workdir / 'finetune')['eval/miou'] == [STEPS]
  assert json.loads((workdir / 'config.json').read_text())['pretrain'] == 'within'
  saved = json.loads((workdir / 'pretrain' / 'config.json').read_text())
  assert saved['optimizer'] == config.pretrain_optimizer.to_dict()
  # The fine-tuning stage starts from every pretrained layer, exactly, with a fresh final
  # classifier layer and representation head, and no projection head.
  plan = stages.plan(config)
  model, _ = methods.stage_model(plan[1])
  start = train.initial_state(plan[1], workdir, model, parallel.make_mesh())
  network, _ = methods.stage_model(plan[0])
  pretrained = workdir_lib.restore_state(plan[0].config, network,
                                         workdir / 'pretrain' / 'checkpoints', STEPS)
  ours, theirs = host(start.params), host(pretrained.params['segmenter'])
  assert 'projection' not in ours and 'segmenter' not in ours
  assert set(theirs) == {'backbone', 'aspp', 'project_conv', 'project_bn', 'classifier_conv',
                         'classifier_bn'}
  assert set(ours) - set(theirs) == {'classifier_out', 'representation_conv',
                                     'representation_bn', 'representation_out'}
  for name in theirs:
    for a, b in zip(jax.tree.leaves(ours[name]), jax.tree.leaves(theirs[name]), strict=True):
      np.testing.assert_array_equal(a, b)
  stats = host(pretrained.batch_stats['segmenter'])
  assert set(stats) == {'backbone', 'aspp', 'project_bn', 'classifier_bn'}
  for name in stats:
    for a, b in zip(jax.tree.leaves(host(start.batch_stats[name])), jax.tree.leaves(stats[name]),
                    strict=True):
      np.testing.assert_array_equal(a, b)
  fresh = host(state_lib.create_train_state(
      plan[1].config, model, jax.random.split(jax.random.key(config.seed))[0],
      (*config.crop_size, 3)).params)
  for name in ('classifier_out', 'representation_conv', 'representation_out'):
    for a, b in zip(jax.tree.leaves(ours[name]), jax.tree.leaves(fresh[name])):
      np.testing.assert_array_equal(a, b)
  assert int(start.step) == 0
  # The tools read the run's final model, and the results tool names its pretraining.
  assert workdir_lib.load_run(workdir).workdir == workdir / 'finetune'
  result = results.load_result(workdir)
  assert result.row_name == 'Supervised, within-image pretraining'
  assert sorted(result.miou) == [STEPS] and results.find_runs([str(workdir)]) == [workdir]


def _assert_same(a, b):
  for name in ('params', 'batch_stats', 'opt_state'):
    for x, y in zip(jax.tree.leaves(host(getattr(a, name))),
                    jax.tree.leaves(host(getattr(b, name))), strict=True):
      np.testing.assert_allclose(x, y, rtol=0, atol=1e-6, err_msg=name)


def test_sigterm_in_a_staged_run_resumes_to_the_same_parameters(staged_run, tmp_path,
                                                               monkeypatch):
  from reco_jax import preemption  # pylint: disable=g-import-not-at-top
  config, _, state = staged_run
  workdir = tmp_path / 'preempted'
  helpers.sigterm_at_call(monkeypatch, STEPS + 3)  # the fine-tuning stage's step 3
  with pytest.raises(preemption.Preempted, match='stopped at step 3 after saving'):
    train.train_and_evaluate(config, str(workdir))
  monkeypatch.undo()
  assert (workdir / 'finetune' / 'checkpoints' / '3').is_dir()
  resumed = train.train_and_evaluate(config, str(workdir))
  assert event_tags(workdir / 'finetune')['train/loss'] == [1, 2, 3, 4]
  _assert_same(state, resumed)


@pytest.mark.parametrize('killed_in', ['pretrain', 'finetune'])
def test_killed_staged_run_resumes_to_the_same_parameters(staged_run, tmp_path, killed_in):
  config, workdir, state = staged_run
  killed = tmp_path / 'killed'
  shutil.copytree(workdir, killed)
  shutil.rmtree(killed / killed_in / 'checkpoints' / str(STEPS))  # killed after step 2
  if killed_in == 'pretrain':
    shutil.rmtree(killed / 'finetune')
  for folder in ('pretrain', 'finetune'):
    for events in (killed / folder).glob('events.out.tfevents.*'):
      events.unlink()
  resumed = train.train_and_evaluate(config, str(killed))
  assert event_tags(killed / killed_in)['train/loss'] == [3, 4]
  if killed_in == 'finetune':  # The finished stage is not run again.
    assert not list((killed / 'pretrain').glob('events.out.tfevents.*'))
  _assert_same(state, resumed)


def test_pseudo_labels_are_the_models_predictions(toy_data_dir, tmp_path):
  config = toy_run_config(toy_data_dir, method='supervised', pseudo_label_threshold=0.15)
  builder = data_lib.prepare(config.dataset, config.data_dir)
  model = deeplab.model_from_config(config)
  state = state_lib.create_train_state(config, model, jax.random.key(3), (*config.crop_size, 3))
  variables = state.student_variables()
  ids = pipeline.train_ids_and_classes(builder)[0][:6]
  folder = tmp_path / 'pseudo_labels'
  (folder / 'stale').mkdir(parents=True)  # a half-written folder of a killed run
  assert not pseudo_labels.is_complete(folder)
  with pytest.raises(FileNotFoundError, match='no complete pseudo-label dataset'):
    pseudo_labels.read(folder)
  pseudo_labels.write(folder, config, model, variables, builder, ids, source='test')
  stored = pseudo_labels.read(folder)
  assert sorted(stored) == sorted(ids) and not (folder / 'stale').exists()

  @jax.jit
  def probabilities(x):
    logits, _ = model.apply(variables, x, train=False)
    return jax.nn.softmax(steps.common.upsample(logits, config.eval_size), -1)[0]

  for image_id, image in pipeline.decoded_images(builder, ids):
    label = pseudo_labels.decode(stored[image_id])
    assert label.shape == image.shape[:2]  # full resolution
    # The model on the image padded to eval_size, argmax, void below the threshold.
    prob = probabilities(inference.preprocess(image, config.eval_size)[None])
    expected = np.where(np.max(prob, -1) >= 0.15, np.argmax(prob, -1), 255)
    np.testing.assert_array_equal(label, expected[:image.shape[0], :image.shape[1]])


def test_pseudo_labels_on_four_devices_are_those_of_one(toy_data_dir, tmp_path,
                                                        monkeypatch):
  # The untrained model's confidences are 0.119-0.138: about half the pixels become void.
  config = toy_run_config(toy_data_dir, method='supervised', pseudo_label_threshold=0.124)
  builder = data_lib.prepare(config.dataset, config.data_dir)
  model = deeplab.model_from_config(config)
  mesh = parallel.make_mesh()
  state = state_lib.create_train_state(config, model, jax.random.key(3), (*config.crop_size, 3),
                                       mesh=mesh)
  variables = state.student_variables()  # replicated over the 4 devices, as in training
  ids = pipeline.train_ids_and_classes(builder)[0][:7]
  batches = []
  shard_batch = parallel.shard_batch
  monkeypatch.setattr(parallel, 'shard_batch', lambda where, batch: (
      batches.append((where.size, batch.shape[0])) or shard_batch(where, batch)))
  stored, manifests = {}, {}
  # One device in one chunk; four devices in chunks of 5 and 2 images, each a padded batch.
  for devices, chunk in ((1, 64), (4, 5)):
    folder = tmp_path / f'devices{devices}'
    done = pseudo_labels.write(folder, config, model, variables, builder, ids, source='test',
                               chunk=chunk, devices=jax.local_devices()[:devices])
    assert done == len(ids)
    stored[devices] = pseudo_labels.read(folder)
    manifests[devices] = json.loads((folder / pseudo_labels.MANIFEST).read_text())
  assert batches == [(1, 4), (1, 4), (4, 4), (4, 4), (4, 4)]  # eval_batch_size 4 per step
  assert sorted(stored[4]) == sorted(stored[1]) == sorted(ids)
  assert stored[4] == stored[1]  # every label's PNG bytes
  assert manifests[4] == manifests[1]
  labels = np.concatenate([pseudo_labels.decode(png).ravel() for png in stored[4].values()])
  assert 0.1 < np.mean(labels == 255) < 0.9 and len(np.unique(labels)) >= 3
  with pytest.raises(ValueError, match='its own devices'):
    pseudo_labels.write(tmp_path / 'other', config, model, variables, builder, ids,
                        source='test', devices=[types.SimpleNamespace(process_index=1)])


def test_training_stream_reads_pseudo_labels_in_place_of_labels(toy_data_dir):
  builder = data_lib.prepare('reco_toy/tiny', toy_data_dir)
  ids, classes = pipeline.train_ids_and_classes(builder)
  labelled = splits.labelled_subset(ids, classes, 2, min_classes=1, num_classes=9, seed=0)
  import tensorflow as tf
  sizes = {i: image.shape[:2] for i, image in pipeline.decoded_images(builder, ids)}
  pseudo = {i: tf.io.encode_png(np.full((*sizes[i], 1), 7, np.uint8)).numpy()
            for i in ids if i not in labelled}
  data = pipeline.TrainData(num_labels=2, min_classes=1, num_classes=9, partial='',
                            crop_size=(32, 32), scale_range=(1.0, 1.0), labelled_batch=16,
                            unlabelled_batch=0, seed=0)
  stream, _, labelled_ids = pipeline.train_iterators(builder, data, pseudo_labels=pseudo)
  assert labelled_ids == labelled
  labels = next(stream)['label']
  pseudo_images = [np.all((x == 7) | (x == 255)) for x in labels]
  # 46 of the 48 images carry the constant pseudo-label, the 2 labelled ones their own.
  own = labels[~np.array(pseudo_images)]
  assert sum(pseudo_images) >= 10 and not all(np.all(x == 7) for x in own)
  with pytest.raises(ValueError, match='outside the labelled subset'):
    pipeline.train_iterators(builder, data,
                             pseudo_labels={labelled[0]: pseudo[next(iter(pseudo))]})


@pytest.mark.parametrize('arg, match', [
    ('pretrain=within,partial=p1', 'needs dense labels'),
    ('method=pseudo_label,labels=0', 'leaves none'),
    ('method=s4gan,pretrain=cross', 'not supported with method=s4gan'),
])
def test_unsupported_combinations_are_clear_errors(arg, match):
  with pytest.raises(ValueError, match=match):
    config_checks.validate_config(toy.get_config(arg))


def test_unknown_pretraining_mode_is_a_clear_error():
  with pytest.raises(ValueError, match="pretrain='simclr'.*expected one of"):
    toy.get_config('pretrain=simclr')


def _benchmark(name):
  path = pathlib.Path(__file__).parents[1] / 'benchmarks' / f'{name}.py'
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _pretraining_probe():
  return _benchmark('pretraining_probe')


def test_linear_probe_separates_separable_features_and_not_noise():
  probe = _pretraining_probe()
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 600)
  features = rng.normal(size=(600, 4)).astype(np.float32)
  separable = features + 4.0 * np.eye(4, dtype=np.float32)[labels]
  train, val = slice(0, 400), slice(400, 600)
  assert probe.linear_probe_miou((separable[train], labels[train]),
                                 (separable[val], labels[val]), 3) > 95
  assert probe.linear_probe_miou((features[train], labels[train]),
                                 (features[val], labels[val]), 3) < 50


def test_the_frozen_feature_probe_reads_a_staged_run(staged_run):
  """benchmarks/pretraining_probe.py restores the pretraining stage's start and end, and its
  embedding probe is the trainer's eval/cosine_gap at the end of pretraining."""
  probe = _pretraining_probe()
  _, workdir, _ = staged_run
  mesh = parallel.make_mesh(jax.devices()[:1])
  config, network, variables = probe._networks(workdir, mesh)  # pylint: disable=protected-access
  start, end = variables.values()
  assert max(np.max(np.abs(np.asarray(a) - np.asarray(b))) for a, b in zip(
      jax.tree.leaves(start['params']), jax.tree.leaves(end['params']))) > 0
  builder = data_lib.prepare_for_config(config)
  batches = pipeline.eval_iterator(builder, split='validation', eval_size=tuple(config.eval_size),
                                   batch_size=config.eval_batch_size)
  logged, _ = results.read_scalars(workdir / 'pretrain', ['eval/cosine_gap'])
  assert probe.cosine_gaps(network, end, batches, config, mesh) == pytest.approx(
      logged['eval/cosine_gap'][STEPS], abs=1e-4)


def test_finetune_drift_measures_from_the_pretrained_network(staged_run):
  """benchmarks/finetune_drift.py: distances of the kept fine-tuning checkpoints from the
  pretrained backbone (not from a fresh initialisation)."""
  drift = _benchmark('finetune_drift')
  ones = {'a': {'w': np.ones(4)}, 'b': {'w': np.full(2, 2.0)}}
  moved = {'a': {'w': np.full(4, 1.5)}, 'b': {'w': np.full(2, 2.0)}}
  assert drift.relative_distances(moved, ones) == {'a': 0.5, 'b': 0.0}
  _, workdir, state = staged_run
  mesh = parallel.make_mesh(jax.devices()[:1])
  rows = drift.drift(workdir, mesh)
  kept = [(int(p.name), '') for p in (workdir / 'finetune' / workdir_lib.CHECKPOINTS).iterdir()]
  assert [(step, tag) for step, tag, _ in rows] == sorted(kept + [(STEPS, 'best')])
  last = dict(((step, tag), distances) for step, tag, distances in rows)[(STEPS, '')]
  _, _, variables = _pretraining_probe()._networks(workdir, mesh)  # pylint: disable=protected-access
  pretrained = list(variables.values())[-1]['params']['segmenter']['backbone']
  pairs = list(zip(jax.tree.leaves(state.params['backbone']), jax.tree.leaves(pretrained)))
  expected = np.sqrt(sum(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
                         for a, b in pairs) / sum(np.sum(np.asarray(b, np.float64) ** 2)
                                                  for _, b in pairs))
  assert 0 < last['backbone'] == pytest.approx(expected, rel=1e-6)

"""The after-training tools on a real toy workdir: evaluate, predict, relations, results.

The session's toy run (`toy_run` in conftest.py: 4 steps of ClassMix + ReCo on the 48-image
reco_toy/tiny, evaluated at steps 2 and 4), shared with test_train; every tool reads its
workdir as a user would.
"""
import contextlib
import functools
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

from absl import flags
from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

import helpers
from reco_jax import class_stats
from reco_jax import data as data_lib
from reco_jax import evaluate
from reco_jax import inference
from reco_jax import parallel
from reco_jax import predict
from reco_jax import relations
from reco_jax import results
from reco_jax import steps
from reco_jax import viz
from reco_jax import workdir as workdir_lib
from reco_jax.data import base
from reco_jax.data import pipeline

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')


pytestmark = pytest.mark.usefixtures('trainer_compilations')


@pytest.fixture(scope='module')
def loaded(toy_run):
  """The run's latest checkpoint (step 4) loaded back, its builder and the mesh."""
  _, workdir, _ = toy_run
  mesh = parallel.make_mesh()
  run = workdir_lib.load_run(workdir, 'latest', mesh=mesh)
  return run, data_lib.prepare_for_config(run.config, flags='--'), mesh


def validation_examples(builder):
  return list(tfds.as_numpy(builder.as_dataset(split='validation', shuffle_files=False)))


# --------------------------------------------------------------------------- evaluate


def test_evaluate_reproduces_the_training_time_evaluation(toy_run, loaded, tmp_path):
  _, workdir, _ = toy_run
  run, builder, mesh = loaded
  events = helpers.logged_scalars(workdir)
  assert sorted(events['eval/miou']) == [2, 4]
  # 'best' is the step with the highest logged mIoU; 'latest' the last checkpoint.
  best_step = max(events['eval/miou'], key=events['eval/miou'].get)
  assert workdir_lib.find_checkpoint(workdir, 'best')[1] == best_step
  assert run.step == 4
  # Every valid validation pixel is counted once (the toy images fit the 97x97 canvas).
  pixels = sum(int((ex['label'] != 255).sum()) for ex in validation_examples(builder))
  names = base.class_names(builder)
  for step in (4, 2):
    this = run if step == 4 else workdir_lib.load_run(workdir, step, mesh=mesh)
    result = evaluate.evaluate_run(this, builder, 'validation', mesh=mesh)
    assert result.step == step and result.num_pixels == pixels
    # The trainer logs float32 scalars: the tool's float64 values round to them exactly.
    assert np.float32(result.miou) == np.float32(events['eval/miou'][step])
    assert np.float32(result.pixel_accuracy) == np.float32(events['eval/pixel_accuracy'][step])
    for name, iou in zip(names, result.iou):
      assert np.float32(iou) == np.float32(events[f'eval/iou/{name}'][step]), name
  # The written report: table with class names, confusion PNG beside it.
  table, png = evaluate.write_outputs(result, tmp_path / 'eval.md')
  text = table.read_text()
  assert all(f'| {name} |' in text for name in names) and f'{100 * result.miou:.2f}' in text
  assert Image.open(png).size[0] > 300
  csv_path, _ = evaluate.write_outputs(result, tmp_path / 'eval.csv')
  assert csv_path.read_text().splitlines()[0] == 'class,iou,pixels,predicted'
  printed = evaluate.format_table(result)
  assert 'rings' in printed and 'mIoU' in printed


def test_sliding_window_no_larger_than_image_equals_whole_image(loaded):
  run, builder, mesh = loaded
  whole = evaluate.evaluate_run(run, builder, 'validation', mesh=mesh)
  # Windows at least as large as the 97x97 evaluation canvas: one window, the whole image.
  one = evaluate.evaluate_run(run, builder, 'validation', sliding_window=True,
                              window=(97, 97), mesh=mesh)
  np.testing.assert_array_equal(one.confusion, whole.confusion)
  # Windows of the 65x65 training crop: 2x2 overlapping windows, every pixel counted once.
  slide = evaluate.evaluate_run(run, builder, 'validation', sliding_window=True, mesh=mesh)
  assert '65x65' in slide.mode and slide.num_pixels == whole.num_pixels


class CentredChannels(nn.Module):
  """Logits = input channels minus their mean over the input: each window sees its own mean,
  so overlapping windows disagree and the average is checkable."""

  @nn.compact
  def __call__(self, x, train=False):
    logits = x - jnp.mean(x, axis=(1, 2), keepdims=True)
    return logits, logits


def test_sliding_window_logits_average_the_windows():
  assert inference.window_offsets(97, 65, 43) == [0, 32]
  assert inference.window_offsets(1024, 512, 341) == [0, 341, 512]  # mmseg's Cityscapes grid
  assert inference.window_offsets(65, 65, 43) == [0]
  images = np.random.default_rng(0).normal(size=(2, 11, 9, 3)).astype(np.float32)
  got = inference.sliding_window_logits(CentredChannels(), {}, jnp.asarray(images), (6, 5),
                                        stride_fraction=0.5)
  (wh, ww), offsets = inference.window_grid((11, 9), (6, 5), 0.5)
  assert (wh, ww) == (6, 5) and len(offsets) == 3 * 3
  total, count = np.zeros_like(images), np.zeros((11, 9, 1))
  for y, x in offsets:
    crop = images[:, y:y + wh, x:x + ww]
    total[:, y:y + wh, x:x + ww] += crop - crop.mean(axis=(1, 2), keepdims=True)
    count[y:y + wh, x:x + ww] += 1
  np.testing.assert_allclose(np.asarray(got), total / count, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- predict


def test_predict_writes_the_masks_steps_predict_gives(loaded, tmp_path):
  run, builder, mesh = loaded
  examples = validation_examples(builder)
  image_dir = tmp_path / 'images'
  image_dir.mkdir()
  for ex in examples:
    Image.fromarray(ex['image']).save(image_dir / f'{ex["image_id"].decode()}.png')
  big = np.tile(examples[0]['image'], (3, 3, 1))[:130, :101]  # beyond eval_size: a bucket
  Image.fromarray(big).save(image_dir / 'big.jpg', quality=95)
  out = tmp_path / 'out'
  written = predict.predict_files(str(run.workdir), [str(image_dir / '*.png'),
                                                     str(image_dir / 'big.jpg')],
                                  str(out), checkpoint='latest')
  assert len(written) == len(examples) + 1
  # The reference: the trainer's jitted steps.predict on the evaluation pipeline's batches.
  variables = run.eval_variables()
  batches = pipeline.eval_iterator(builder, split='validation', eval_size=(97, 97),
                                   batch_size=4)
  predict_fn = jax.jit(functools.partial(steps.predict, run.model, size=(97, 97)))
  expected = np.concatenate([
      np.asarray(predict_fn(variables, parallel.shard_batch(mesh, b['image'])))
      for b in batches])
  palette = viz.dataset_palette(run.config.dataset)
  for ex, pred in zip(examples, expected):
    stem = ex['image_id'].decode()
    h, w = ex['image'].shape[:2]
    ids = np.asarray(Image.open(out / f'{stem}_ids.png'))
    np.testing.assert_array_equal(ids, pred[:h, :w], err_msg=stem)
    mask = np.asarray(Image.open(out / f'{stem}_mask.png'))
    np.testing.assert_array_equal(mask, palette[ids])
    assert np.asarray(Image.open(out / f'{stem}_overlay.png')).shape == (h, w, 3)
  # The larger image went through a 161x161 bucket (97 + 64 on both sides).
  assert inference.bucket_size((130, 101), (97, 97)) == (161, 161)
  loaded_big = predict.load_image(image_dir / 'big.jpg')
  canvas = np.zeros((4, 161, 161, 3), np.float32)
  canvas[0] = inference.preprocess(loaded_big, (161, 161))
  big_fn = jax.jit(functools.partial(steps.predict, run.model, size=(161, 161)))
  direct = np.asarray(big_fn(variables, parallel.shard_batch(mesh, canvas)))[0, :130, :101]
  np.testing.assert_array_equal(np.asarray(Image.open(out / 'big_ids.png')), direct)


# --------------------------------------------------------------------------- relations


def test_relations_of_the_toy_run(loaded, tmp_path):
  run, builder, mesh = loaded
  spaces = relations.relations_of_run(run, builder, 'validation', ('R', 'Z'), mesh=mesh)
  names = base.class_names(builder)
  cfg = run.config.model
  assert spaces['R'].means.shape == (9, cfg.rep_dim)
  assert spaces['Z'].means.shape == (9, cfg.low_level_dim + cfg.aspp_dim)
  # Both spaces average the same pixels: the valid ones at the decoder resolution (25x25).
  np.testing.assert_array_equal(spaces['R'].counts, spaces['Z'].counts)
  assert spaces['R'].counts[0] > spaces['R'].counts[1:].sum() > 0
  paths = relations.write_figures(tmp_path, 'R', spaces['R'], names, 'R')
  assert {p.name for p in paths} >= {'relations_R.png', 'relations_R.pdf', 'dendrogram_R.png',
                                     'dendrogram_R.pdf', 'class_means_R.npz'}
  saved = np.load(tmp_path / 'class_means_R.npz')
  assert list(saved['class_names']) == list(names)
  image = relations.relation_image(spaces['R'], names)
  assert image.dtype == np.uint8 and image.ndim == 4 and image.shape[-1] == 3


def test_embeddings_leave_the_model_outputs_unchanged(loaded):
  run, _, _ = loaded
  images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 65, 65, 3)), jnp.float32)
  variables = run.eval_variables()
  # Both jitted: the interception adds no operation, so the programs are the same.
  logits, rep = jax.jit(lambda v, x: run.model.apply(v, x, train=False))(variables, images)
  got, embeddings = jax.jit(lambda v, x: relations.apply_with_embeddings(run.model, v, x))(
      variables, images)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(logits))
  np.testing.assert_array_equal(np.asarray(embeddings['R']), np.asarray(rep))
  assert embeddings['Z'].shape[:3] == logits.shape[:3]


def test_relation_graph_of_known_class_means():
  # Three classes with means (1, 0), (1, 1), (0, -2): cosines 1/sqrt(2), 0 and -1/sqrt(2).
  means = {0: (1.0, 0.0), 1: (1.0, 1.0), 2: (0.0, -2.0)}
  labels = np.full((2, 4, 4), 255, np.int32)
  features = np.full((2, 4, 4, 2), 1e3, np.float32)  # void and padding pixels are ignored
  for c, (row, spread) in enumerate(((0, 0.5), (1, 0.25), (2, 1.0))):
    for k, sign in enumerate((1, -1)):  # two pixels per class, averaging to its mean
      labels[0, row, k] = c
      features[0, row, k] = np.asarray(means[c]) + sign * spread
  labels[1] = 0  # the second example is padding (valid = False)
  sums, counts = jax.jit(class_stats.class_statistics, static_argnums=3)(
      features, labels, np.array([True, False]), 4)
  np.testing.assert_array_equal(np.asarray(counts), [2, 2, 2, 0])
  with np.errstate(invalid='ignore'):
    class_means = np.asarray(sums, np.float64) / np.asarray(counts)[:, None]
  np.testing.assert_allclose(class_means[:3], [means[0], means[1], means[2]], atol=1e-6)
  graph = relations.relation_graph(class_means)
  s = 1 / np.sqrt(2)
  np.testing.assert_allclose(graph[:3, :3], [[1, s, 0], [s, 1, -s], [0, -s, 1]], atol=1e-6)
  assert np.isnan(graph[3]).all() and np.isnan(graph[:, 3]).all()  # class 3 has no pixels
  # The closest pair (0, 1: cosine distance 1 - 1/sqrt(2)) merges first.
  linkage = relations.cluster(class_means[:3])
  assert sorted(linkage[0, :2]) == [0, 1]
  np.testing.assert_allclose(linkage[0, 2], 1 - s, atol=1e-6)
  fig = viz.dendrogram_figure(linkage, ['a', 'b', 'c'])
  assert viz.figure_to_image(fig).shape[-1] == 3


def test_query_panels_split_labelled_pixels_by_the_strong_threshold():
  images = np.zeros((1, 2, 3, 3), np.float32)
  labels = np.array([[[1, 1, 255], [2, 2, 2]]])
  predictions = np.array([[[1, 0, 0], [2, 2, 1]]])
  confidence = np.array([[[0.99, 0.5, 0.0], [0.97, 0.2, 0.96]]])
  panels = viz.query_panels(images, labels, predictions, confidence, 0.97, gap=1)
  assert panels.shape == (1, 2, 5 * 3 + 4, 3) and panels.dtype == np.uint8
  easy, hard = panels[0, :, 12:15], panels[0, :, 16:19]
  palette = viz.voc_palette()
  washed = panels[0, 0, 14]  # the void pixel is no query: the washed-out image
  assert (easy[0, 0] == palette[1]).all() and (easy[1, 0] == palette[2]).all()
  assert (hard[0, 1] == palette[1]).all() and (hard[1, 1] == palette[2]).all()
  assert (hard[1, 2] == palette[2]).all() and (easy[1, 2] == washed).all()
  assert (hard[0, 0] == washed).all() and (hard[0, 2] == washed).all()


def test_query_maps_confidence_is_the_labelled_class_probability(loaded):
  run, builder, mesh = loaded
  batch = next(iter(pipeline.eval_iterator(builder, split='validation', eval_size=(97, 97),
                                           batch_size=4)))
  variables = run.eval_variables()
  query_fn = relations.make_query_maps_fn(run.model)
  predictions, confidence = map(np.asarray, query_fn(variables, batch['image'],
                                                     batch['label']))
  predict_fn = jax.jit(functools.partial(steps.predict, run.model, size=(97, 97)))
  agree = predictions == np.asarray(predict_fn(variables, batch['image']))
  assert agree.mean() > 0.999  # separately compiled: near-ties may break differently
  labelled = batch['label'] != 255
  assert (confidence[~labelled] == 0).all() and (confidence[labelled] > 0).all()
  config = run.config
  panels = relations.query_panel_images(config, variables, parallel.shard_batch(mesh, batch),
                                        query_fn)
  assert panels.shape == (config.num_image_summaries, 97, 5 * 97 + 16, 3)


# --------------------------------------------------------------------------- results


def _sweep_module():
  spec = importlib.util.spec_from_file_location('sweep', ROOT / 'launch' / 'sweep.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def fake_run(workdir, *, labels, method, reco, seed, miou, steps_done, total=40000,
             dataset='reco_voc', partial='', split='', **switches):
  """A workdir as the trainer leaves it: config.json and CLU event files."""
  from clu import metric_writers
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True)
  config = dict(dataset=dataset, labels=labels, partial=partial, method=method, reco=reco,
                seed=seed, num_train_steps=total, model=dict(name='deeplabv3p'), split=split,
                **switches)
  (workdir / 'config.json').write_text(json.dumps(config))
  writer = metric_writers.create_default_writer(str(workdir), asynchronous=False)
  for step, value in miou.items():
    writer.write_scalars(step, {'eval/miou': value, 'eval/pixel_accuracy': 0.9})
  writer.write_scalars(steps_done, {'train/loss': 1.0})
  writer.close()
  return workdir


def test_results_put_the_pseudoseg_partition_in_a_table_of_its_own(tmp_path):
  for seed, value in enumerate((0.70, 0.74)):
    fake_run(tmp_path / f'p{seed}', labels=92, method='classmix', reco=True, seed=seed,
             miou={40000: value}, steps_done=40000, split='pseudoseg')
  fake_run(tmp_path / 'plain', labels=92, method='classmix', reco=True, seed=0,
           miou={40000: 0.5}, steps_done=40000)
  tables = results.make_tables(
      [results.load_result(tmp_path / n) for n in ('p0', 'p1', 'plain')])
  titles = sorted(t.title for t in tables)
  assert len(tables) == 2 and any('Table 2' in t for t in titles), titles
  table2 = next(t for t in tables if 'Table 2' in t.title)
  assert sorted(r.seed for r in table2.runs['ReCo + ClassMix', '92 labels']) == [0, 1]
  assert table2.cell('ReCo + ClassMix', '92 labels', 'final').values == pytest.approx(
      [0.70, 0.74])


def test_results_give_unimatch_its_own_rows_in_table2(tmp_path):
  sweep = _sweep_module()
  for i, run in enumerate(sweep.runs(['2', 'unimatch'], ['voc'], [0])):
    args = dict(kv.split('=') for kv in run.config_arg.split(','))
    fake_run(tmp_path / run.subdir, labels=int(args['labels']), method=args['method'],
             reco=args['reco'] == 'True', seed=0, miou={40000: i / 100}, steps_done=40000,
             split='pseudoseg')
  [table] = results.make_tables([results.load_result(r)
                                 for r in results.find_runs([str(tmp_path)])])
  assert 'Table 2' in table.title
  assert sorted(table.rows) == sorted(['Supervised', 'ClassMix', 'ReCo + ClassMix', 'UniMatch',
                                       'UniMatch + ReCo'])
  assert '1464 labels' in table.columns and len(table.runs['UniMatch', '1464 labels']) == 1


def test_results_name_ablation_rows_by_their_switches(tmp_path):
  sweep = _sweep_module()
  grid = sweep.runs(['4', '7c'], ['cityscapes'], [0])
  for i, run in enumerate(grid):
    switches = dict(kv.split('=') for kv in run.config_arg.split(','))
    switches.update(f[len('--config.'):].split('=') for f in run.flags)
    fake_run(tmp_path / run.subdir, labels=20, method='classmix', reco=True, seed=0,
             miou={40000: i / 10}, steps_done=40000, dataset='reco_cityscapes',
             **{k: switches[k] for k in ('query_mode', 'key_mode') if k in switches},
             unlabelled_fraction=float(switches.get('unlabelled_fraction', 1)))
  runs = results.find_runs([str(tmp_path)])
  [table] = results.make_tables([results.load_result(r) for r in runs])
  assert sorted(table.rows) == sorted([
      'ReCo + ClassMix', 'ReCo + ClassMix, random queries', 'ReCo + ClassMix, easy queries',
      'ReCo + ClassMix, random keys', 'ReCo + ClassMix, 25% of the unlabelled images',
      'ReCo + ClassMix, 50% of the unlabelled images',
      'ReCo + ClassMix, 75% of the unlabelled images'])
  assert all(len(runs) == 1 for runs in table.runs.values())  # every cell its own run


def test_results_keep_uniform_subsets_apart_from_class_balanced_ones(tmp_path):
  for name, subset in (('balanced', 'class_balanced'), ('uniform', 'uniform'), ('old', None)):
    switches = {'subset': subset} if subset else {}  # 'old': a config.json before the field
    fake_run(tmp_path / name, labels=20, method='supervised', reco=False, seed=0,
             miou={40000: 0.5}, steps_done=40000, **switches)
  fake_run(tmp_path / 'all', labels=0, method='supervised', reco=False, seed=1,
           miou={40000: 0.5}, steps_done=40000, subset='uniform')
  [table] = results.make_tables(
      [results.load_result(tmp_path / n) for n in ('balanced', 'uniform', 'old', 'all')])
  assert sorted(table.rows) == ['Supervised', 'Supervised, uniform subset']
  assert len(table.runs['Supervised', '20 labels']) == 2
  assert len(table.runs['Supervised', 'all labels']) == 1  # every image: no subset to draw


def test_results_table_means_ranges_and_unfinished_runs(tmp_path, capsys):
  sweep = _sweep_module()
  grid = {(r.dataset, r.name, r.config_arg): r.subdir for r in sweep.table1(['voc'], [0, 1, 2])}
  root = tmp_path / 'runs'

  def subdir(labels, name, method, reco, seed):
    return root / grid[('voc', name, f'labels={labels},method={method},reco={reco},'
                                     f'seed={seed}')]

  # ReCo + ClassMix at 60 labels: seeds 0 and 1 finished (best 0.60 / 0.64, final 0.58 /
  # 0.62); seed 2 stopped at step 20000 (0.50 there).
  fake_run(subdir(60, 'reco_classmix', 'classmix', True, 0), labels=60, method='classmix',
           reco=True, seed=0, miou={20000: 0.55, 30000: 0.60, 40000: 0.58}, steps_done=40000)
  fake_run(subdir(60, 'reco_classmix', 'classmix', True, 1), labels=60, method='classmix',
           reco=True, seed=1, miou={20000: 0.5, 40000: 0.62, 39000: 0.64}, steps_done=40000)
  unfinished = fake_run(subdir(60, 'reco_classmix', 'classmix', True, 2), labels=60,
                        method='classmix', reco=True, seed=2, miou={20000: 0.50},
                        steps_done=20000)
  fake_run(subdir(0, 'supervised', 'supervised', False, 0), labels=0, method='supervised',
           reco=False, seed=0, miou={40000: 0.7}, steps_done=40000)

  runs = results.find_runs([str(root)])
  assert len(runs) == 4
  loaded = [results.load_result(r) for r in runs]
  by_seed = {(r.method, r.seed): r for r in loaded}
  r0 = by_seed[('classmix', 0)]
  assert (r0.best, r0.final, r0.last_step, r0.finished) == (
      pytest.approx(0.60), pytest.approx(0.58), 40000, True)
  assert not by_seed[('classmix', 2)].finished and by_seed[('classmix', 2)].last_step == 20000
  text = results.to_markdown(loaded)
  assert '## Pascal VOC, DeepLabV3+ (Table 1: labelled images)' in text
  lines = text.splitlines()
  assert '| method | 60 labels | all labels |' in lines
  # Best: mean of 60, 64, 50 = 58.00, range 50-64, unfinished run included (*).
  assert '| ReCo + ClassMix | 58.00 (50.00-64.00)* | - |' in lines
  # Final: mean of 58, 62, 50 = 56.67.
  assert '| ReCo + ClassMix | 56.67 (50.00-62.00)* | - |' in lines
  assert '| Supervised | - | 70.00 (1 seed) |' in lines
  assert f'- {unfinished}: step 20000 of 40000' in lines
  csv_text = results.to_csv(loaded)
  assert csv_text.count('\n') == 5 and ',0.640000,0.620000,40000,40000,True' in csv_text
  # The command line on the sweep root, as the sweep's own message says.
  out = subprocess.run([sys.executable, '-m', 'reco_jax.results', str(root)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=ENV)
  assert out.returncode == 0, out.stderr
  assert '58.00 (50.00-64.00)*' in out.stdout
  assert not (root / 'results.md').exists()  # A file only when asked for.
  # --output, through the tool's main in this process.
  table = tmp_path / 'tables' / 'voc.md'
  with tool_flags(results, str(root), f'--output={table}') as argv:
    results.main(argv)
  assert table.read_text().startswith('# Results')
  assert f'Wrote {table} (4 runs).' in capsys.readouterr().out
  with tool_flags(results, str(root), f'--output={tmp_path}') as argv:
    with pytest.raises(SystemExit) as exit_info:
      results.main(argv)
  assert exit_info.value.code == 2 and 'is a directory' in capsys.readouterr().err
  sweep_out = subprocess.run([sys.executable, str(ROOT / 'launch' / 'sweep.py'), '--dry-run',
                              '--tables=1', '--datasets=voc', f'--workdir_root={root}'],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
  assert f'python -m reco_jax.results {root}' in sweep_out.stderr


# --------------------------------------------------------------------------- bad input


def test_bad_input_errors_name_what_was_expected(toy_run, tmp_path):
  _, workdir, _ = toy_run
  with pytest.raises(FileNotFoundError, match=r'has no config\.json.*reco_jax\.main'):
    workdir_lib.read_config(tmp_path)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    workdir_lib.read_config(tmp_path / 'missing')
  bare = tmp_path / 'bare'
  bare.mkdir()
  (bare / 'config.json').write_text((workdir / 'config.json').read_text())
  with pytest.raises(FileNotFoundError, match=r'has no checkpoints.*checkpoints_best'):
    workdir_lib.find_checkpoint(bare)
  with pytest.raises(ValueError, match=r"Unknown checkpoint 'newest'.*best, latest.*\[2, 4\]"):
    workdir_lib.find_checkpoint(workdir, 'newest')
  with pytest.raises(ValueError, match=r'no checkpoint of step 3.*\[2, 4\]'):
    workdir_lib.find_checkpoint(workdir, '3')
  with pytest.raises(FileNotFoundError, match=r'matches no image files.*--images'):
    predict.find_images([str(tmp_path / '*.png')])
  with pytest.raises(FileNotFoundError, match='matches no run.*config.json'):
    results.find_runs([str(tmp_path / 'nothing*')])
  with pytest.raises(ValueError, match='expected R .* Z .* or both'):
    relations.parse_embedding('W')
  with pytest.raises(ValueError, match='Cannot override config.data_dirr'):
    workdir_lib.load_run(workdir, 'latest', overrides={'data_dirr': 'x'})


@contextlib.contextmanager
def tool_flags(module, *args):
  """The tool's flags defined and parsed from `args` for one in-process call of its main."""
  before = set(flags.FLAGS)
  module.define_flags()
  added = set(flags.FLAGS) - before
  try:
    yield flags.FLAGS([module.__name__, *args])
  finally:
    for name in added:
      delattr(flags.FLAGS, name)


def test_main_functions(toy_run, tmp_path, capsys):
  _, workdir, _ = toy_run
  events = helpers.logged_scalars(workdir)
  with tool_flags(evaluate, f'--workdir={workdir}', '--checkpoint=latest',
                  f'--output={tmp_path / "latest.md"}') as argv:
    evaluate.main(argv)
  printed = capsys.readouterr().out
  assert 'checkpoint: step 4' in printed
  assert f'mIoU: {100 * events["eval/miou"][4]:.2f} %' in printed
  assert (tmp_path / 'latest.md').exists() and (tmp_path / 'latest_confusion.png').exists()
  # Bad input ends a tool with its message alone (exit status 2), not a traceback.
  for module, args, message in (
      (predict, [f'--images={tmp_path / "none" / "*.png"}', f'--out={tmp_path}'],
       'matches no image files'),
      (relations, ['--embedding=W', f'--out={tmp_path}'], 'expected R')):
    with tool_flags(module, f'--workdir={workdir}', *args) as argv:
      with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
  # A bad destination is found before any model loads (the workdir here has none).
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'a.png')
  taken = tmp_path / 'taken.txt'
  taken.write_text('the user\'s file')
  for module, args, message in (
      (predict, [f'--images={tmp_path / "a.png"}', f'--out={taken}'], 'is a file'),
      (evaluate, [f'--output={tmp_path}'], 'is a directory')):
    with tool_flags(module, f'--workdir={tmp_path / "no_run"}', *args) as argv:
      with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
  assert taken.read_text() == "the user's file"


def test_a_destination_that_cannot_be_written_is_refused_first(tmp_path, monkeypatch, capsys):
  # As root, permissions do not refuse a write: the refusal is made where the tools write.
  locked = tmp_path / 'locked'
  locked.mkdir()
  path_type = type(epath.Path(locked))
  write_text = path_type.write_text

  def refuse_in_locked(self, *args, **kwargs):
    if pathlib.Path(self).parent == locked:
      raise PermissionError(13, 'Permission denied', str(self))
    return write_text(self, *args, **kwargs)

  monkeypatch.setattr(path_type, 'write_text', refuse_in_locked)
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'a.png')
  for module, args, given in (
      (predict, [f'--images={tmp_path / "a.png"}', f'--out={locked}'], f'--out={locked}'),
      (evaluate, [f'--output={locked / "t.md"}'], f'--output={locked / "t.md"}')):
    with tool_flags(module, f'--workdir={tmp_path / "no_run"}', *args) as argv:
      with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 2
    assert f'{given}: cannot write in {locked} (PermissionError' in capsys.readouterr().err
  assert not list(locked.iterdir())


def test_tools_define_no_flags_on_import():
  # The trainer may import relations and viz: the tools' flags must not clash with its own.
  for module in (evaluate, predict, relations, results):
    assert not flags.FLAGS.get_flags_for_module(module.__name__)


def test_palettes():
  voc = viz.dataset_palette('reco_voc')
  np.testing.assert_array_equal(voc, viz.voc_palette())
  city = viz.dataset_palette('reco_cityscapes')
  np.testing.assert_array_equal(city[0], [128, 64, 128])  # road
  np.testing.assert_array_equal(city[18], [119, 11, 32])  # bicycle
  np.testing.assert_array_equal(city[255], voc[255])
  assert len({tuple(c) for c in city[:19]}) == 19
  image = np.full((2, 2, 3), 100, np.uint8)
  np.testing.assert_array_equal(viz.overlay(image, np.ones((2, 2), np.int32), alpha=0.5)[0, 0],
                                [114, 50, 50])
  with pytest.raises(ValueError, match='must be \\[H, W\\]'):
    viz.overlay(image, np.ones((3, 2), np.int32))

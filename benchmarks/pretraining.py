"""Does label-based contrastive pretraining (Zhao et al.) help on the toy? And what does it cost?

Runs the toy config through the project's own entry point (`train.train_and_evaluate`, the
function `python -m reco_jax.main` calls) at a few-label budget: supervised training with and
without within-image pretraining, for each seed; every pair of runs of a seed sees the same
labelled subset. Reports the mean and the range over seeds of the final eval mIoU (the mean of
the last `--last` evaluations, which damps the noise of a single evaluation), the per-seed
differences, and the time of a pretraining step relative to a supervised step (the same images
per step; timed on jitted steps after compilation). Writes benchmarks/results/pretraining.md.

  PYTHONPATH=. python benchmarks/pretraining.py                  # 3 seeds, 50 labels
  PYTHONPATH=. python benchmarks/pretraining.py --quick          # 1 seed, short schedule
"""
import argparse
import datetime
import os
import pathlib
import platform
import sys
import tempfile
import time

import jax
import numpy as np

from configs import toy
from reco_jax import parallel
from reco_jax import results
from reco_jax import stages
from reco_jax import state as state_lib
from reco_jax import steps
from reco_jax import train
from reco_jax import methods

_OUT = pathlib.Path(__file__).resolve().parent / 'results' / 'pretraining.md'


def _config(labels: int, seed: int, pretrain: str, args):
  # One subset rule for both runs of a seed (pretraining alone would default to uniform).
  c = toy.get_config(f'labels={labels},method=supervised,pretrain={pretrain},seed={seed},'
                     'subset=class_balanced')
  if args.steps:
    c.num_train_steps = args.steps
    c.eval_every_steps = max(1, args.steps // 3)
    c.checkpoint_every_steps = c.eval_every_steps
  if args.pretrain_steps:
    c.pretrain_steps = args.pretrain_steps
  if args.data_dir:
    c.data_dir = args.data_dir
  return c


def final_miou(workdir: pathlib.Path, last: int) -> float:
  """Mean of the last `last` logged eval mIoUs of a run's final model."""
  miou = results.load_result(workdir).miou
  return float(np.mean([miou[s] for s in sorted(miou)[-last:]]))


def step_seconds(config, kind: str, repeats: int = 20) -> float:
  """Seconds per jitted step of a stage of `config` on random toy-sized batches."""
  stage = [s for s in stages.plan(config) if s.kind == kind][0]
  model, method = methods.stage_model(stage)
  mesh = parallel.make_mesh()
  state = state_lib.create_train_state(stage.config, model, jax.random.key(0),
                                       (*stage.config.crop_size, 3), mesh=mesh)
  rng = np.random.default_rng(0)
  n = 2 * stage.config.batch_size
  size = tuple(stage.config.crop_size)
  batch = parallel.shard_batch(mesh, {'labelled': {
      'image': rng.normal(size=(n, *size, 3)).astype(np.float32),
      'label': rng.integers(0, stage.config.num_classes, (n, *size)).astype(np.int32)}})
  step = steps.make_train_step(stage.config, model, mesh, method=method)
  key = jax.random.key(1)
  state, metrics = step(state, batch, key)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(repeats):
    state, metrics = step(state, batch, key)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / repeats


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--labels', type=int, default=50)
  parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  parser.add_argument('--steps', type=int, default=0, help='training steps (0: the config)')
  parser.add_argument('--pretrain_steps', type=int, default=0, help='0: the config')
  parser.add_argument('--last', type=int, default=2, help='evaluations averaged per run')
  parser.add_argument('--data_dir', default='')
  parser.add_argument('--workdir', default='', help='default: a temporary directory')
  parser.add_argument('--quick', action='store_true', help='1 seed, 300 + 100 steps')
  args = parser.parse_args()
  if args.quick:
    args.seeds, args.steps, args.pretrain_steps, args.last = [0], 300, 100, 1
  root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix='pretraining_'))
  began = time.time()
  load = os.getloadavg()[0]
  rows = {}
  for pretrain in ('none', 'within'):
    for seed in args.seeds:
      workdir = root / f'{pretrain}_seed{seed}'
      train.train_and_evaluate(_config(args.labels, seed, pretrain, args), str(workdir))
      rows.setdefault(pretrain, []).append(final_miou(workdir, args.last))
  config = _config(args.labels, 0, 'within', args)
  supervised_s = step_seconds(config, stages.TRAIN)
  pretrain_s = step_seconds(config, stages.PRETRAIN)
  total = time.time() - began

  def cell(values):
    v = 100 * np.asarray(values)
    return f'{v.mean():.1f} ({v.min():.1f}-{v.max():.1f})'

  diffs = 100 * (np.asarray(rows['within']) - np.asarray(rows['none']))
  c = _config(args.labels, 0, 'within', args)
  lines = [
      '# Contrastive pretraining on the toy',
      '',
      f'`PYTHONPATH=. python benchmarks/pretraining.py {" ".join(sys.argv[1:])}` on '
      f'{datetime.date.today()}, {platform.machine()} with {os.cpu_count()} CPU cores, load '
      f'{load:.1f} at the start; {total / 60:.0f} min in all.',
      '',
      f'Toy, {args.labels} labelled images, supervised training for {c.num_train_steps} '
      f'steps, with or without {c.pretrain_steps} steps of within-image pretraining before; '
      f'final eval mIoU (%, the mean of the last {args.last} evaluations of each run), mean '
      f'and range over seeds {args.seeds}:',
      '',
      '| | mIoU |',
      '|---|---|',
      f'| Supervised | {cell(rows["none"])} |',
      f'| Supervised, within-image pretraining | {cell(rows["within"])} |',
      '',
      f'Per-seed difference (pretraining - none, points): '
      f'{", ".join(f"{d:+.1f}" for d in diffs)}.',
      '',
      f'Step time ({2 * c.batch_size} images of {c.crop_size[0]}x{c.crop_size[1]}, jitted): '
      f'supervised {supervised_s * 1000:.0f} ms, pretraining {pretrain_s * 1000:.0f} ms '
      f'(x{pretrain_s / supervised_s:.2f}).',
      '',
  ]
  _OUT.parent.mkdir(parents=True, exist_ok=True)
  _OUT.write_text('\n'.join(lines))
  print('\n'.join(lines))


if __name__ == '__main__':
  main()

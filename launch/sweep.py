"""Runs (or prints) the experiment grids of the ReCo paper's Tables 1, 2 and 3.

Table 1 (labelled subsets, DeepLabV3+): for each dataset and number of labels, Supervised,
S4GAN, ClassMix and ReCo + ClassMix; with all labels, Supervised and ReCo + Supervised.
Table 2 (VOC, the PseudoSeg partition: 92, 183, 366 or 732 labelled images of the 1,464 of the
original train list, the rest of train_aug unlabelled): the same three methods.
Table 3 (partial labels: 1 pixel, 1%, 5%, 25% per class): ReCo + ClassMix on VOC and Cityscapes.
Every cell is run for seeds 0, 1, 2 (the paper reports the mean).

  python launch/sweep.py --dry-run                       # print every command
  python launch/sweep.py --tables=1 --datasets=voc --workdir_root=gs://bucket/reco \
      --launcher=tpu --tpu_name=my-tpu --zone=us-central2-b   # run them one after another
Runs resume from their own workdir, so re-running the sweep skips over finished work cheaply.
Workdirs: WORKDIR_ROOT/table1/DATASET/LABELS/METHOD/seedS (LABELS = 'all' for labels=0) and
WORKDIR_ROOT/table2/voc/LABELS/METHOD/seedS and
WORKDIR_ROOT/table3/DATASET/PARTIAL/reco_classmix/seedS. Their results tables, in the paper's
layout: python -m reco_jax.results WORKDIR_ROOT
"""
import argparse
from collections.abc import Iterator, Sequence
import dataclasses
import pathlib
import shlex
import subprocess
import sys

from reco_jax import names

LABELS = {'voc': (60, 200, 600, 0), 'cityscapes': (20, 50, 150, 0), 'sun': (50, 150, 500, 0)}
PARTIALS = names.PARTIALS[1:]  # every partial-label mode
PARTIAL_DATASETS = ('voc', 'cityscapes')
PSEUDOSEG_LABELS = (92, 183, 366, 732)  # 1/16, 1/8, 1/4, 1/2 of VOC's 1,464 train images
SEEDS = (0, 1, 2)
_REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# (name, method, reco) of the rows run on labelled subsets (Tables 1 and 2) and on all labels.
SUBSET_METHODS = (('supervised', 'supervised', False), ('classmix', 'classmix', False),
                  ('reco_classmix', 'classmix', True))
# Table 1 also has the S4GAN baseline on each labelled subset.
TABLE1_SUBSET_METHODS = SUBSET_METHODS + (('s4gan', 's4gan', False),)
ALL_LABEL_METHODS = (('supervised', 'supervised', False),
                     ('reco_supervised', 'supervised', True))


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a table: its config argument and its workdir below the root."""
  table: int
  dataset: str
  name: str
  config_arg: str
  subdir: str

  @property
  def config(self) -> str:
    return f'configs/{self.dataset}.py:{self.config_arg}'


def table1(datasets: Sequence[str], seeds: Sequence[int]) -> Iterator[Run]:
  for dataset in datasets:
    for labels in LABELS[dataset]:
      methods = ALL_LABEL_METHODS if labels == 0 else TABLE1_SUBSET_METHODS
      label_name = 'all' if labels == 0 else f'{labels}'
      for name, method, reco in methods:
        for seed in seeds:
          arg = f'labels={labels},method={method},reco={reco},seed={seed}'
          yield Run(1, dataset, name, arg, f'table1/{dataset}/{label_name}/{name}/seed{seed}')


def table3(datasets: Sequence[str], seeds: Sequence[int]) -> Iterator[Run]:
  for dataset in datasets:
    if dataset not in PARTIAL_DATASETS:
      continue
    for partial in PARTIALS:
      for seed in seeds:
        arg = f'partial={partial},method=classmix,reco=True,seed={seed}'
        yield Run(3, dataset, 'reco_classmix', arg,
                  f'table3/{dataset}/{partial}/reco_classmix/seed{seed}')


def table2(datasets: Sequence[str], seeds: Sequence[int]) -> Iterator[Run]:
  """VOC in the PseudoSeg partition: 1/16 .. 1/2 of the 1,464 original train images."""
  if 'voc' not in datasets:
    return
  for labels in PSEUDOSEG_LABELS:
    for name, method, reco in SUBSET_METHODS:
      for seed in seeds:
        arg = f'split=pseudoseg,labels={labels},method={method},reco={reco},seed={seed}'
        yield Run(2, 'voc', name, arg, f'table2/voc/{labels}/{name}/seed{seed}')


def runs(tables: Sequence[int], datasets: Sequence[str], seeds: Sequence[int]) -> list[Run]:
  """Every run of the chosen tables, datasets and seeds, in table order."""
  out = []
  if 1 in tables:
    out.extend(table1(datasets, seeds))
  if 2 in tables:
    out.extend(table2(datasets, seeds))
  if 3 in tables:
    out.extend(table3(datasets, seeds))
  return out


def command(run: Run, args: argparse.Namespace) -> list[str]:
  """The command line that trains `run` with the chosen launcher."""
  workdir = f'{args.workdir_root.rstrip("/")}/{run.subdir}'
  extra = list(args.extra)
  if args.launcher == 'tpu':
    return ['launch/tpu_pod.sh', args.tpu_name, args.zone, run.config, workdir] + extra
  return [args.python, '-m', 'reco_jax.main',
          f'--config={run.config}', f'--workdir={workdir}'] + extra


def _int_list(text: str) -> list[int]:
  try:
    return [int(x) for x in text.split(',') if x]
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected comma-separated integers, got {text!r}')


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--dry-run', action='store_true', help='print the commands, run nothing')
  p.add_argument('--tables', type=_int_list, default=[1, 2, 3], help='tables to run: 1,2,3')
  p.add_argument('--datasets', default='voc,cityscapes,sun',
                 help='comma-separated subset of voc,cityscapes,sun')
  p.add_argument('--seeds', type=_int_list, default=list(SEEDS))
  p.add_argument('--workdir_root', default='runs', help='local dir or gs:// bucket path')
  p.add_argument('--launcher', choices=('local', 'tpu'), default='local')
  p.add_argument('--tpu_name', help='TPU VM name (launcher tpu)')
  p.add_argument('--zone', help='TPU zone (launcher tpu)')
  p.add_argument('--python', default='python3', help='Python for the local launcher')
  p.add_argument('extra', nargs='*', help='extra flags for reco_jax.main (after --)')
  args = p.parse_args(argv)
  args.datasets = [d for d in args.datasets.split(',') if d]
  bad = sorted(set(args.datasets) - set(LABELS))
  if bad:
    p.error(f'unknown datasets {bad}; expected a subset of {sorted(LABELS)}')
  bad = sorted(set(args.tables) - {1, 2, 3})
  if bad:
    p.error(f'unknown tables {bad}; expected some of 1, 2, 3')
  if args.launcher == 'tpu' and not (args.tpu_name and args.zone):
    p.error('--launcher=tpu needs --tpu_name and --zone')
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  grid = runs(args.tables, args.datasets, args.seeds)
  for run in grid:
    cmd = command(run, args)
    print(shlex.join(cmd), flush=True)
    if not args.dry_run:
      subprocess.run(cmd, check=True, cwd=_REPO_ROOT)
  root = args.workdir_root.rstrip('/')
  print(f'# {len(grid)} runs, workdirs under {root}/ '
        '(table1/DATASET/LABELS/METHOD/seedS, table3/DATASET/PARTIAL/METHOD/seedS)',
        file=sys.stderr)
  print(f'# results tables: python -m reco_jax.results {shlex.quote(root)}', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())

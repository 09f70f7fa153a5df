"""Runs (or prints) the experiment grids of the ReCo paper's Tables 1-4 and Fig. 7.

Table 1 (labelled subsets, DeepLabV3+): for each dataset and number of labels, Supervised,
S4GAN, ClassMix and ReCo + ClassMix; with all labels, Supervised and ReCo + Supervised.
Table 2 (VOC, the PseudoSeg partition: 92, 183, 366 or 732 labelled images of the 1,464 of the
original train list, the rest of train_aug unlabelled): the same three methods.
Table 3 (partial labels: 1 pixel, 1%, 5%, 25% per class): ReCo + ClassMix on VOC and Cityscapes.
Table 4 (ReCo's sampling ablation, section 4.4): ReCo + ClassMix with hard queries and active
keys, random queries, easy queries, random keys, at each dataset's fewest labels.
Fig. 7c (the amount of unlabelled data): ReCo + ClassMix on a seeded fraction of the unlabelled
images (`unlabelled_fraction`), at each dataset's fewest labels.
Fig. 7d (ReCo on other semi-supervised bases): each base with and without ReCo, at each
dataset's fewest labels.
unimatch (beyond the paper): UniMatch and UniMatch + ReCo on Table 2's VOC partition, at 92 to
1,464 labels (UniMatch's own VOC settings, reco_jax/methods/unimatch.py).
Every cell is run for seeds 0, 1, 2 (the paper reports the mean).

  python launch/sweep.py --dry-run                       # print every command
  python launch/sweep.py --dry-run --tables=4,7c,7d --datasets=cityscapes   # the ablations
  python launch/sweep.py --tables=1 --datasets=voc --workdir_root=gs://bucket/reco \
      --launcher=tpu --tpu_name=my-tpu --zone=us-central2-b   # run them one after another
Runs resume from their own workdir, so re-running the sweep skips over finished work cheaply.
Workdirs: WORKDIR_ROOT/table1/DATASET/LABELS/METHOD/seedS (LABELS = 'all' for labels=0) and
WORKDIR_ROOT/table2/voc/LABELS/METHOD/seedS (the unimatch grid's too) and
WORKDIR_ROOT/table3/DATASET/PARTIAL/reco_classmix/seedS and
WORKDIR_ROOT/{table4,fig7c,fig7d}/DATASET/LABELS/NAME/seedS. Their results tables, in the
paper's layout (ablation rows named by their switches, e.g. 'ReCo + ClassMix, random keys'):
python -m reco_jax.results WORKDIR_ROOT
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
# UniMatch reports the whole 1,464 as well.
UNIMATCH_LABELS = PSEUDOSEG_LABELS + (1464,)
UNIMATCH_METHODS = (('unimatch', 'unimatch', False), ('unimatch_reco', 'unimatch', True))
SEEDS = (0, 1, 2)
_REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# (name, method, reco) of the rows run on labelled subsets (Tables 1 and 2) and on all labels.
SUBSET_METHODS = (('supervised', 'supervised', False), ('classmix', 'classmix', False),
                  ('reco_classmix', 'classmix', True))
# Table 1 also has the S4GAN baseline on each labelled subset.
TABLE1_SUBSET_METHODS = SUBSET_METHODS + (('s4gan', 's4gan', False),)
ALL_LABEL_METHODS = (('supervised', 'supervised', False),
                     ('reco_supervised', 'supervised', True))
# Table 4: (name, `--config.` overrides) of ReCo + ClassMix's sampling variants.
SAMPLING_VARIANTS = (('reco_classmix', ()),
                     ('random_queries', ('--config.query_mode=random',)),
                     ('easy_queries', ('--config.query_mode=easy',)),
                     ('random_keys', ('--config.key_mode=random',)))
# Fig. 7c: fractions of the unlabelled images; Fig. 7d: the bases ReCo is added to.
UNLABELLED_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
FIG7D_BASES = ('supervised', 'cutout', 'cutmix', 'classmix', 's4gan')
TABLES = ('1', '2', '3', '4', '7c', '7d', 'unimatch')


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a table: its config argument and its workdir below the root."""
  table: str
  dataset: str
  name: str
  config_arg: str
  subdir: str
  flags: tuple[str, ...] = ()  # `--config.` overrides

  @property
  def config(self) -> str:
    return f'configs/{self.dataset}.py:{self.config_arg}'


def _table1_subdir(dataset: str, labels: int, name: str, seed: int) -> str:
  return f'table1/{dataset}/{labels or "all"}/{name}/seed{seed}'


def table1(datasets: Sequence[str], seeds: Sequence[int]) -> Iterator[Run]:
  for dataset in datasets:
    for labels in LABELS[dataset]:
      methods = ALL_LABEL_METHODS if labels == 0 else TABLE1_SUBSET_METHODS
      for name, method, reco in methods:
        for seed in seeds:
          arg = f'labels={labels},method={method},reco={reco},seed={seed}'
          yield Run('1', dataset, name, arg, _table1_subdir(dataset, labels, name, seed))


def table3(datasets: Sequence[str], seeds: Sequence[int]) -> Iterator[Run]:
  for dataset in datasets:
    if dataset not in PARTIAL_DATASETS:
      continue
    for partial in PARTIALS:
      for seed in seeds:
        arg = f'partial={partial},method=classmix,reco=True,seed={seed}'
        yield Run('3', dataset, 'reco_classmix', arg,
                  f'table3/{dataset}/{partial}/reco_classmix/seed{seed}')


def table2(datasets: Sequence[str], seeds: Sequence[int], *, table: str = '2',
           budgets: Sequence[int] = PSEUDOSEG_LABELS,
           rows: Sequence[tuple[str, str, bool]] = SUBSET_METHODS) -> Iterator[Run]:
  """VOC in the PseudoSeg partition: 1/16 .. 1/2 of the 1,464 original train images."""
  if 'voc' not in datasets:
    return
  for labels in budgets:
    for name, method, reco in rows:
      for seed in seeds:
        arg = f'split=pseudoseg,labels={labels},method={method},reco={reco},seed={seed}'
        yield Run(table, 'voc', name, arg, f'table2/voc/{labels}/{name}/seed{seed}')


def unimatch(datasets: Sequence[str], seeds: Sequence[int]) -> Iterator[Run]:
  """UniMatch and UniMatch + ReCo in Table 2's partition, up to all 1,464 images."""
  return table2(datasets, seeds, table='unimatch', budgets=UNIMATCH_LABELS,
                rows=UNIMATCH_METHODS)


def table4(datasets: Sequence[str], seeds: Sequence[int]) -> Iterator[Run]:
  """ReCo's query and key sampling ablation, on ReCo + ClassMix at the fewest labels."""
  for dataset in datasets:
    labels = LABELS[dataset][0]
    for name, flags in SAMPLING_VARIANTS:
      for seed in seeds:
        arg = f'labels={labels},method=classmix,reco=True,seed={seed}'
        subdir = (f'table4/{dataset}/{labels}/{name}/seed{seed}' if flags else
                  _table1_subdir(dataset, labels, name, seed))  # Table 1's own cell
        yield Run('4', dataset, name, arg, subdir, flags)


def fig7c(datasets: Sequence[str], seeds: Sequence[int]) -> Iterator[Run]:
  """ReCo + ClassMix on a fraction of the unlabelled images, at the fewest labels."""
  for dataset in datasets:
    labels = LABELS[dataset][0]
    for fraction in UNLABELLED_FRACTIONS:
      name = f'unlabelled{fraction:g}'
      for seed in seeds:
        arg = (f'labels={labels},method=classmix,reco=True,unlabelled_fraction={fraction:g},'
               f'seed={seed}')
        subdir = (f'fig7c/{dataset}/{labels}/{name}/seed{seed}' if fraction < 1 else
                  _table1_subdir(dataset, labels, 'reco_classmix', seed))
        yield Run('7c', dataset, name, arg, subdir)


def fig7d(datasets: Sequence[str], seeds: Sequence[int]) -> Iterator[Run]:
  """Each semi-supervised base with and without ReCo, at the fewest labels."""
  for dataset in datasets:
    labels = LABELS[dataset][0]
    for base in FIG7D_BASES:
      for reco in (False, True):
        name = f'reco_{base}' if reco else base
        in_table1 = (name, base, reco) in TABLE1_SUBSET_METHODS
        for seed in seeds:
          arg = f'labels={labels},method={base},reco={reco},seed={seed}'
          subdir = (_table1_subdir(dataset, labels, name, seed) if in_table1 else
                    f'fig7d/{dataset}/{labels}/{name}/seed{seed}')
          yield Run('7d', dataset, name, arg, subdir)


_GRIDS = {'1': table1, '2': table2, '3': table3, '4': table4, '7c': fig7c, '7d': fig7d,
          'unimatch': unimatch}


def runs(tables: Sequence[str], datasets: Sequence[str], seeds: Sequence[int]) -> list[Run]:
  """Every run of the chosen grids, datasets and seeds, in the order of `TABLES`.

  A cell that is also a Table 1 cell (the unablated ReCo + ClassMix of Table 4, all unlabelled
  images in Fig. 7c, Table 1's methods in Fig. 7d) is that run, in Table 1's workdir, listed once.
  """
  out = {}
  for table in TABLES:
    if table in tables:
      for run in _GRIDS[table](datasets, seeds):
        out.setdefault(run.subdir, run)
  return list(out.values())


def command(run: Run, args: argparse.Namespace) -> list[str]:
  """The command line that trains `run` with the chosen launcher."""
  workdir = f'{args.workdir_root.rstrip("/")}/{run.subdir}'
  extra = [*run.flags, *args.extra]
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
  p.add_argument('--tables', default=','.join(TABLES),
                 help=f'comma-separated grids to run, some of {",".join(TABLES)} (7c, 7d: '
                 'Fig. 7)')
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
  args.tables = [t for t in args.tables.split(',') if t]
  bad = sorted(set(args.tables) - set(TABLES))
  if bad:
    p.error(f'unknown tables {bad}; expected some of {", ".join(TABLES)}')
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
  print(f'# {len(grid)} runs, workdirs under {root}/ (table1/DATASET/LABELS/METHOD/seedS, '
        'table3/DATASET/PARTIAL/METHOD/seedS, ...)', file=sys.stderr)
  print(f'# results tables: python -m reco_jax.results {shlex.quote(root)}', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())

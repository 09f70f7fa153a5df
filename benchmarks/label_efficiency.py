"""Label efficiency on the toy: supervised, ClassMix and ReCo + ClassMix over label budgets.

Every run goes through the project's entry point, `python -m reco_jax.main
--config=configs/toy.py:...` (the README's main job and its budget), into
`WORKDIR/<method>_l<labels>_s<seed>`; a run already finished there is read, not redone, so a
killed benchmark continues where it stopped. For one seed every method trains on the same
labelled subset (the subset depends on the seed and the budget only), so per-seed differences
between methods are paired comparisons. The score of a run is the mean of its last `--last`
evaluations (500 validation images each), which damps the noise of a single evaluation.

Writes benchmarks/results/label_efficiency.md (mean and range over seeds per method and budget,
the per-seed differences, the all-labels reference, the Table 4 ablation) and
benchmarks/results/label_efficiency.png (mIoU against labelled images, range as error bars).

  PYTHONPATH=. python benchmarks/label_efficiency.py --jobs 2           # everything, 3 seeds
  PYTHONPATH=. python benchmarks/label_efficiency.py --quick            # 1 seed, 1 budget
  PYTHONPATH=. python benchmarks/label_efficiency.py --parts core,all   # a subset of the grid
"""
import argparse
import concurrent.futures
import dataclasses
import datetime
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow is imported
from configs import toy as toy_config  # pylint: disable=g-import-not-at-top
from reco_jax import results  # pylint: disable=g-import-not-at-top
from reco_jax.data import base

_HERE = pathlib.Path(__file__).resolve().parent
_OUT = _HERE / 'results' / 'label_efficiency'


@dataclasses.dataclass(frozen=True)
class Method:
  """A row of the results: the config argument and `--config.` overrides of its runs."""
  name: str
  key: str
  arg: str
  flags: tuple[str, ...] = ()


CORE = (Method('Supervised', 'supervised', 'method=supervised,reco=False'),
        Method('ClassMix', 'classmix', 'method=classmix,reco=False'),
        Method('ReCo + ClassMix', 'reco_classmix', 'method=classmix,reco=True'))
EXTRA = {
    'pretrain': (Method('Supervised, within-image pretraining', 'supervised_pretrain',
                        'method=supervised,pretrain=within'),),
    's4gan': (Method('S4GAN', 's4gan', 'method=s4gan,reco=False'),),
    # The ReCo paper's Table 4 (sampling ablation), on ReCo + ClassMix.
    'ablation': (
        Method('ReCo + ClassMix, random queries', 'reco_random_queries',
               'method=classmix,reco=True', ('--config.query_mode=random',)),
        Method('ReCo + ClassMix, easy queries', 'reco_easy_queries',
               'method=classmix,reco=True', ('--config.query_mode=easy',)),
        Method('ReCo + ClassMix, random keys', 'reco_random_keys',
               'method=classmix,reco=True', ('--config.key_mode=random',))),
}
PARTS = ('core', 'all', *EXTRA)
# The runs evaluate twice as often as the main job, so that the mean of their last evaluations
# is taken near the end of the schedule.
EVAL_EVERY = 250
ALL_LABELS = Method('Supervised, all 2,000 labels', 'supervised_all', 'method=supervised,reco=False')


@dataclasses.dataclass(frozen=True)
class Run:
  method: Method
  labels: int
  seed: int

  @property
  def name(self) -> str:
    return f'{self.method.key}_l{self.labels}_s{self.seed}'


def _command(run: Run, root: pathlib.Path, data_dir: str) -> list[str]:
  command = [sys.executable, '-m', 'reco_jax.main',
             f'--config=configs/toy.py:labels={run.labels},seed={run.seed},{run.method.arg}',
             f'--workdir={root / run.name}', f'--config.eval_every_steps={EVAL_EVERY}',
             *run.method.flags]
  if data_dir:
    command.append(f'--config.data_dir={data_dir}')
  return command


def _finished(workdir: pathlib.Path) -> bool:
  try:
    result = results.load_result(workdir)
  except (FileNotFoundError, ValueError):
    return False
  return result.last_step >= result.num_train_steps and bool(result.miou)


def _execute(run: Run, root: pathlib.Path, data_dir: str, cpus: list[int] | None) -> float:
  """Trains `run` (unless finished) and returns its wall time in seconds (0 when reused)."""
  workdir = root / run.name
  timing = root / f'{run.name}.seconds'
  if _finished(workdir):
    return float(timing.read_text()) if timing.exists() else 0.0
  began = time.time()
  log = root / f'{run.name}.log'
  preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
  with open(log, 'w') as out:
    status = subprocess.run(_command(run, root, data_dir), stdout=out, stderr=subprocess.STDOUT,
                            cwd=_HERE.parent, preexec_fn=preexec, check=False).returncode
  if status:
    raise RuntimeError(f'{run.name} failed (exit {status}); its output is in {log}.')
  seconds = time.time() - began
  timing.write_text(f'{seconds:.0f}\n')
  return seconds


def score(workdir: pathlib.Path, last: int) -> float:
  """Mean of the last `last` eval mIoUs of a finished run."""
  miou = results.load_result(workdir).miou
  return float(np.mean([miou[s] for s in sorted(miou)[-last:]]))


def _shown(argv: list[str]) -> list[str]:
  """The command-line arguments without the machine's own paths (after `=` or a space)."""
  shown, skip = [], False
  for a in argv:
    if not skip and not a.startswith(('--data_dir', '--workdir')):
      shown.append(a)
    skip = a in ('--data_dir', '--workdir')
  return shown


def _cell(values) -> str:
  v = 100 * np.asarray(values)
  if len(v) == 1:
    return f'{v[0]:.1f}'
  return f'{v.mean():.1f} ({v.min():.1f}-{v.max():.1f})'


def _plot(scores, methods, budgets, path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for method in methods:
    xs = [b for b in budgets if (method.key, b) in scores]
    if not xs:
      continue
    v = [100 * np.asarray(scores[method.key, b]) for b in xs]
    mean = np.array([x.mean() for x in v])
    err = np.array([[m - x.min() for m, x in zip(mean, v)], [x.max() - m for m, x in zip(mean, v)]])
    ax.errorbar(xs, mean, yerr=err, marker='o', capsize=4, label=method.name)
  if (ALL_LABELS.key, 0) in scores:
    ax.axhline(100 * np.mean(scores[ALL_LABELS.key, 0]), color='grey', ls='--',
               label=ALL_LABELS.name)
  ax.set_xlabel('labelled images')
  ax.set_ylabel('eval mIoU (%)')
  ax.set_xticks(budgets)
  ax.set_title('reco_toy: mean and range over seeds')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--budgets', type=int, nargs='+', default=[30, 100])
  parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  parser.add_argument('--parts', default=','.join(PARTS),
                      help=f'comma-separated parts of the grid, run in this order: '
                      f'{", ".join(PARTS)} (the extras and the ablation run at the first budget; '
                      'all = supervised on every label)')
  parser.add_argument('--last', type=int, default=2, help='evaluations averaged per run')
  parser.add_argument('--jobs', type=int, default=1,
                      help='runs at a time, each pinned to its own share of the CPU cores')
  parser.add_argument('--data_dir', default='')
  parser.add_argument('--workdir', default='', help='default: a temporary directory')
  parser.add_argument('--quick', action='store_true', help='1 seed, 1 budget, core methods')
  args = parser.parse_args()
  parts = args.parts.split(',')
  if unknown := set(parts) - set(PARTS):
    parser.error(f'unknown --parts {sorted(unknown)}; expected some of {", ".join(PARTS)}')
  if args.quick:
    args.seeds, args.budgets, parts = args.seeds[:1], args.budgets[:1], ['core']
  root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix='label_efficiency_'))
  root.mkdir(parents=True, exist_ok=True)

  runs = []  # in the order of --parts
  for part in parts:
    if part == 'core':
      runs += [Run(m, b, s) for b in args.budgets for s in args.seeds for m in CORE]
    elif part == 'all':
      runs += [Run(ALL_LABELS, 0, s) for s in args.seeds]
    else:
      runs += [Run(m, args.budgets[0], s) for s in args.seeds for m in EXTRA[part]]

  base.prepare('reco_toy', args.data_dir or None)  # once, before parallel runs read it
  cores = sorted(os.sched_getaffinity(0))
  jobs = max(1, min(args.jobs, len(cores)))
  shares = [cores[i::jobs] for i in range(jobs)] if jobs > 1 else [None]
  began, load = time.time(), os.getloadavg()[0]
  print(f'{len(runs)} runs, {jobs} at a time, workdirs under {root}', flush=True)
  with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
    free = list(range(jobs))

    def work(run):
      share = free.pop()
      try:
        seconds = _execute(run, root, args.data_dir, shares[share])
      finally:
        free.append(share)
      print(f'{run.name}: {score(root / run.name, args.last):.4f} ({seconds / 60:.1f} min)',
            flush=True)
      return seconds

    durations = list(pool.map(work, runs))
  total = time.time() - began

  scores = {}
  for run in runs:
    scores.setdefault((run.method.key, run.labels), []).append(score(root / run.name, args.last))
  methods = [*CORE, *(m for p in parts if p in EXTRA for m in EXTRA[p])]
  toy = toy_config.get_config()
  budgets = args.budgets
  lines = [
      '# Label efficiency on the toy',
      '',
      f'`PYTHONPATH=. python benchmarks/label_efficiency.py {" ".join(_shown(sys.argv[1:]))}` on '
      f'{datetime.date.today()}, {platform.machine()} with {os.cpu_count()} CPU cores, '
      f'{jobs} run(s) at a time, load {load:.1f} at the start; the {len(runs)} runs took '
      f'{sum(durations) / 60:.0f} min of run time in all (median {np.median(durations) / 60:.1f} '
      f'min; {total / 60:.0f} min of wall time in this invocation, finished runs are reused).',
      '',
      'Each run is the README main job with the row\'s method and budget '
      '(`python -m reco_jax.main --config=configs/toy.py:labels=N,seed=S,...`), evaluated '
      f'every {EVAL_EVERY} steps instead of {toy.eval_every_steps}. Eval mIoU '
      f'(%) on the 500 validation images, the mean of the last {args.last} evaluations of a '
      f'run (of {toy.num_train_steps} steps); mean '
      f'and range over seeds {args.seeds}. Noise reduction: a 500-image validation '
      'split, the mean of the last evaluations, and paired seeds (one seed gives every method '
      'the same labelled subset; per-seed differences below).',
      '',
      '| method | ' + ' | '.join(f'{b} labels' for b in budgets) + ' |',
      '|---|' + '---|' * len(budgets),
  ]
  for m in methods:
    cells = [_cell(scores[m.key, b]) if (m.key, b) in scores else '' for b in budgets]
    if any(cells):
      lines.append(f'| {m.name} | ' + ' | '.join(cells) + ' |')
  if (ALL_LABELS.key, 0) in scores:
    lines.append(f'| {ALL_LABELS.name} | {_cell(scores[ALL_LABELS.key, 0])} (any budget) |'
                 + ' |' * (len(budgets) - 1))
  lines += ['', 'Per-seed differences (points, paired by seed):', '']
  pairs = [('ClassMix - Supervised', 'classmix', 'supervised'),
           ('ReCo + ClassMix - ClassMix', 'reco_classmix', 'classmix'),
           ('ReCo + ClassMix - Supervised', 'reco_classmix', 'supervised')]
  pairs += [(f'{m.name} - ReCo + ClassMix', m.key, 'reco_classmix') for m in EXTRA['ablation']]
  pairs += [(f'{m.name} - Supervised', m.key, 'supervised')
            for p in ('pretrain', 's4gan') for m in EXTRA[p]]
  for title, a, b in pairs:
    for budget in budgets:
      if (a, budget) in scores and (b, budget) in scores:
        d = 100 * (np.asarray(scores[a, budget]) - np.asarray(scores[b, budget]))
        lines.append(f'- {title}, {budget} labels: {", ".join(f"{x:+.1f}" for x in d)} '
                     f'(mean {d.mean():+.1f})')
  lines.append('')
  _OUT.parent.mkdir(parents=True, exist_ok=True)
  _OUT.with_suffix('.md').write_text('\n'.join(lines))
  _plot(scores, methods, budgets, _OUT.with_suffix('.png'))
  print('\n'.join(lines))


if __name__ == '__main__':
  main()

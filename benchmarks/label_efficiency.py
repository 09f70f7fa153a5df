"""Label efficiency on the toy: supervised, ClassMix and ReCo + ClassMix over label budgets.

Every run goes through the project's entry point, `python -m reco_jax.main
--config=configs/toy.py:...` (the README's main job and its budget), into
`WORKDIR/<method>_l<labels>_s<seed>`; a run already finished there is read, not redone, so a
killed benchmark continues where it stopped. For one seed every method trains on the same
labelled subset (the subset depends on the seed and the budget only), so per-seed differences
between methods are paired comparisons. The score of a run is the mean of its last `--last`
evaluations (500 validation images each), which damps the noise of a single evaluation.

Each finished run is kept in benchmarks/results/label_efficiency.json (its eval mIoU by step,
its run time, the date and the invocation that made it); a stored run is not redone, so a
later invocation adds seeds, budgets or methods to the stored ones (delete an entry to run it
again). From every stored run it writes benchmarks/results/label_efficiency.md (mean and range
over seeds per method and budget, the per-seed differences, the all-labels reference, the
Table 4 ablation) and benchmarks/results/label_efficiency.png (mIoU against labelled images,
range as error bars). `--quick` keeps its own store, under its workdir.

  PYTHONPATH=. python benchmarks/label_efficiency.py --jobs 2           # everything, 3 seeds
  PYTHONPATH=. python benchmarks/label_efficiency.py --quick            # 1 seed, 1 budget
  PYTHONPATH=. python benchmarks/label_efficiency.py --parts core,all   # a subset of the grid
  PYTHONPATH=. python benchmarks/label_efficiency.py --parts core --budgets 50 --seeds 0 1 2 3
"""
import argparse
import collections
import concurrent.futures
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow is imported
from configs import toy as toy_config  # pylint: disable=g-import-not-at-top
from reco_jax import results  # pylint: disable=g-import-not-at-top
from reco_jax import stages
from reco_jax import data as data_lib

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
    's4gan': (Method('S4GAN', 's4gan', 'method=s4gan,reco=False'),),
    # The ReCo paper's Table 4 (sampling ablation), on ReCo + ClassMix.
    'ablation': (
        Method('ReCo + ClassMix, random queries', 'reco_random_queries',
               'method=classmix,reco=True', ('--config.query_mode=random',)),
        Method('ReCo + ClassMix, easy queries', 'reco_easy_queries',
               'method=classmix,reco=True', ('--config.query_mode=easy',)),
        Method('ReCo + ClassMix, random keys', 'reco_random_keys',
               'method=classmix,reco=True', ('--config.key_mode=random',))),
    # UniMatch (Yang et al., CVPR 2023) and ReCo on it, at every budget as the core rows.
    'unimatch': (Method('UniMatch', 'unimatch', 'method=unimatch,reco=False'),
                 Method('UniMatch + ReCo', 'unimatch_reco', 'method=unimatch,reco=True')),
    # Zhao et al.'s label-based pixel contrastive pretraining, then the supervised job, at every
    # budget and with all labels; the class-balanced subset of the other rows, not Zhao's
    # uniform one, so that a seed pairs it with supervised training. Supervised training runs
    # again beside them, and they pair with that: the Supervised row's runs are older, and not
    # all of them reproduce (benchmarks/README.md).
    'pretrain': (
        Method('Supervised, run beside the pretraining rows', 'supervised_rerun',
               'method=supervised,reco=False'),
        Method('Supervised, within-image pretraining', 'supervised_pretrain',
               'method=supervised,pretrain=within,subset=class_balanced'),
        Method('Supervised, cross-image pretraining', 'supervised_pretrain_cross',
               'method=supervised,pretrain=cross,subset=class_balanced')),
    # Zhao et al.'s semi-supervised setting: self-training on pseudo-labels, with and without
    # within-image pretraining of both of its models.
    'pseudo_label': (
        Method('Pseudo-label', 'pseudo_label',
               'method=pseudo_label,pretrain=none,subset=class_balanced'),
        Method('Pseudo-label, within-image pretraining', 'pseudo_label_pretrain',
               'method=pseudo_label,pretrain=within,subset=class_balanced')),
    # How long to pretrain, on the first seed: the toy's 2,000 steps against shorter and longer
    # pretraining.
    'pretrain_length': (
        Method('Supervised, within-image pretraining', 'supervised_pretrain',
               'method=supervised,pretrain=within,subset=class_balanced'),
        *(Method(f'Supervised, within-image pretraining, {n:,} pretraining steps',
                 f'supervised_pretrain_p{n}',
                 'method=supervised,pretrain=within,subset=class_balanced',
                 (f'--config.pretrain_steps={n}',)) for n in (500, 5000))),
}
PARTS = ('core', 'all', *EXTRA)
# The parts that run at every budget (the others run at the first), those that run with all
# labels too, and those that run on the first seed only.
EVERY_BUDGET = ('core', 'unimatch', 'pretrain')
WITH_ALL_LABELS = ('pretrain',)
FIRST_SEED = ('pretrain_length',)
# The runs evaluate twice as often as the main job, so that the mean of their last evaluations
# is taken near the end of the schedule.
EVAL_EVERY = 250
# The embedding probe's metrics at the end of pretraining (within minus between = gap).
PROBE_METRICS = ('within_class_cosine', 'between_class_cosine', 'cosine_gap')
ALL_LABELS = Method('Supervised, all 2,000 labels', 'supervised_all',
                    'method=supervised,reco=False')


@dataclasses.dataclass(frozen=True)
class Run:
  method: Method
  labels: int
  seed: int

  @property
  def name(self) -> str:
    return f'{self.method.key}_l{self.labels}_s{self.seed}'


def grid(parts: list[str], budgets: list[int], seeds: list[int]) -> list[Run]:
  """The runs of `parts`, in their order (labels 0: all labels)."""
  runs = []
  for part in parts:
    if part == 'all':
      runs += [Run(ALL_LABELS, 0, s) for s in seeds]
      continue
    rows = CORE if part == 'core' else EXTRA[part]
    seeds_ = seeds[:1] if part in FIRST_SEED else seeds
    budgets_ = list(budgets if part in EVERY_BUDGET else budgets[:1])
    budgets_ += [0] if part in WITH_ALL_LABELS else []
    runs += [Run(m, b, s) for b in budgets_ for s in seeds_ for m in rows]
  return list(dict.fromkeys(runs))  # a run in two parts runs once


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


def _execute(run: Run, root: pathlib.Path, data_dir: str,
             cpus: list[int] | None) -> tuple[float, bool]:
  """Trains `run` (unless finished): (its wall time in seconds, 0 when unknown; whether it was
  resumed, when the seconds count only its last part)."""
  workdir = root / run.name
  timing = root / f'{run.name}.seconds'
  if _finished(workdir):
    if not timing.exists():
      return 0.0, False
    seconds, *resumed = timing.read_text().split()
    return float(seconds), bool(resumed)
  resumed = workdir.exists()  # a killed run continues from its latest checkpoint
  began = time.time()
  log = root / f'{run.name}.log'
  preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
  with open(log, 'a') as out:  # a resumed run's log goes on after the killed one's
    status = subprocess.run(_command(run, root, data_dir), stdout=out, stderr=subprocess.STDOUT,
                            cwd=_HERE.parent, preexec_fn=preexec, check=False).returncode
  if status:
    raise RuntimeError(f'{run.name} failed (exit {status}); its output is in {log}.')
  seconds = time.time() - began
  timing.write_text(f'{seconds:.0f}{" resumed" if resumed else ""}\n')
  return seconds, resumed


def _invocation() -> str:
  return f'PYTHONPATH=. python benchmarks/label_efficiency.py {" ".join(_shown(sys.argv[1:]))}'


def _shown(argv: list[str]) -> list[str]:
  """The command-line arguments without the machine's own paths (after `=` or a space)."""
  shown, skip = [], False
  for a in argv:
    if not skip and not a.startswith(('--data_dir', '--workdir', '--results')):
      shown.append(a)
    skip = a in ('--data_dir', '--workdir', '--results')
  return shown


def record(run: Run, workdir: pathlib.Path, seconds: float, resumed: bool, context: str) -> dict:
  """What the store keeps of a finished run: its eval mIoU by step, the embedding probe at the
  end of each pretraining stage, and where it was made. `resumed`: the minutes are those of
  the run's last part only."""
  entry = {'method': run.method.key, 'labels': run.labels, 'seed': run.seed,
           'miou': {str(s): v for s, v in sorted(results.load_result(workdir).miou.items())}}
  if probe := _final_probe(workdir):
    entry['probe'] = probe
  if resumed:
    entry['resumed'] = True
  return {**entry, 'minutes': round(seconds / 60, 1) if seconds else None,
          'date': str(datetime.date.today()), 'command': _invocation(), 'context': context}


def _final_probe(workdir: pathlib.Path) -> dict[str, dict[str, float]]:
  """{pretraining stage folder: {probe metric: value at its last evaluation}}."""
  index = workdir / stages.STAGES_FILE
  if not index.exists():
    return {}
  probe = {}
  for stage in json.loads(index.read_text())['stages']:
    if stage['kind'] == stages.PRETRAIN:
      values, _ = results.read_scalars(workdir / stage['folder'],
                                       [f'eval/{k}' for k in PROBE_METRICS])
      probe[stage['folder']] = {k: values[f'eval/{k}'][max(values[f'eval/{k}'])]
                                for k in PROBE_METRICS if values[f'eval/{k}']}
  return probe


def pending(runs: list[Run], store: dict[str, dict], root: pathlib.Path) -> list[Run]:
  """The runs to execute: a stored run is not redone, unless its finished workdir is under `root`
  (then it is read again)."""
  return [r for r in runs if r.name not in store or _finished(root / r.name)]


def score(entry: dict, last: int) -> float:
  """Mean of the last `last` eval mIoUs of a stored run (or its score, where only that is kept)."""
  if 'miou' not in entry:
    return entry['score']
  miou = {int(s): v for s, v in entry['miou'].items()}
  return float(np.mean([miou[s] for s in sorted(miou)[-last:]]))


def load_store(path: pathlib.Path) -> dict[str, dict]:
  if not path.exists():
    return {}
  try:
    return json.loads(path.read_text())['runs']
  except (ValueError, KeyError) as e:
    raise SystemExit(f'{path} is not a label-efficiency store ({e}); expected '
                     '{"runs": {name: run}}. Move it away to start a new one.') from e


def _save_store(path: pathlib.Path, store: dict[str, dict]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(path.name + '.partial')  # never a half-written store
  partial.write_text(json.dumps({'runs': dict(sorted(store.items()))}, indent=1) + '\n')
  os.replace(partial, path)


def _cell(values: dict[int, float], seeds: int) -> str:
  v = 100 * np.asarray(list(values.values()))
  if len(v) == 1:
    return f'{v[0]:.1f}' + (' (1 seed)' if seeds != 1 else '')
  count = f'; {len(v)} seeds' if len(v) != seeds else ''
  return f'{v.mean():.1f} ({v.min():.1f}-{v.max():.1f}{count})'


def _scores(store: dict[str, dict], last: int) -> dict[tuple[str, int], dict[int, float]]:
  """(method key, labels) -> {seed: score}, seeds in order."""
  scores = {}
  for entry in sorted(store.values(), key=lambda e: e['seed']):
    # The all-labels supervised runs are the Supervised row's all-labels cell.
    key = CORE[0].key if entry['method'] == ALL_LABELS.key else entry['method']
    scores.setdefault((key, entry['labels']), {})[entry['seed']] = score(entry, last)
  return scores


def _provenance(store: dict[str, dict]) -> list[str]:
  """A line per invocation that made stored runs: its date, command, machine and run time."""
  groups = {}
  for entry in store.values():
    groups.setdefault((entry['date'], entry['command'], entry['context']), []).append(entry)
  lines = []
  for (date, command, context), entries in sorted(groups.items()):
    minutes = [e['minutes'] for e in entries if e.get('minutes') and not e.get('resumed')]
    time_ = (f'; {sum(minutes):.0f} min of run time (median {np.median(minutes):.1f})'
             if minutes else '')
    if resumed := sum(bool(e.get('resumed')) for e in entries):
      time_ += (f' ({resumed} resumed run{"s" * (resumed != 1)} left out: only '
                f'{"its" if resumed == 1 else "their"} last part was timed)')
    runs = f'{len(entries)} run' + 's' * (len(entries) != 1)
    lines.append(f'- {date}, {runs}: `{command}`, {context}{time_}.')
  return lines


def report(store: dict[str, dict], last: int,
           store_name: str) -> tuple[list[str], dict, list[Method], list[int]]:
  """The results file's lines from every stored run, and what the plot needs."""
  scores = _scores(store, last)
  # The pretraining-length runs have a table of their own.
  methods = [m for m in (*CORE, *(m for p in EXTRA if p not in FIRST_SEED for m in EXTRA[p]))
             if any(key == m.key for key, _ in scores)]
  methods = list({m.key: m for m in methods}.values())
  budgets = sorted({labels for _, labels in scores if labels})
  columns = budgets + [0] * any(labels == 0 for _, labels in scores)  # 0: all labels
  # The usual number of seeds per cell; a cell over another number says so.
  seeds = collections.Counter(len(v) for v in scores.values()).most_common(1)[0][0]
  toy = toy_config.get_config()
  lines = [
      '# Label efficiency on the toy',
      '',
      f'Made by `benchmarks/label_efficiency.py` from the runs in `{store_name}` (each run\'s '
      'eval mIoU by step and where it was made); an invocation adds its runs to them:',
      '',
      *_provenance(store),
      '',
      'Each run is the README main job with the row\'s method and budget '
      '(`python -m reco_jax.main --config=configs/toy.py:labels=N,seed=S,...`), evaluated '
      f'every {EVAL_EVERY} steps instead of {toy.eval_every_steps}. Eval mIoU '
      f'(%) on the 500 validation images, the mean of the last {last} evaluations of a '
      f'run (of {toy.num_train_steps} steps); mean and range over {seeds} seeds (a cell over '
      'another number says so). Noise reduction: a 500-image validation split, the mean of the '
      'last evaluations, and paired seeds (one seed gives every method the same labelled '
      'subset; per-seed differences below).',
      '',
      '| method | ' + ' | '.join(map(_column, columns)) + ' |',
      '|---|' + '---|' * len(columns),
  ]
  for m in methods:
    cells = [_cell(scores[m.key, b], seeds) if (m.key, b) in scores else '' for b in columns]
    lines.append(f'| {m.name} | ' + ' | '.join(cells) + ' |')
  lines += ['', 'Per-seed differences (points, paired by seed):', '']
  pairs = [('ClassMix - Supervised', 'classmix', 'supervised'),
           ('ReCo + ClassMix - ClassMix', 'reco_classmix', 'classmix'),
           ('ReCo + ClassMix - Supervised', 'reco_classmix', 'supervised')]
  pairs += [('UniMatch - ClassMix', 'unimatch', 'classmix'),
            ('UniMatch + ReCo - UniMatch', 'unimatch_reco', 'unimatch'),
            ('UniMatch + ReCo - ReCo + ClassMix', 'unimatch_reco', 'reco_classmix')]
  pairs += [(f'{m.name} - ReCo + ClassMix', m.key, 'reco_classmix') for m in EXTRA['ablation']]
  rerun = EXTRA['pretrain'][0]
  pairs += [(f'{rerun.name} - Supervised', rerun.key, 'supervised')]
  pairs += [(f'{m.name} - {rerun.name}', m.key, rerun.key) for m in EXTRA['pretrain'][1:]]
  pairs += [(f'{m.name} - Supervised', m.key, 'supervised') for m in EXTRA['s4gan']]
  pairs += [(f'Pseudo-label - {rerun.name}', 'pseudo_label', rerun.key),
            ('Pseudo-label, within-image pretraining - Pseudo-label', 'pseudo_label_pretrain',
             'pseudo_label')]
  for title, a, b in pairs:
    for budget in columns:
      common = [s for s in scores.get((a, budget), {}) if s in scores.get((b, budget), {})]
      if common:
        d = 100 * np.array([scores[a, budget][s] - scores[b, budget][s] for s in common])
        which = f'seeds {", ".join(map(str, common))}; ' if len(common) != seeds else ''
        lines.append(f'- {title}, {_column(budget)}: {", ".join(f"{x:+.1f}" for x in d)} '
                     f'({which}mean {d.mean():+.1f})')
  return lines + _length_study(store, last) + [''], scores, methods, budgets


def _column(labels: int) -> str:
  return f'{labels} labels' if labels else ALL_LABELS.name.split(', ')[1]


def _length_study(store: dict[str, dict], last: int) -> list[str]:
  """The pretraining-length table: for each seed and budget of a longer pretraining run,
  the fine-tuned mIoU and the probe's cosine gap at the end of pretraining, by length."""
  longer = {m.key: int(m.flags[0].split('=')[1]) for m in EXTRA['pretrain_length'] if m.flags}
  toy_steps = toy_config.get_config('pretrain=within').pretrain_steps
  rerun = EXTRA['pretrain'][0].key
  cells = {}
  # Supervised training (0 steps) as run beside the pretraining runs where it was.
  for e in sorted(store.values(), key=lambda e: e['method'] == rerun):
    if e['method'] in longer or e['method'] in ('supervised', rerun, 'supervised_pretrain'):
      steps = longer.get(e['method'], toy_steps if e['method'] == 'supervised_pretrain' else 0)
      cells.setdefault((e['labels'], e['seed']), {})[steps] = e
  lines = []
  for (labels, seed), row in sorted(cells.items()):
    if not set(row) & set(longer.values()):
      continue
    lines += ['', f'Pretraining length ({labels} labels, seed {seed}; 0 = no pretraining): '
              'eval mIoU (%) after fine-tuning, and the embedding probe on the validation '
              'pixels at the end of pretraining (the mean cosine similarity of the embeddings of '
              'two pixels of one class, and of two pixels of different classes).', '',
              '| pretraining steps | mIoU | within-class cosine | between-class cosine | gap |',
              '|---|---|---|---|---|']
    for steps, e in sorted(row.items()):
      probe = e.get('probe', {}).get('pretrain', {})
      values = [f'{probe[k]:.3f}' if k in probe else '' for k in PROBE_METRICS]
      lines.append(f'| {steps:,} | {100 * score(e, last):.1f} | ' + ' | '.join(values) + ' |')
  return lines


def _plot(scores, methods, budgets, path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(10, 5))
  # A colour and marker per row (matplotlib's default cycle repeats its colours after ten).
  palette = plt.get_cmap('tab20').colors
  styles = {m.key: (palette[i % len(palette)], 'osD^v<>p'[i % 8]) for i, m in enumerate(methods)}
  # Rows at the same budget are spread sideways so that their error bars do not overlap.
  at = {b: [m.key for m in methods if (m.key, b) in scores] for b in budgets}
  width = 0.04 * (max(budgets) - min(budgets) or max(budgets))
  colours = {}
  for method in methods:
    xs = [b for b in budgets if (method.key, b) in scores]
    if not xs:
      continue
    dodge = [(at[b].index(method.key) - (len(at[b]) - 1) / 2) * width / max(len(at[b]) - 1, 1)
             for b in xs]
    v = [100 * np.asarray(list(scores[method.key, b].values())) for b in xs]
    mean = np.array([x.mean() for x in v])
    err = np.array([[m - x.min() for m, x in zip(mean, v)], [x.max() - m for m, x in zip(mean, v)]])
    colour, marker = styles[method.key]
    ax.errorbar(np.add(xs, dodge), mean, yerr=err, marker=marker, color=colour, capsize=3,
                ls='-' if len(xs) > 1 else 'none', label=method.name)
    colours[method.key] = colour
  top = ax.get_ylim()[1]
  for method in methods:
    if (method.key, 0) in scores:
      every = 100 * np.mean(list(scores[method.key, 0].values()))
      colour = colours.get(method.key, 'grey')
      ax.axhline(every, color=colour, ls='--', lw=1,
                 label=f'{method.name}, {ALL_LABELS.name.split(", ")[1]}')
      top = max(top, every + 2)
  ax.set_ylim(top=top)
  ax.set_xlabel('labelled images')
  ax.set_ylabel('eval mIoU (%)')
  ax.set_xticks(budgets)
  ax.set_title('reco_toy: mean and range over seeds')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1))  # beside, not over
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--budgets', type=int, nargs='+', default=[30, 100])
  parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  parser.add_argument('--parts', default=','.join(PARTS),
                      help=f'comma-separated parts of the grid, run in this order: '
                      f'{", ".join(PARTS)} ({", ".join(EVERY_BUDGET)} run at every budget, the '
                      f'others at the first; {", ".join(WITH_ALL_LABELS)} with all labels too; '
                      f'{", ".join(FIRST_SEED)} on the first seed; all = supervised on every '
                      'label)')
  parser.add_argument('--last', type=int, default=2, help='evaluations averaged per run')
  parser.add_argument('--jobs', type=int, default=1,
                      help='runs at a time, each pinned to its own share of the CPU cores')
  parser.add_argument('--data_dir', default='')
  parser.add_argument('--workdir', default='', help='default: a temporary directory')
  parser.add_argument('--results', default='',
                      help=f'path stem of the store, results file and plot (default: {_OUT}; '
                      'with --quick: WORKDIR/label_efficiency)')
  parser.add_argument('--quick', action='store_true', help='1 seed, 1 budget, core methods')
  args = parser.parse_args()
  parts = args.parts.split(',')
  if unknown := set(parts) - set(PARTS):
    parser.error(f'unknown --parts {sorted(unknown)}; expected some of {", ".join(PARTS)}')
  if args.quick:
    args.seeds, args.budgets, parts = args.seeds[:1], args.budgets[:1], ['core']
  root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix='label_efficiency_'))
  root.mkdir(parents=True, exist_ok=True)
  out = pathlib.Path(args.results) if args.results else (
      root / 'label_efficiency' if args.quick else _OUT)
  store_path = out.with_suffix('.json')
  store = load_store(store_path)

  runs = grid(parts, args.budgets, args.seeds)
  stored = len(runs)
  runs = pending(runs, store, root)
  stored -= len(runs)

  data_lib.prepare('reco_toy', args.data_dir or None)  # once, before parallel runs read it
  cores = sorted(os.sched_getaffinity(0))
  jobs = max(1, min(args.jobs, len(cores)))
  shares = [cores[i::jobs] for i in range(jobs)] if jobs > 1 else [None]
  context = (f'{platform.machine()} with {os.cpu_count()} CPU cores, {jobs} run(s) at a time, '
             f'load {os.getloadavg()[0]:.1f} at the start')
  print(f'{len(runs)} runs ({stored} more stored in {store_path}), {jobs} at a time, '
        f'workdirs under {root}', flush=True)
  lock = threading.Lock()
  with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
    free = list(range(jobs))

    def work(run):
      share = free.pop()
      try:
        seconds, resumed = _execute(run, root, args.data_dir, shares[share])
      finally:
        free.append(share)
      with lock:
        entry = record(run, root / run.name, seconds, resumed, context)
        if run.name in store:  # read again: keep where it was made
          entry = {**store[run.name], 'miou': entry['miou']}
        store[run.name] = entry
        _save_store(store_path, store)
      print(f'{run.name}: {score(entry, args.last):.4f} ({seconds / 60:.1f} min)', flush=True)

    list(pool.map(work, runs))

  lines, scores, methods, budgets = report(store, args.last, store_path.name)
  out.with_suffix('.md').write_text('\n'.join(lines))
  _plot(scores, methods, budgets, out.with_suffix('.png'))
  print('\n'.join(lines))


if __name__ == '__main__':
  main()

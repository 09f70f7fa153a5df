"""Results tables of many runs in the layout of the ReCo paper's Table 1 and Table 3.

  python -m reco_jax.results runs/                 # every run below runs/ (a sweep's root)
  python -m reco_jax.results 'runs/table1/voc/*/*/seed*' --output=voc.md

Arguments are run workdirs, globs, or directories searched recursively for runs (a directory
holding config.json). Each run's config.json says its dataset, backbone, label budget
(config.labels, or config.partial for partial labels), method and ReCo; its TensorBoard event
files give eval/miou at each evaluation. Runs are grouped into one table per dataset, backbone
and kind of label budget: rows are the methods (ReCo + method below the method), columns the
label budgets (Table 1: labelled images; Table 3: partial labels), and each cell is the mean
over seeds with the range (lowest-highest), in percent. Two tables each: the best eval mIoU of
each run, and its final one (the last evaluation). A '*' marks cells with runs that have not
finished (last logged step < config.num_train_steps); they are listed below the tables.
The tables are printed; --output also writes them to a file (markdown; .csv writes one row per
run).
"""
from collections.abc import Iterable, Sequence
import collections
import csv
import dataclasses
import io
import json
import math
from typing import Any

from absl import app
from absl import flags
from absl import logging
from etils import epath

from reco_jax import methods
from reco_jax import names
from reco_jax import stages
from reco_jax import workdir as workdir_lib

MIOU_TAG = names.MIOU_TAG
# Table 1's row order, then every other method of the registry in its order.
METHODS = tuple(dict.fromkeys(('supervised', 's4gan', 'pseudo_label', 'cutout', 'cutmix',
                               'classmix', *methods.METHODS)))
METHOD_NAMES = {'supervised': 'Supervised', 's4gan': 'S4GAN', 'pseudo_label': 'Pseudo-label',
                'cutout': 'CutOut', 'cutmix': 'CutMix', 'classmix': 'ClassMix',
                'unimatch': 'UniMatch'}
# Bases that ReCo is added to rather than built on name it after themselves.
RECO_SUFFIXED = ('unimatch',)
PARTIALS = names.PARTIALS[1:]  # Table 3's columns, in order
# Table 3's column heads: labelled pixels per class and image.
PARTIAL_NAMES = {'p0': '1 pixel', 'p1': '1%', 'p5': '5%', 'p25': '25%'}
DATASET_NAMES = {'reco_voc': 'Pascal VOC', 'reco_cityscapes': 'CityScapes',
                 'reco_sun_rgbd': 'SUN RGB-D', 'reco_toy': 'toy', 'reco_folder': 'folder'}
MODEL_NAMES = {'deeplabv3p': 'DeepLabV3+', 'deeplabv2': 'DeepLabV2'}
_EVENTS = 'events.out.tfevents.'


@dataclasses.dataclass
class RunResult:
  """One run: what its config says it is and the eval mIoU it logged, by step."""
  workdir: str
  dataset: str
  model: str
  labels: int
  partial: str
  method: str
  reco: bool
  seed: int
  num_train_steps: int
  last_step: int
  miou: dict[int, float]
  split: str = ''  # config.split: '' or 'pseudoseg' (Table 2)
  pretrain: str = 'none'  # config.pretrain: contrastive pretraining (Zhao et al.)
  variant: str = ''  # the ablation switches that differ from the paper's method, e.g. 'random keys'

  @property
  def finished(self) -> bool:
    return self.last_step >= self.num_train_steps

  @property
  def best(self) -> float | None:
    return max(self.miou.values()) if self.miou else None

  @property
  def final(self) -> float | None:
    return self.miou[max(self.miou)] if self.miou else None

  @property
  def row(self) -> tuple[int, int, bool, str]:
    """Sort key and identity of the table row: (method order, pretraining, ReCo, variant)."""
    order = METHODS.index(self.method) if self.method in METHODS else len(METHODS)
    pretrain = names.PRETRAINS.index(self.pretrain) if self.pretrain in names.PRETRAINS else 9
    return order, pretrain, self.reco, self.variant

  @property
  def row_name(self) -> str:
    name = METHOD_NAMES.get(self.method, self.method)
    if self.pretrain != 'none':
      name = f'{name}, {self.pretrain}-image pretraining'
    if self.reco:
      name = f'{name} + ReCo' if self.method in RECO_SUFFIXED else f'ReCo + {name}'
    return f'{name}, {self.variant}' if self.variant else name

  @property
  def column(self) -> tuple[int, int | str]:
    """Sort key and identity of the table column: the label budget."""
    if self.partial:
      return (PARTIALS.index(self.partial) if self.partial in PARTIALS else len(PARTIALS),
              self.partial)
    # All labels (labels = 0) is the last column, as in Table 1.
    return (self.labels if self.labels else math.inf), self.labels

  @property
  def column_name(self) -> str:
    if self.partial:
      return PARTIAL_NAMES.get(self.partial, self.partial)
    return f'{self.labels} labels' if self.labels else 'all labels'

  @property
  def table(self) -> tuple[str, str, str]:
    if self.partial:
      return self.dataset, self.model, 'partial'
    return self.dataset, self.model, self.split or 'labels'


def read_scalars(workdir: str | epath.Path, tags: Iterable[str] = (MIOU_TAG,)
                 ) -> tuple[dict[str, dict[int, float]], int]:
  """({tag: {step: value}}, last step with any summary) from the event files in `workdir`.

  Reads the TensorBoard event files directly in `workdir` (where the trainer's CLU writers
  put them), in name order, which is creation order: a resumed run's later file wins for a
  step logged twice. CLU writes scalars as tensor summaries; plain simple_value summaries
  are read too.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tags = set(tags)
  values = {tag: {} for tag in tags}
  last = 0
  directory = epath.Path(workdir)
  files = sorted(p for p in directory.iterdir() if p.name.startswith(_EVENTS))
  for path in files:
    for event in _events(tf, path):
      if not event.HasField('summary') or not event.summary.value:
        continue
      last = max(last, int(event.step))
      for value in event.summary.value:
        if value.tag not in tags:
          continue
        if value.HasField('tensor'):
          number = float(tf.make_ndarray(value.tensor).reshape(()))
        else:
          number = float(value.simple_value)
        values[value.tag][int(event.step)] = number
  return values, last


def _events(tf, path: epath.Path):
  """The tf.compat.v1.Event records of one event file.

  A run still writing has a last record cut short; reading stops there.
  """
  records = iter(tf.data.TFRecordDataset(str(path)))
  while True:
    try:
      record = next(records)
    except StopIteration:
      return
    except tf.errors.DataLossError:
      logging.warning('%s ends in an incomplete record (a run still writing?); read up to '
                      'it.', path)
      return
    yield tf.compat.v1.Event.FromString(record.numpy())


def find_runs(paths: Sequence[str]) -> list[epath.Path]:
  """Run workdirs named by `paths` (dirs, globs), searching directories recursively.

  Raises:
    FileNotFoundError: a glob or directory with no run, naming it and what a run holds.
  """
  if not paths:
    raise FileNotFoundError('No runs given: pass run workdirs, globs or a sweep root (e.g. '
                            'python -m reco_jax.results runs/).')
  runs = []
  for pattern in paths:
    matches = workdir_lib.expand_paths([pattern])
    found = []
    for path in matches:
      if not path.exists():
        continue
      if (path / workdir_lib.CONFIG_FILE).exists():
        found.append(path)
      elif path.is_dir():
        found.extend(_runs_below(path))
    if not found:
      raise FileNotFoundError(
          f'{pattern!r} matches no run: expected workdirs holding {workdir_lib.CONFIG_FILE} '
          f'and TensorBoard event files (written by reco_jax.main), or directories above '
          'them such as the --workdir_root of launch/sweep.py.')
    runs.extend(found)
  unique = list(dict.fromkeys(str(r) for r in runs))
  return [epath.Path(r) for r in unique]


def _runs_below(root: epath.Path) -> list[epath.Path]:
  import tensorflow as tf  # gfile walks local and gs:// trees alike.
  staged = []  # runs of several stages, whose sub-folders are their stages
  out = []
  for directory, _, files in tf.io.gfile.walk(str(root)):
    inside = any(directory.startswith(f'{run}/') for run in staged)  # a stage of a run
    if workdir_lib.CONFIG_FILE in files and not inside:
      out.append(epath.Path(directory))
      if stages.STAGES_FILE in files:
        staged.append(directory.rstrip('/'))
  return sorted(out)


def load_result(workdir: str | epath.Path) -> RunResult:
  """A run's identity (from config.json) and its logged eval mIoU (from its event files)."""
  workdir = epath.Path(workdir)
  path = workdir / workdir_lib.CONFIG_FILE
  try:
    config = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON ({e}).') from e
  missing = [k for k in ('dataset', 'labels', 'partial', 'method', 'reco', 'seed',
                         'num_train_steps') if k not in config]
  if missing:
    raise ValueError(f'{path} lacks {missing}; is it the config.json written by '
                     'reco_jax.train?')
  # A run of several stages is judged by its final model.
  scalars, last = read_scalars(stages.final_stage_dir(workdir))
  dataset = str(config['dataset']).split('/')[0]
  return RunResult(
      workdir=str(workdir), dataset=dataset,
      model=str(config.get('model', {}).get('name', 'deeplabv3p')),
      labels=int(config['labels']), partial=str(config['partial'] or ''),
      method=str(config['method']), reco=bool(config['reco']), seed=int(config['seed']),
      num_train_steps=int(config['num_train_steps']), last_step=last,
      miou=scalars[MIOU_TAG], split=str(config.get('split', '') or ''),
      pretrain=str(config.get('pretrain', 'none')), variant=_variant(config))


def _variant(config: dict[str, Any]) -> str:
  """The ablation switches of Table 4, Fig. 7c and section 4.4 that a run changes, and a
  uniform labelled subset (config.subset), in words."""
  words = []
  if config['reco']:
    if config.get('query_mode', 'hard') != 'hard':
      words.append(f"{config['query_mode']} queries")
    if config.get('key_mode', 'active') != 'active':
      words.append(f"{config['key_mode']} keys")
    if config.get('reco_bank_size', 0):
      words.append(f"a bank of {config['reco_bank_size']} keys per class")
  if float(config.get('unlabelled_fraction', 1.0)) != 1.0:
    words.append(f"{float(config['unlabelled_fraction']):.0%} of the unlabelled images")
  if config['labels'] and config.get('subset', 'class_balanced') == 'uniform':
    words.append('uniform subset')  # Zhao et al.'s draw, not ReCo's class-balanced one.
  return ', '.join(words)


@dataclasses.dataclass
class Cell:
  """The runs of one (method, label budget) cell: values in [0, 1] and whether all finished."""
  values: list[float]
  unfinished: bool

  def text(self, seeds: int) -> str:
    """'mean (low-high)' in percent; the seed count when it is not `seeds`; '*' unfinished."""
    if not self.values:
      return '-' + ('*' if self.unfinished else '')
    pct = [100.0 * v for v in self.values]
    mean = sum(pct) / len(pct)
    notes = []
    if len(pct) > 1:
      notes.append(f'{min(pct):.2f}-{max(pct):.2f}')
    if len(pct) != seeds:
      notes.append(f'{len(pct)} seed{"s" if len(pct) > 1 else ""}')
    text = f'{mean:.2f}' + (f' ({"; ".join(notes)})' if notes else '')
    return text + ('*' if self.unfinished else '')


@dataclasses.dataclass
class Table:
  """One dataset, backbone and budget kind: rows (methods) x columns (label budgets)."""
  title: str
  rows: list[str]
  columns: list[str]
  runs: dict[tuple[str, str], list[RunResult]]

  def cell(self, row: str, column: str, metric: str) -> Cell:
    runs = self.runs.get((row, column), [])
    values = [getattr(r, metric) for r in runs if getattr(r, metric) is not None]
    return Cell(values, any(not r.finished for r in runs))

  @property
  def seeds(self) -> int:
    """The most common number of runs per cell (3 in a full sweep)."""
    counts = collections.Counter(len(v) for v in self.runs.values())
    return counts.most_common(1)[0][0] if counts else 0

  def markdown(self, metric: str) -> str:
    head = ['method'] + self.columns
    lines = ['| ' + ' | '.join(head) + ' |', '|---|' + '---:|' * len(self.columns)]
    for row in self.rows:
      cells = [self.cell(row, c, metric).text(self.seeds) for c in self.columns]
      lines.append('| ' + ' | '.join([row] + cells) + ' |')
    return '\n'.join(lines)


_TABLES = {'labels': 'Table 1: labelled images', 'partial': 'Table 3: partial labels',
           'pseudoseg': 'Table 2: labelled images of the PseudoSeg partition'}


def make_tables(results: Sequence[RunResult]) -> list[Table]:
  """Groups runs into tables (dataset, backbone, budget kind), rows and columns sorted."""
  groups = collections.defaultdict(list)
  for r in results:
    groups[r.table].append(r)
  tables = []
  for (dataset, model, kind), runs in sorted(groups.items()):
    which = _TABLES.get(kind, f'labelled images from {kind}')
    title = (f'{DATASET_NAMES.get(dataset, dataset)}, {MODEL_NAMES.get(model, model)} '
             f'({which})')
    rows = [r.row_name for r in sorted(runs, key=lambda r: r.row)]
    columns = [r.column_name for r in sorted(runs, key=lambda r: r.column[0])]
    cells = collections.defaultdict(list)
    for r in runs:
      key = (r.row_name, r.column_name)
      if any(o.seed == r.seed for o in cells[key]):
        logging.warning('Two runs of %s, %s with seed %d: %s and %s; both are averaged.',
                        *key, r.seed, next(o.workdir for o in cells[key] if o.seed == r.seed),
                        r.workdir)
      cells[key].append(r)
    tables.append(Table(title, list(dict.fromkeys(rows)), list(dict.fromkeys(columns)),
                        dict(cells)))
  return tables


def to_markdown(results: Sequence[RunResult]) -> str:
  """Both tables (best and final eval mIoU) of every group, and the unfinished runs."""
  lines = ['# Results', '',
           'Eval mIoU in percent: mean over seeds (lowest-highest). * = includes runs that '
           'have not finished.', '']
  for table in make_tables(results):
    lines += [f'## {table.title}', '']
    for metric, name in (('best', 'Best eval mIoU'), ('final', 'Final eval mIoU')):
      lines += [f'{name}:', '', table.markdown(metric), '']
  unfinished = [r for r in results if not r.finished]
  if unfinished:
    lines += ['Unfinished runs (*):', '']
    lines += [f'- {r.workdir}: step {r.last_step} of {r.num_train_steps}' for r in unfinished]
    lines.append('')
  never = [r for r in results if not r.miou]
  if never:
    lines += ['Runs without an evaluation yet (not in the tables):', '']
    lines += [f'- {r.workdir}' for r in never]
    lines.append('')
  return '\n'.join(lines)


def to_csv(results: Sequence[RunResult]) -> str:
  out = io.StringIO()
  writer = csv.writer(out)
  writer.writerow(['workdir', 'dataset', 'model', 'labels', 'partial', 'method', 'reco',
                   'seed', 'best_miou', 'final_miou', 'last_step', 'num_train_steps',
                   'finished'])
  for r in results:
    writer.writerow([r.workdir, r.dataset, r.model, r.labels, r.partial, r.method, r.reco,
                     r.seed, '' if r.best is None else f'{r.best:.6f}',
                     '' if r.final is None else f'{r.final:.6f}', r.last_step,
                     r.num_train_steps, r.finished])
  return out.getvalue()


def define_flags() -> None:
  """The tool's flags; defined only when it runs, so importing this module defines none."""
  flags.DEFINE_string('output', None, 'Also write the results to this file: .md (tables) or '
                      '.csv (one row per run). Default: print only.')


@workdir_lib.user_errors
def main(argv):
  f = flags.FLAGS
  output = workdir_lib.check_output_file(f.output, '--output') if f.output else None
  runs = find_runs(argv[1:])
  results = [load_result(r) for r in runs]
  text = to_markdown(results)
  print(text)
  if output is not None:
    output.write_text(to_csv(results) if output.suffix.lower() == '.csv' else text)
    print(f'Wrote {output} ({len(results)} runs).')


if __name__ == '__main__':
  define_flags()
  app.run(main)

"""Evaluates a trained workdir: mIoU, pixel accuracy, per-class IoU and a confusion matrix.

  python -m reco_jax.evaluate --workdir=runs/voc200 [--checkpoint=best|latest|STEP]
      [--split=validation] [--sliding_window] [--output=FILE.md|FILE.csv]

The config is the run's own (WORKDIR/config.json) and the evaluated variables are those of
training (the EMA teacher for semi-supervised runs, steps.eval_variables). The default
whole-image mode runs the trainer's own evaluation (the input pipeline's eval_iterator,
steps.make_eval_step, evaluation.confusion_over), so it reproduces the eval/miou the trainer
logged for that checkpoint's step to the last pixel count. --sliding_window evaluates with overlapping
windows of the training crop size (reco_jax.inference). Writes a table (markdown, or CSV when
--output ends in .csv) and a row-normalised confusion-matrix PNG beside it; by default both go
to WORKDIR/eval/.
"""
from collections.abc import Sequence
import csv
import dataclasses
import io

from absl import app
from absl import flags
from etils import epath
import jax
import numpy as np

from reco_jax import evaluation
from reco_jax import inference
from reco_jax import parallel
from reco_jax import steps
from reco_jax import workdir as workdir_lib


@dataclasses.dataclass
class EvalResult:
  """An evaluation of one checkpoint: its confusion matrix and where it came from.

  confusion: int64 [C, C] pixel counts, rows = ground truth, columns = prediction.
  """
  confusion: np.ndarray
  class_names: tuple[str, ...]
  step: int
  checkpoint_dir: str
  split: str
  mode: str  # 'whole image' or 'sliding window HxW, stride F'

  @property
  def miou(self) -> float:
    return evaluation.mean_iou(self.confusion)

  @property
  def pixel_accuracy(self) -> float:
    return evaluation.pixel_accuracy(self.confusion)

  @property
  def iou(self) -> np.ndarray:
    """float64 [C]; NaN for a class neither in the ground truth nor predicted."""
    return evaluation.iou_from_confusion(self.confusion)

  @property
  def num_pixels(self) -> int:
    return int(self.confusion.sum())


def evaluate_run(run: workdir_lib.Run, builder, split: str, *, sliding_window: bool = False,
                 window: Sequence[int] | None = None,
                 stride_fraction: float = inference.DEFAULT_STRIDE_FRACTION,
                 batch_size: int | None = None,
                 mesh: jax.sharding.Mesh | None = None) -> EvalResult:
  """Evaluates a loaded run on `split` of its dataset (the trainer's evaluation, or windows).

  window: the sliding-window size (default config.crop_size); batch_size: the global eval
  batch (default config.eval_batch_size).
  """
  # The input pipeline (it imports TensorFlow) only when evaluating.
  from reco_jax.data import base
  from reco_jax.data import pipeline
  config = run.config
  mesh = mesh or parallel.make_mesh()
  batch_size = workdir_lib.check_batch(batch_size or config.eval_batch_size)
  batches = pipeline.eval_iterator(
      builder, split=split, eval_size=tuple(config.eval_size), batch_size=batch_size,
      process_index=jax.process_index(), process_count=jax.process_count())
  if sliding_window:
    window = tuple(int(w) for w in (window or config.crop_size))
    eval_step = inference.make_sliding_eval_step(config, run.model, mesh, window,
                                                 stride_fraction)
    (wh, ww), offsets = inference.window_grid(config.eval_size, window, stride_fraction)
    mode = (f'sliding window {wh}x{ww}, stride {stride_fraction:.3g} of a window '
            f'({len(offsets)} windows on {config.eval_size[0]}x{config.eval_size[1]})')
  else:
    eval_step = steps.make_eval_step(config, run.model, mesh)
    mode = f'whole image ({config.eval_size[0]}x{config.eval_size[1]})'
  variables = run.eval_variables()
  confusion, _ = evaluation.confusion_over(eval_step, variables, batches, mesh,
                                          int(config.num_classes))
  return EvalResult(np.asarray(confusion, np.int64), base.class_names(builder), run.step,
                    str(run.checkpoint_dir), split, mode)


def evaluate_workdir(workdir: str, checkpoint: str | int = 'best', split: str | None = None,
                     *, sliding_window: bool = False, window: Sequence[int] | None = None,
                     stride_fraction: float = inference.DEFAULT_STRIDE_FRACTION,
                     data_dir: str | None = None, manual_dir: str | None = None,
                     batch_size: int | None = None) -> EvalResult:
  """Loads `checkpoint` of a training workdir and evaluates it (see evaluate_run).

  data_dir / manual_dir replace the config's when the dataset lives elsewhere now.
  """
  from reco_jax import data as data_lib  # pylint: disable=g-import-not-at-top  (TensorFlow)
  overrides = {k: v for k, v in (('data_dir', data_dir), ('manual_dir', manual_dir)) if v}
  mesh = parallel.make_mesh()
  run = workdir_lib.load_run(workdir, checkpoint, mesh=mesh, overrides=overrides)
  builder = data_lib.prepare_for_config(run.config, flags='--')
  split = data_lib.eval_split(builder, split)
  return evaluate_run(run, builder, split, sliding_window=sliding_window, window=window,
                      stride_fraction=stride_fraction, batch_size=batch_size, mesh=mesh)


def _percent(x: float) -> str:
  return 'n/a' if not np.isfinite(x) else f'{100 * x:.2f}'


def _rows(result: EvalResult) -> list[tuple[str, str, int, int]]:
  """(class, IoU %, ground-truth pixels, predicted pixels) per class."""
  gt, pred = result.confusion.sum(1), result.confusion.sum(0)
  return [(name, _percent(v), int(g), int(p))
          for name, v, g, p in zip(result.class_names, result.iou, gt, pred)]


def _header(result: EvalResult) -> list[str]:
  return [f'checkpoint: step {result.step} ({result.checkpoint_dir})',
          f'split: {result.split}, {result.mode}',
          f'mIoU: {_percent(result.miou)} %   pixel accuracy: {_percent(result.pixel_accuracy)}'
          f' %   pixels: {result.num_pixels}']


def format_table(result: EvalResult) -> str:
  """The printed report: header lines and an aligned per-class IoU table."""
  rows = _rows(result)
  width = max(len('class'), *(len(r[0]) for r in rows))
  lines = _header(result) + ['', f'{"class":<{width}}  {"IoU %":>7}  {"pixels":>10}  '
                                 f'{"predicted":>10}']
  lines += [f'{n:<{width}}  {v:>7}  {g:>10}  {p:>10}' for n, v, g, p in rows]
  return '\n'.join(lines)


def to_markdown(result: EvalResult) -> str:
  lines = [f'# Evaluation of step {result.step}', ''] + [f'- {h}' for h in _header(result)]
  lines += ['', '| class | IoU % | pixels | predicted |', '|---|---:|---:|---:|']
  lines += [f'| {n} | {v} | {g} | {p} |' for n, v, g, p in _rows(result)]
  lines += [f'| **mean** | **{_percent(result.miou)}** | {result.num_pixels} | |', '']
  return '\n'.join(lines)


def to_csv(result: EvalResult) -> str:
  out = io.StringIO()
  writer = csv.writer(out)
  writer.writerow(['class', 'iou', 'pixels', 'predicted'])
  gt, pred = result.confusion.sum(1), result.confusion.sum(0)
  for name, v, g, p in zip(result.class_names, result.iou, gt, pred):
    writer.writerow([name, f'{v:.6f}' if np.isfinite(v) else '', int(g), int(p)])
  writer.writerow(['mean_iou', f'{result.miou:.6f}', result.num_pixels, ''])
  writer.writerow(['pixel_accuracy', f'{result.pixel_accuracy:.6f}', '', ''])
  return out.getvalue()


def write_outputs(result: EvalResult, output: str | epath.Path
                  ) -> tuple[epath.Path, epath.Path]:
  """Writes the table (CSV if `output` ends in .csv, else markdown) and the confusion PNG.

  Returns (table path, PNG path); the PNG is STEM_confusion.png beside the table.
  """
  from reco_jax import viz
  output = epath.Path(output)
  output.parent.mkdir(parents=True, exist_ok=True)
  text = to_csv(result) if output.suffix.lower() == '.csv' else to_markdown(result)
  output.write_text(text)
  png = output.parent / f'{output.stem}_confusion.png'
  fig = viz.confusion_figure(
      result.confusion, result.class_names,
      title=f'step {result.step}, {result.split}: mIoU {_percent(result.miou)} %')
  with png.open('wb') as f:
    fig.savefig(f, format='png', dpi=120)
  return output, png


def default_output(workdir: str, result: EvalResult) -> epath.Path:
  mode = '_sliding' if result.mode.startswith('sliding') else ''
  return epath.Path(workdir) / 'eval' / f'{result.split}_step{result.step}{mode}.md'


def define_flags() -> None:
  """The tool's flags; defined only when it runs, so importing this module defines none."""
  flags.DEFINE_string('workdir', None, 'Training workdir (holds config.json and checkpoints/).')
  flags.DEFINE_string('checkpoint', 'best', 'best, latest or a step number.')
  flags.DEFINE_string('split', None, 'Dataset split (default: the evaluation split the '
                      'trainer uses).')
  flags.DEFINE_bool('sliding_window', False, 'Evaluate with overlapping windows of the '
                    'training crop size (mmsegmentation slide mode).')
  flags.DEFINE_list('window_size', None, "Sliding-window size H,W (default: the config's "
                    'crop_size).')
  flags.DEFINE_float('window_stride', inference.DEFAULT_STRIDE_FRACTION,
                     'Stride between windows as a fraction of the window.')
  flags.DEFINE_string('output', None, 'Table file (.md or .csv); the confusion matrix goes '
                      'beside it as STEM_confusion.png. Default: WORKDIR/eval/.')
  flags.DEFINE_string('data_dir', None, 'TFDS data dir, if not the one in config.json.')
  flags.DEFINE_string('manual_dir', None, 'Raw files to build the dataset from, if it is not '
                      'prepared.')
  flags.DEFINE_integer('eval_batch_size', None, "Global eval batch (default: the config's "
                       'eval_batch_size); a multiple of the device count.')
  flags.mark_flags_as_required(['workdir'])


@workdir_lib.user_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}.')
  f = flags.FLAGS
  window = [int(w) for w in f.window_size] if f.window_size else None
  if window is not None and len(window) != 2:
    raise app.UsageError(f'--window_size takes H,W; got {f.window_size}.')
  if f.output:  # Before the model loads.
    workdir_lib.check_output_file(f.output, '--output')
  result = evaluate_workdir(
      f.workdir, f.checkpoint, f.split, sliding_window=f.sliding_window, window=window,
      stride_fraction=f.window_stride, data_dir=f.data_dir, manual_dir=f.manual_dir,
      batch_size=f.eval_batch_size)
  print(format_table(result))
  table, png = write_outputs(result, f.output or default_output(f.workdir, result))
  print(f'\nWrote {table} and {png}.')


if __name__ == '__main__':
  define_flags()
  app.run(main)

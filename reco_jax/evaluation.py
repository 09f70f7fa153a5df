"""Segmentation metrics from a confusion matrix summed over the whole evaluation set."""
from collections.abc import Callable, Iterable

import jax
import numpy as np

from reco_jax import parallel


def confusion_over(eval_step: Callable, variables, eval_batches: Iterable,
                   mesh: jax.sharding.Mesh, num_classes: int) -> tuple[np.ndarray, dict | None]:
  """Confusion matrix over the whole eval set: int64 [C, C], rows = ground truth.

  eval_step: `steps.make_eval_step`'s; eval_batches: host batches (`pipeline.eval_iterator`).
  Per-batch int32 matrices come from the devices; they are summed on the host in int64 so
  large evaluation sets cannot overflow. Returns (confusion, first global batch or None).
  """
  confusions, first = [], None
  for local in eval_batches:
    batch = parallel.shard_batch(mesh, local)
    if first is None:
      first = batch
    confusions.append(eval_step(variables, batch))
  total = np.zeros((num_classes, num_classes), np.int64)
  for confusion in confusions:
    total += parallel.to_host(confusion).astype(np.int64)
  return total, first


def _check(confusion) -> np.ndarray:
  confusion = np.asarray(confusion)
  if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
    raise ValueError(f'Expected a square confusion matrix [C, C] (rows = ground truth, '
                     f'columns = prediction), got shape {confusion.shape}.')
  if not np.issubdtype(confusion.dtype, np.integer):
    raise ValueError(f'Expected an integer confusion matrix of pixel counts, got '
                     f'{confusion.dtype}; sum the per-batch int32 matrices in int64.')
  return confusion.astype(np.int64)


def iou_from_confusion(confusion) -> np.ndarray:
  """Per-class intersection over union.

  confusion: [C, C] integer pixel counts, rows = ground truth, columns = prediction.
  Returns [C] float64; NaN for a class that is neither in the ground truth nor predicted
  (0 / 0), as the reference's ConfMatrix gives.
  """
  confusion = _check(confusion)
  intersection = np.diag(confusion).astype(np.float64)
  union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
  with np.errstate(divide='ignore', invalid='ignore'):
    return np.where(union > 0, intersection / np.maximum(union, 1), np.nan)


def mean_iou(confusion) -> float:
  """Mean IoU over the classes whose IoU is defined (absent classes are left out).

  The reference averages with torch.mean, which turns NaN into a NaN mIoU whenever a class
  is absent from both ground truth and prediction; leaving those classes out gives the same
  value when every class is present (the case on full validation sets) and a usable value on
  small sets. Returns NaN only when no class is defined at all.
  """
  iou = iou_from_confusion(confusion)
  if np.all(np.isnan(iou)):
    return float('nan')
  return float(np.nanmean(iou))


def pixel_accuracy(confusion) -> float:
  """Fraction of counted pixels predicted correctly (NaN when nothing was counted)."""
  confusion = _check(confusion)
  total = confusion.sum()
  return float(np.trace(confusion) / total) if total else float('nan')

"""Shared defaults and the typed `key=value` argument parser of the dataset configs.

A config file's `get_config(arg)` takes a comma-separated argument string such as
`labels=200,method=cutmix,reco=False,seed=1` (from `--config=configs/voc.py:labels=200,...`).
Every value is typed from the default of its key; a bare key (`runlocal`) means `True`.
"""
from collections.abc import Mapping
from typing import Any

import ml_collections

from reco_jax import methods
from reco_jax import names
# Every config starts from the package's defaults (re-exported for the config files).
from reco_jax.defaults import base_config

METHODS = methods.METHODS

# Choices checked by `parse_arg` for the keys that take one of a few strings.
CHOICES = {'method': METHODS, 'partial': names.PARTIALS, 'backbone': names.MODELS,
           'split': tuple(names.LABELLED_POOLS), 'pretrain': names.PRETRAINS,
           'subset': names.SUBSETS, 'precision': tuple(names.PRECISIONS)}

_TRUE = ('true', 't', 'yes', 'y', '1')
_FALSE = ('false', 'f', 'no', 'n', '0')


def _parse_value(key: str, text: str, default: Any) -> Any:
  """`text` converted to the type of `default`; a clear ValueError otherwise."""
  if isinstance(default, bool):  # Before int: bool is an int subclass.
    if text.lower() in _TRUE:
      return True
    if text.lower() in _FALSE:
      return False
    raise ValueError(f'Config argument {key}={text!r}: expected a boolean (True or False).')
  if isinstance(default, int):
    try:
      return int(text)
    except ValueError:
      raise ValueError(f'Config argument {key}={text!r}: expected an integer, e.g. '
                       f'{key}={default}.') from None
  if isinstance(default, float):
    try:
      return float(text)
    except ValueError:
      raise ValueError(f'Config argument {key}={text!r}: expected a number, e.g. '
                       f'{key}={default}.') from None
  value = text.strip()
  choices = CHOICES.get(key)
  if choices is not None and value not in choices:
    shown = ', '.join(repr(c) if not c else c for c in choices)
    raise ValueError(f'Config argument {key}={text!r}: expected one of {shown}.')
  return value


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `'k1=v1,k2=v2,flag'` into a ConfigDict of `defaults` updated by the arguments.

  Args:
    arg: the text after `:` in `--config=path.py:arg`; None or '' keeps the defaults.
    **defaults: every accepted key with its default; the default's type types the value.

  Returns:
    A ConfigDict with exactly the keys of `defaults`.

  Raises:
    ValueError: an unknown key (the message lists the valid ones) or a value that does not
      parse as the default's type or is not one of the key's choices.
  """
  return _parse(arg, defaults)[0]


def _parse(arg: str | None,
           defaults: Mapping[str, Any]) -> tuple[ml_collections.ConfigDict, frozenset[str]]:
  """`parse_arg`, also returning the keys given explicitly."""
  args = ml_collections.ConfigDict(dict(defaults))
  given = set()
  for item in (arg or '').split(','):
    item = item.strip()
    if not item:
      continue
    key, sep, text = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise ValueError(f'Unknown config argument {key!r} in {arg!r}; valid keys are: '
                       f'{", ".join(sorted(defaults))}.')
    if not sep:
      if not isinstance(defaults[key], bool):
        raise ValueError(f'Config argument {key!r} needs a value ({key}=...); only boolean '
                         f'keys may be given bare.')
      text = 'True'
    args[key] = _parse_value(key, text, defaults[key])
    given.add(key)
  return args, frozenset(given)


def paper_config(dataset: Mapping[str, Any], arg: str | None,
                 default_labels: int) -> ml_collections.ConfigDict:
  """The paper's config for one dataset (see `make_config`), locked."""
  c = make_config(dataset, arg, default_labels)
  c.lock()
  return c


def make_config(dataset: Mapping[str, Any], arg: str | None,
                default_labels: int) -> ml_collections.ConfigDict:
  """The paper's config for one dataset, specialised by the command-line argument.

  Args:
    dataset: per-dataset fields (dataset, num_classes, min_classes, crop_size, scale_range,
      eval_size, batch_size, eval_batch_size, ...; dicts update `model` and `optimizer`),
      set over `base_config()`; batch_size is the images of each branch per step.
    arg: `labels=N,partial=p1,method=cutmix,reco=False,seed=S,backbone=deeplabv2,runlocal`;
      `subset=uniform|class_balanced` (default class_balanced, uniform for method=supervised
      or pseudo_label with pretrain=within|cross); `precision=bf16` computes the model's
      convolutions and matmuls in bfloat16 (config.model.dtype; default fp32);
      `init_weights=imagenet|none|PATH` where the backbone starts (default the dataset's
      field, else from scratch; see reco_jax/models/imagenet.py).
    default_labels: labelled images when `labels` is not given.

  Returns:
    An unlocked ConfigDict. Partial labels use every training image (labels=0). (Methods
    without an unlabelled branch read 2 x batch_size labelled images per step, however the
    method is set: see `inputs.branch_batches`.)
  """
  args, given = _parse(arg, dict(labels=default_labels, partial='', method='classmix',
                                 reco=True, seed=0, backbone='deeplabv3p', split='',
                                 unlabelled_fraction=1.0, pretrain='none',
                                 subset=names.SUBSETS[0], precision='fp32',
                                 init_weights=dataset.get('init_weights',
                                                          base_config().init_weights),
                                 runlocal=False))
  c = base_config()
  _update(c, dataset)
  c.labels = args.labels
  if args.labels < 0:
    raise ValueError(f'labels={args.labels}: expected the number of labelled images, or 0 '
                     'for all of them.')
  c.partial = args.partial
  if args.partial:
    if 'labels' in given and args.labels != 0:
      raise ValueError(f'partial={args.partial} labels every training image sparsely; '
                       f'drop labels={args.labels} (or set labels=0).')
    c.labels = 0
  if args.split and c.dataset != 'reco_voc':
    raise ValueError(f'split={args.split} is a partition of Pascal VOC; {c.dataset} has none.')
  if args.split and args.partial:
    raise ValueError(f'split={args.split} draws a labelled subset; partial={args.partial} '
                     'labels every image: choose one.')
  c.split = args.split
  c.unlabelled_fraction = args.unlabelled_fraction
  c.method = args.method
  c.pretrain = args.pretrain
  c.reco = args.reco
  if 'reco' not in given and (args.pretrain != 'none' or args.method == 'pseudo_label'):
    # Zhao et al.'s settings have no ReCo; reco=True adds it to the (fine-)tuning.
    c.reco = False
  # Zhao et al.'s label settings are uniform fractions of the train images.
  zhao = args.pretrain != 'none' and args.method in ('supervised', 'pseudo_label')
  c.subset = 'uniform' if zhao and 'subset' not in given else args.subset
  c.seed = args.seed
  c.model.name = args.backbone
  c.model.dtype = names.PRECISIONS[args.precision]
  c.init_weights = args.init_weights
  # The method's own settings where its authors' differ from the paper config's.
  overrides = methods.get(c.method).config_overrides
  _update(c, overrides(c) if overrides else {})
  if args.runlocal:
    apply_runlocal(c)
  return c


def _update(c: ml_collections.ConfigDict, fields: Mapping[str, Any]) -> None:
  """Sets `fields` in c; nested fields (model, optimizer) are updated, not replaced."""
  for key, value in dict(fields).items():
    if isinstance(value, Mapping):
      c[key].update(dict(value))
    else:
      c[key] = value


def apply_runlocal(c: ml_collections.ConfigDict) -> None:
  """Shrinks a config to a smoke run: tiny model, small crops and batches, a few steps.

  The toy dataset switches to its 48-image 'tiny' variant. The tiny backbone has no ImageNet
  weights: init_weights=imagenet becomes none.
  """
  if c.init_weights == names.IMAGENET:
    c.init_weights = names.SCRATCH
  if c.dataset == 'reco_toy':
    c.dataset = 'reco_toy/tiny'
    c.labels = min(c.labels, 16)
  c.model.backbone = 'resnet_tiny'
  c.model.rep_dim = 16
  c.crop_size = (65, 65)
  c.eval_size = (97, 97)
  c.batch_size = 4
  c.eval_batch_size = 4
  c.num_queries = 16
  c.num_negatives = 32
  c.num_train_steps = 10
  c.log_every_steps = 2
  c.eval_every_steps = 5
  c.checkpoint_every_steps = 5
  c.pretrain_steps = 10
  c.projection_dims = (16, 16)

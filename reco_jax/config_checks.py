"""One check of a config before anything runs: `validate_config`.

Each owner of fields checks its own: the schema (every field of `defaults.base_config()`), the
data, the model, the schedule, ReCo's sampling, pretraining and pseudo-labels, the method
(its module's optional check_config) and the batches against the devices.
"""
import jax
import ml_collections

from reco_jax import defaults
from reco_jax import methods
from reco_jax import names


def _pair(config, name):
  value = config[name]
  try:
    pair = tuple(int(v) for v in value)
  except TypeError:
    pair = ()
  if len(pair) != 2 or min(pair) <= 0 or any(int(v) != v for v in value):
    raise ValueError(f'config.{name} must be a pair of positive integers (height, width), '
                     f'got {value!r}.')
  return pair


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError, saying what was expected, for a config that cannot run.

  Every field of `defaults.base_config()` must be present (with the optimisers' and the
  distortion's); then each owner checks its fields: the data (choices, sizes, fractions), the
  model, the schedule and optimisers, ReCo, pretraining and pseudo-labels, the method (its
  module's optional check_config) and the global batches against the devices.
  """
  _check_schema(config)
  method = methods.get(config.method)  # Names the valid methods for an unknown one.
  _check_data(config)
  _check_model(config)
  _check_schedule(config)
  _check_reco(config)
  _check_pretraining(config)
  if method.check_config is not None:  # What only this method needs or cannot do.
    method.check_config(config)
  _check_batches(config)


def _check_schema(config) -> None:
  schema = defaults.base_config()
  missing = [k for k in schema if k not in config]
  for group in ('optimizer', 'pretrain_optimizer', 'distortion'):
    missing += [f'{group}.{k}' for k in schema[group]
                if group in config and k not in config[group]]
  if missing:
    raise ValueError(f'The config lacks the fields {missing}; start from a file in configs/ '
                     '(reco_jax/defaults.py lists every field with its default).')


def _positive_ints(config, fields) -> None:
  for name in fields:
    value = config[name]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f'config.{name} must be a positive integer, got {value!r}.')


def _fractions(config, fields) -> None:
  for name in fields:
    if not 0.0 <= config[name] <= 1.0:
      raise ValueError(f'config.{name} must be in [0, 1], got {config[name]}.')


def _check_data(config) -> None:
  if config.split not in names.LABELLED_POOLS:
    raise ValueError(f'config.split={config.split!r}: expected one of '
                     f'{tuple(names.LABELLED_POOLS)}.')
  if config.subset not in names.SUBSETS:
    raise ValueError(f'config.subset={config.subset!r}: expected one of {names.SUBSETS}.')
  if not 0.0 < config.unlabelled_fraction <= 1.0:
    raise ValueError(f'config.unlabelled_fraction={config.unlabelled_fraction}: expected a '
                     'fraction in (0, 1].')
  if config.partial not in names.PARTIALS:
    raise ValueError(f"config.partial={config.partial!r}: expected '' (full labels) or one of "
                     f'{names.PARTIALS[1:]}.')
  _positive_ints(config, ('num_classes', 'batch_size', 'eval_batch_size'))
  for name in ('labels', 'min_classes', 'num_image_summaries'):
    if not isinstance(config[name], int) or config[name] < 0:
      raise ValueError(f'config.{name} must be a non-negative integer, got {config[name]!r}.')
  _pair(config, 'crop_size')
  _pair(config, 'eval_size')
  low, high = config.scale_range
  if not 0 < low <= high:
    raise ValueError(f'config.scale_range must be (low, high) with 0 < low <= high, got '
                     f'{tuple(config.scale_range)}.')


def _check_model(config) -> None:
  if config.model.get('name') not in names.MODELS:
    raise ValueError(f'config.model.name={config.model.get("name")!r}: expected one of '
                     f'{names.MODELS}.')
  if config.model.get('dtype', 'float32') not in names.PRECISIONS.values():
    raise ValueError(f'config.model.dtype={config.model.get("dtype")!r}: expected one of '
                     f'{tuple(names.PRECISIONS.values())} (the config argument precision='
                     f'{"|".join(names.PRECISIONS)} sets it).')


def _check_schedule(config) -> None:
  _positive_ints(config, ('num_train_steps', 'log_every_steps', 'eval_every_steps',
                          'checkpoint_every_steps', 'keep_checkpoints'))
  _fractions(config, ('ema_decay',))
  for group in ('optimizer', 'pretrain_optimizer'):
    if config[group].learning_rate <= 0:
      raise ValueError(f'config.{group}.learning_rate must be positive, got '
                       f'{config[group].learning_rate}.')


def _check_reco(config) -> None:
  """ReCo's sampling, and the confidence thresholds it shares with the Mean Teacher methods."""
  _positive_ints(config, ('num_queries', 'num_negatives'))
  _fractions(config, ('strong_threshold', 'weak_threshold'))


def _check_batches(config) -> None:
  processes, devices = jax.process_count(), jax.device_count()
  for name in ('batch_size', 'eval_batch_size'):
    if config[name] % devices:
      raise ValueError(f'config.{name}={config[name]} is the global batch; it must be a '
                       f'multiple of the {devices} devices ({processes} processes x '
                       f'{jax.local_device_count()} local devices). Set --config.{name} to a '
                       'multiple of it.')


def _check_pretraining(config) -> None:
  """The pretraining and pseudo-label fields, and what they cannot be combined with."""
  if config.pretrain not in names.PRETRAINS:
    raise ValueError(f'config.pretrain={config.pretrain!r}: expected one of {names.PRETRAINS}.')
  pretraining = config.pretrain != 'none'
  if pretraining or config.method == 'pseudo_label':
    what = (f'pretrain={config.pretrain}' if pretraining else 'method=pseudo_label')
    if config.partial:
      raise ValueError(f'{what} needs dense labels; partial={config.partial} labels a few '
                       'pixels per image. Drop one of them.')
  if pretraining and config.method == 's4gan':
    raise ValueError('pretrain is not supported with method=s4gan (its discriminator has no '
                     'pretrained counterpart); use pretrain=none, or another method.')
  if config.method == 'pseudo_label' and config.labels == 0:
    raise ValueError('method=pseudo_label labels the unlabelled images, and labels=0 leaves '
                     'none; choose labels=N (the labelled images).')
  if not pretraining:
    return
  for name in ('pretrain_steps', 'embedding_stride', 'contrast_temperature'):
    value = config[name]
    if isinstance(value, bool) or value <= 0:
      raise ValueError(f'config.{name} must be positive, got {value!r}.')
  dims = tuple(config.projection_dims)
  if not dims or any(int(d) != d or d <= 0 for d in dims):
    raise ValueError(f'config.projection_dims must be positive widths, the last one the '
                     f'embedding, got {dims}.')
  for name in ('jitter_prob', 'grey_prob'):
    if not 0.0 <= config.distortion[name] <= 1.0:
      raise ValueError(f'config.distortion.{name} must be in [0, 1], got '
                       f'{config.distortion[name]}.')
  if not 0.0 <= config.distortion.hue <= 0.5:
    raise ValueError(f'config.distortion.hue must be in [0, 0.5], got {config.distortion.hue}.')
  if not 0.0 <= config.pseudo_label_threshold < 1.0:
    raise ValueError(f'config.pseudo_label_threshold must be in [0, 1), got '
                     f'{config.pseudo_label_threshold}.')

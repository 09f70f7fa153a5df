"""Datasets as TFDS builders; importing this package registers them.

reco_voc, reco_cityscapes, reco_sun_rgbd and reco_folder build from raw files in a manual dir
(see each module's docstring); reco_toy is generated. `prepare(name, data_dir, manual_dir)`
builds or loads one; `prepare_for_config(config)` does so for a run, with errors that say which
flag to pass.
"""
from etils import epath
import ml_collections
import tensorflow_datasets as tfds

from reco_jax.data import base
# Importing a builder's module registers it with TFDS.
from reco_jax.data import cityscapes  # noqa: F401
from reco_jax.data import folder  # noqa: F401
from reco_jax.data import sun_rgbd  # noqa: F401
from reco_jax.data import toy  # noqa: F401
from reco_jax.data import voc  # noqa: F401

BUILDER_NAMES = ('reco_voc', 'reco_cityscapes', 'reco_sun_rgbd', 'reco_folder', 'reco_toy')
# The split a run is evaluated on: the first of these its dataset has.
EVAL_SPLITS = ('validation', 'val', 'test')


def prepare(name: str, data_dir: str | None = None,
            manual_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Returns the builder of dataset `name`, building it first if `data_dir` lacks it.

  Builders that need raw files read them from `manual_dir` (see each builder's docstring);
  they raise an error naming the expected files when it is missing or incomplete.
  """
  builder = tfds.builder(name, data_dir=data_dir)
  fingerprint = getattr(builder, 'source_fingerprint', None)
  source = fingerprint(manual_dir) if fingerprint and manual_dir else None
  record = epath.Path(builder.data_dir) / FINGERPRINT_FILE
  if source and builder.is_prepared() and (
      not record.exists() or record.read_text().strip() != source):
    print(f'{name}: {manual_dir} has changed since it was built into {builder.data_dir} (its '
          'lists, classes.txt or a listed file): building it again.', flush=True)
    epath.Path(builder.data_dir).rmtree()
    builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    builder.download_and_prepare(download_config=config)
    if source:
      partial = record.with_name(record.name + '.partial')
      partial.write_text(source + '\n')
      partial.replace(record)
  return builder


# Beside a build from a folder that can change (reco_folder): the folder's fingerprint.
FINGERPRINT_FILE = 'source_fingerprint.txt'


def prepare_for_config(config: ml_collections.ConfigDict, flags: str = '--config.'
                       ) -> tfds.core.DatasetBuilder:
  """The prepared builder of a run's config.dataset, built from config.manual_dir if need be.

  flags: how the caller's command line names the config's data_dir and manual_dir
  ('--config.' for the trainer, '--' for the tools).

  Raises:
    ValueError: an unknown dataset, or a config.num_classes that is not the dataset's.
    FileNotFoundError: the dataset is neither prepared in config.data_dir nor buildable,
      saying which flag points at it.
  """
  try:
    builder = prepare(config.dataset, config.data_dir or None, config.manual_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f'Unknown dataset {config.dataset!r}: expected one of '
                     f'{", ".join(BUILDER_NAMES)} (config.dataset).') from e
  except (AssertionError, FileNotFoundError, tfds.core.download.DownloadError) as e:
    raise FileNotFoundError(
        f'Dataset {config.dataset!r} is not prepared in '
        f'{config.data_dir or "the TFDS default data dir ($TFDS_DATA_DIR)"} and could not be '
        f'built: {e}\nPass {flags}manual_dir=FOLDER (its raw files, to build it; the builder '
        f'docstring in reco_jax/data describes the layout) or {flags}data_dir=DIR (the TFDS '
        'data dir that holds the prepared dataset).') from e
  classes = base.class_names(builder)
  if len(classes) != config.num_classes:
    if flags == '--config.':  # The trainer: the config is the user's to change.
      raise ValueError(f'config.num_classes={config.num_classes} but dataset '
                       f'{config.dataset!r} has {len(classes)} classes; set '
                       f'--config.num_classes={len(classes)}.')
    # A tool on a run: its dataset changed since it was trained.
    raise ValueError(f'The run has {config.num_classes} classes but dataset {config.dataset!r} '
                     f'now has {len(classes)}: the data changed since it was trained. Pass '
                     f'{flags}data_dir=DIR with the dataset it was trained on, or train a new '
                     'run on the new data.')
  return builder


def eval_split(builder: tfds.core.DatasetBuilder, split: str | None = None) -> str:
  """`split` if the dataset has it, else (split None) a run's evaluation split."""
  splits = list(builder.info.splits)
  if split:
    if split not in splits:
      raise ValueError(f'Dataset {builder.name!r} has no split {split!r}; its splits are '
                       f'{splits}.')
    return split
  for name in EVAL_SPLITS:
    if name in splits:
      return name
  raise ValueError(f'Dataset {builder.name!r} has none of the evaluation splits '
                   f'{EVAL_SPLITS}; pass --split, one of {splits}.')

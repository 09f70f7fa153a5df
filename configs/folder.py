"""Your own data: `--config=configs/folder.py:data=/path/to/folder,labels=50,method=classmix`.

The folder has the `reco_folder` layout (images/, labels/, train.txt, val.txt, classes.txt;
see reco_jax/data/folder.py). From it the config takes the class count and names
(classes.txt), the training crop (the smallest training image side, at most 321, as 8k + 1)
and the evaluation size (the largest validation image, each side as 16k + 1), and a TFDS data
dir of its own (reco_jax.own_data.data_dir), where the dataset is built on first use.
Everything else is the paper's VOC setting; override any field with --config.FIELD=VALUE
(e.g. --config.crop_size='(257, 257)' --config.batch_size=4).

Arguments: data=FOLDER (required; no commas in the path), labels=N (0 = all; default 50, or
all the training images of a folder with fewer),
partial=p0|p1|p5|p25, method=..., reco=True|False, pretrain=..., seed=S, backbone=...,
subset=class_balanced|uniform, precision=fp32|bf16, init_weights=imagenet|none|PATH (default
imagenet), runlocal.
"""
import pathlib

from configs import common
from reco_jax import names
from reco_jax import own_data


def _split_data(arg: str | None) -> tuple[pathlib.Path, str]:
  """(the folder of data=..., the remaining arguments)."""
  items = [item.strip() for item in (arg or '').split(',') if item.strip()]
  data = [item.partition('=')[2].strip() for item in items if item.startswith('data=')]
  if len(data) != 1 or not data[0]:
    raise ValueError('configs/folder.py needs the dataset folder once: '
                     '--config=configs/folder.py:data=/path/to/folder[,labels=50,...].')
  folder = pathlib.Path(data[0]).expanduser().resolve()
  if not folder.is_dir():
    raise FileNotFoundError(f'data={data[0]}: {folder} is not a folder; expected one with '
                            'images/, labels/, train.txt, val.txt and classes.txt.')
  return folder, ','.join(item for item in items if not item.startswith('data='))


# Labelled images when labels=N is not given (all of them in a folder with fewer).
DEFAULT_LABELS = 50


def get_config(arg=None):
  folder, rest = _split_data(arg)
  own_data.check_splits(folder)
  crop, eval_size = own_data.crop_and_eval_size(folder)
  default_labels = DEFAULT_LABELS
  given = any(item.strip().startswith('labels=') for item in rest.split(','))
  count = own_data.num_train_images(folder)
  if not given and count < DEFAULT_LABELS:
    default_labels = 0
    print(f'{folder} lists {count} training images, fewer than the default '
          f'labels={DEFAULT_LABELS}: all of them are labelled (labels=0).')
  return common.paper_config(
      dict(dataset='reco_folder', data_dir=own_data.data_dir(folder), manual_dir=str(folder),
           num_classes=len(own_data.class_names(folder)), min_classes=1, crop_size=crop,
           scale_range=(0.5, 1.5), eval_size=eval_size, batch_size=10, eval_batch_size=4,
           init_weights=names.IMAGENET),
      rest, default_labels=default_labels)

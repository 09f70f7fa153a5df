"""What every reco_jax segmentation dataset stores, and the checks each example passes."""
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from reco_jax import names


def segmentation_features(class_names: Sequence[str]) -> tfds.features.FeaturesDict:
  """image uint8 [H,W,3]; label uint8 [H,W,1] class ids, 255 = void; image_id; present classes."""
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3)),
      'label': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
      'image_id': tfds.features.Text(),
      'classes': tfds.features.Tensor(shape=(None,), dtype=np.int32),
  })


def make_example(image_id: str, image: np.ndarray, label: np.ndarray,
                 num_classes: int) -> dict:
  """Checks one image/label pair and returns the example dict the builders yield.

  image: [H, W, 3] uint8; label: [H, W] or [H, W, 1] uint8 class ids (255 = void).
  Raises ValueError naming `image_id` on a size mismatch or an out-of-range label.
  """
  image = np.asarray(image)
  label = np.asarray(label)
  if label.ndim == 3:
    label = label[..., 0]
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f'{image_id}: expected an RGB uint8 image [H, W, 3], got {image.dtype} '
                     f'{image.shape}.')
  if image.shape[:2] != label.shape:
    raise ValueError(f'{image_id}: image is {image.shape[0]}x{image.shape[1]} but its label is '
                     f'{label.shape[0]}x{label.shape[1]}; they must have the same size.')
  present = np.unique(label)
  bad = present[(present >= num_classes) & (present != names.VOID)]
  if bad.size:
    raise ValueError(f'{image_id}: label values {bad.tolist()} are not class ids 0..'
                     f'{num_classes - 1} or {names.VOID} (void); map them before building.')
  classes = present[present != names.VOID].astype(np.int32)
  return {'image': image, 'label': label[..., None].astype(np.uint8), 'image_id': image_id,
          'classes': classes}


def dataset_info(builder: tfds.core.DatasetBuilder, description: str,
                 class_names: Sequence[str], homepage: str = '') -> tfds.core.DatasetInfo:
  """DatasetInfo shared by all builders; class names travel in the metadata."""
  return tfds.core.DatasetInfo(
      builder=builder,
      description=description,
      features=segmentation_features(class_names),
      homepage=homepage,
      metadata=tfds.core.MetadataDict(class_names=list(class_names)),
  )


class SegmentationBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """What the reco_jax builders share: version and a DatasetInfo from class attributes."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  CLASS_NAMES: tuple[str, ...] = ()
  DESCRIPTION = ''
  HOMEPAGE = ''

  def _info(self) -> tfds.core.DatasetInfo:
    return dataset_info(self, self.DESCRIPTION, self.CLASS_NAMES, self.HOMEPAGE)


def class_names(builder: tfds.core.DatasetBuilder) -> tuple[str, ...]:
  """Class names of a prepared dataset, index = class id."""
  return tuple(builder.info.metadata['class_names'])

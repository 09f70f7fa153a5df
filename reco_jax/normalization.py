"""ImageNet mean/std normalisation shared by the input pipeline and on-device augmentation."""
import numpy as np

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalize(image_01):
  """[..., 3] float in [0, 1] -> normalised float (works on numpy, tf and jax arrays)."""
  return (image_01 - MEAN) / STD


def denormalize(image):
  """Inverse of `normalize`: normalised float -> [0, 1] float."""
  return image * STD + MEAN

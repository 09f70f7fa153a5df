"""TF image ops on single examples (graph mode, dynamic input sizes, stateless seeds): the
reference ReCo data code's augmentation (build_data.py `transform`) and the padding and cropping
of training and evaluation images."""
import tensorflow as tf

from reco_jax import names
from reco_jax import photometric as P


def _reflect_indices(size_in: tf.Tensor, size_out: tf.Tensor) -> tf.Tensor:
  """Source index of each of `size_out` positions when reflecting a length-`size_in` axis.

  Equals repeated REFLECT padding (edge not repeated), so it works for any pad length, unlike
  tf.pad, which fails once the pad exceeds the image size.
  """
  period = tf.maximum(2 * (size_in - 1), 1)
  m = tf.range(size_out) % period
  return tf.where(m < size_in, m, period - m)


def pad_to_size(image: tf.Tensor, label: tf.Tensor | None, height, width):
  """Pads bottom/right up to at least (height, width): image reflected, label void.

  image: [h, w, 3] float32; label: [h, w, 1] uint8 or None. Sizes already large enough stay.
  """
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  out_h, out_w = tf.maximum(h, height), tf.maximum(w, width)
  image = tf.gather(image, _reflect_indices(h, out_h), axis=0)
  image = tf.gather(image, _reflect_indices(w, out_w), axis=1)
  if label is not None:
    label = tf.pad(label, [[0, out_h - h], [0, out_w - w], [0, 0]],
                   constant_values=names.VOID)
  return image, label


def _grey(image: tf.Tensor) -> tf.Tensor:
  """PIL's convert('L') grey level: [h, w, 1]."""
  return tf.reduce_sum(image * tf.constant(P.GREY_WEIGHTS), axis=-1, keepdims=True)


def colour_jitter(image: tf.Tensor, seed: tf.Tensor, hue_jitter: float = P.JITTER_HUE
                  ) -> tf.Tensor:
  """torchvision-style ColorJitter on a [h, w, 3] float32 image in [0, 1], random draws; the
  hue shift is uniform in [-hue_jitter, hue_jitter]."""
  seeds = tf.random.experimental.stateless_split(seed, 3)
  b, c, s = tf.unstack(tf.random.stateless_uniform([3], seeds[0], *P.JITTER_FACTOR))
  hue = tf.random.stateless_uniform([], seeds[1], -hue_jitter, hue_jitter)
  order = tf.argsort(tf.random.stateless_uniform([4], seeds[2]))
  return colour_jitter_with(image, order, b, c, s, hue)


def colour_jitter_with(image: tf.Tensor, order: tf.Tensor, b, c, s, hue) -> tf.Tensor:
  """The four colour ops of ColorJitter in `order` ([4] int: 0 brightness, 1 contrast,
  2 saturation, 3 hue). Brightness multiplies; contrast blends with the mean grey level;
  saturation blends with the grey image; hue shifts the HSV hue; each clips to [0, 1].
  """
  ops = [
      lambda x: x * b,
      lambda x: tf.reduce_mean(_grey(x)) * (1 - c) + x * c,
      lambda x: _grey(x) * (1 - s) + x * s,
      lambda x: tf.image.adjust_hue(x, hue),
  ]
  for step in range(4):
    image = tf.switch_case(order[step], [lambda f=f: tf.clip_by_value(f(image), 0., 1.)
                                         for f in ops])
  return image


def _symmetric_indices(size: tf.Tensor) -> tf.Tensor:
  """Indices of a symmetric extension by BLUR_RADIUS on each side (edge pixel repeated)."""
  i = tf.range(-P.BLUR_RADIUS, size + P.BLUR_RADIUS)
  i = tf.where(i < 0, -i - 1, tf.where(i >= size, 2 * size - 1 - i, i))
  return tf.clip_by_value(i, 0, size - 1)  # images narrower than the radius


def gaussian_blur(image: tf.Tensor, sigma: tf.Tensor) -> tf.Tensor:
  """Separable Gaussian blur of a [h, w, 3] float32 image; border extended symmetrically."""
  x = tf.range(-P.BLUR_RADIUS, P.BLUR_RADIUS + 1, dtype=tf.float32)
  k = tf.exp(-0.5 * tf.square(x / sigma))
  k /= tf.reduce_sum(k)
  rows = _symmetric_indices(tf.shape(image)[0])
  cols = _symmetric_indices(tf.shape(image)[1])
  padded = tf.gather(tf.gather(image, rows, axis=0), cols, axis=1)[None]
  kernel_y = tf.tile(tf.reshape(k, [-1, 1, 1, 1]), [1, 1, 3, 1])
  kernel_x = tf.tile(tf.reshape(k, [1, -1, 1, 1]), [1, 1, 3, 1])
  out = tf.nn.depthwise_conv2d(padded, kernel_y, [1, 1, 1, 1], 'VALID')
  out = tf.nn.depthwise_conv2d(out, kernel_x, [1, 1, 1, 1], 'VALID')
  return out[0]


def augment_labelled(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor, *,
                     crop_size: tuple[int, int], scale_range: tuple[float, float],
                     photometric: bool = True, hue_jitter: float = P.JITTER_HUE
                     ) -> tuple[tf.Tensor, tf.Tensor]:
  """The labelled-branch augmentation of one example.

  Args:
    image: [h, w, 3] uint8. label: [h, w, 1] uint8 (255 void).
    seed: [2] int64 stateless seed.
    crop_size: output (height, width). scale_range: random rescale factor range.
    photometric: False skips colour jitter and blur (tests check geometry with it).
    hue_jitter: the largest hue shift of the colour jitter, in turns.

  Returns:
    image [crop_h, crop_w, 3] float32 in [0, 1] (not normalised), label [crop_h, crop_w] int32.
  """
  seeds = tf.random.experimental.stateless_split(seed, 8)
  image = tf.image.convert_image_dtype(image, tf.float32)
  if tuple(scale_range) != (1.0, 1.0):
    scale = tf.random.stateless_uniform([], seeds[0], scale_range[0], scale_range[1])
    size = tf.cast(tf.cast(tf.shape(image)[:2], tf.float32) * scale, tf.int32)
    size = tf.maximum(size, 1)
    # antialias=True matches PIL's bilinear resize, which filters when downscaling.
    image = tf.image.resize(image, size, 'bilinear', antialias=True)
    label = tf.image.resize(label, size, 'nearest')
  image, label = random_crop(image, label, seeds[1], crop_size)
  if photometric:
    jitter = tf.random.stateless_uniform([], seeds[2]) < P.JITTER_PROB
    image = tf.cond(jitter, lambda: colour_jitter(image, seeds[3], hue_jitter),
                    lambda: image)
    blur = tf.random.stateless_uniform([], seeds[4]) < P.BLUR_PROB
    sigma = tf.random.stateless_uniform([], seeds[5], *P.BLUR_SIGMA)
    image = tf.cond(blur, lambda: gaussian_blur(image, sigma), lambda: image)
  flip = tf.random.stateless_uniform([], seeds[6]) < P.FLIP_PROB
  image, label = tf.cond(flip, lambda: (image[:, ::-1], label[:, ::-1]), lambda: (image, label))
  image.set_shape(list(crop_size) + [3])
  return image, tf.cast(tf.reshape(label, crop_size), tf.int32)


def random_crop(image: tf.Tensor, label: tf.Tensor | None, seed: tf.Tensor,
                crop_size: tuple[int, int]):
  """Pads (see `pad_to_size`) then crops the same random window from image and label."""
  image, label = pad_to_size(image, label, crop_size[0], crop_size[1])
  shape = tf.shape(image)
  seeds = tf.random.experimental.stateless_split(seed, 2)
  y = tf.random.stateless_uniform([], seeds[0], 0, shape[0] - crop_size[0] + 1, tf.int32)
  x = tf.random.stateless_uniform([], seeds[1], 0, shape[1] - crop_size[1] + 1, tf.int32)
  image = image[y:y + crop_size[0], x:x + crop_size[1]]
  image.set_shape(list(crop_size) + [3])
  if label is not None:
    label = label[y:y + crop_size[0], x:x + crop_size[1]]
    label.set_shape(list(crop_size) + [1])
  return image, label


def fit_to_size(image: tf.Tensor, label: tf.Tensor, height: int, width: int):
  """Pads bottom/right (image reflected, label void) or centre-crops to exactly (height, width).

  image: [h, w, 3] float32; label: [h, w, 1] uint8. The reference pads the same way and
  random-crops larger images; a centre crop keeps evaluation deterministic (its VOC, Cityscapes
  and SUN evaluation sizes never crop).
  """
  image, label = pad_to_size(image, label, height, width)
  shape = tf.shape(image)
  y, x = (shape[0] - height) // 2, (shape[1] - width) // 2
  image = image[y:y + height, x:x + width]
  label = label[y:y + height, x:x + width]
  image.set_shape([height, width, 3])
  label.set_shape([height, width, 1])
  return image, label
